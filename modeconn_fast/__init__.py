"""modeconn_fast: fast mode connectivity for any PyTorch nn.Module.

    evaluate(model, basis, coeffs, data)   metrics at many points Σ_k coeffs[p,k] basis[k], in one pass
    interpolate(model_a, model_b, data)    loss and error along the straight line, with barriers
    barrier(model_a, model_b, data)        the loss (or error) barrier of that line
    BezierCurve(a, b), PolyChain(a, b)     trainable curves between two models (their control points)
    train_curve(curve, data, ...)          minimise E_t L(θ(t)); evaluate_curve(curve, data) -> CurveResult
    train_simplex(model, data, ...)        a low-loss simplex grown from a model (SPRO); espro(models, data, ...)
    autoneb(model_a, model_b, data, ...)   a low-loss path by nudged elastic band with pivot insertion -> NEBResult
    Plane, Line                            planes and lines to scan: through models (Garipov), random (Li et al.)
    scan(subspace, model, data, xs=, ys=)  a metric on a grid, in chunks, resumable, torchrun-sharded: GridResult
    TrajectoryRecorder(model, every=, out=) checkpoints of your training loop on disk, for Plane.pca(files)
    rebasin                                align hidden units first: weight_matching, activation_matching, ...
    fge(model, train_data, ...)            Fast Geometric Ensembling: snapshots of a cyclic-rate SGD run
    Ensemble(models)                       members evaluated in one pass: probabilities, uncertainty, calibration
    curvature(model, basis, coeffs, data)  top Hessian eigenvalues (Lanczos), trace (Hutchinson), per layer -> CurvatureResult
    curvature_along(path, data)            the same at evenly spaced t of a line or a curve ("sharpness along the path")
"""
from . import rebasin
from .analysis import CurvatureResult, curvature, curvature_along
from .curves import (BezierCurve, CurveHistory, CurveResult, Ensemble, EnsembleEvaluation, EnsemblePrediction,
                     NEBResult, PolyChain, Simplex, SimplexHistory, autoneb, espro, evaluate_curve, fge, train_curve,
                     train_simplex)
from .engine import Evaluation, SubspaceView, evaluate
from .paths import PathResult, barrier, interpolate, linear_coeffs
from .scans import GridResult, Line, Plane, TrajectoryRecorder, scan
from .subspace import Basis

__version__ = "0.1.0"
__all__ = ["Basis", "BezierCurve", "CurvatureResult", "CurveHistory", "CurveResult", "Ensemble",
           "EnsembleEvaluation", "EnsemblePrediction", "Evaluation", "GridResult", "Line", "NEBResult",
           "PathResult", "Plane", "PolyChain", "Simplex", "SimplexHistory", "SubspaceView",
           "TrajectoryRecorder", "autoneb", "barrier", "curvature", "curvature_along", "espro", "evaluate",
           "evaluate_curve", "fge", "interpolate", "linear_coeffs", "rebasin", "scan", "train_curve",
           "train_simplex"]
