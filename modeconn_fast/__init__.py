"""modeconn_fast: fast mode connectivity for any PyTorch nn.Module.

    evaluate(model, basis, coeffs, data)   metrics at many points Σ_k coeffs[p,k] basis[k], in one pass
    interpolate(model_a, model_b, data)    loss and error along the straight line, with barriers
    barrier(model_a, model_b, data)        the loss (or error) barrier of that line
    Plane, Line                            planes and lines to scan: through models (Garipov), random (Li et al.)
    scan(subspace, model, data, xs=, ys=)  a metric on a grid, in chunks, resumable, torchrun-sharded: GridResult
    rebasin                                align hidden units first: weight_matching, activation_matching, ...
"""
from . import rebasin
from .engine import Evaluation, SubspaceView, evaluate
from .paths import PathResult, barrier, interpolate, linear_coeffs
from .scans import GridResult, Line, Plane, scan
from .subspace import Basis

__version__ = "0.1.0"
__all__ = ["Basis", "Evaluation", "GridResult", "Line", "PathResult", "Plane", "SubspaceView", "barrier", "evaluate",
           "interpolate", "linear_coeffs", "rebasin", "scan"]
