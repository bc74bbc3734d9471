"""Landscape analysis beyond the loss: curvature (Hessian eigenvalues and trace) at many points of a subspace."""
from .spectrum import CurvatureResult, curvature, curvature_along

__all__ = ["CurvatureResult", "curvature", "curvature_along"]
