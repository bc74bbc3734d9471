"""Curves between models and the ensembles they give (Garipov et al. 2018): each a basis + coefficient rows."""
from .bezier import BezierCurve
from .curve import Curve
from .evaluate import CurveResult, evaluate_curve
from .polychain import PolyChain
from .train import CurveHistory, garipov_schedule, train_curve

__all__ = ["BezierCurve", "Curve", "CurveHistory", "CurveResult", "PolyChain", "evaluate_curve", "garipov_schedule",
           "train_curve"]
