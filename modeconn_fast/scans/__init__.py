"""Landscape scans: planes and lines of weight space evaluated on grids (DESIGN §5–§6)."""
from .planes import Line, Plane, Subspace

__all__ = ["Line", "Plane", "Subspace"]
