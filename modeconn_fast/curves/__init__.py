"""Curves between models and the ensembles they give (Garipov et al. 2018): each a basis + coefficient rows."""
from .bezier import BezierCurve
from .calibration import ReliabilityBins
from .curve import Curve
from .ensemble import Ensemble, EnsembleEvaluation, EnsemblePrediction
from .evaluate import CurveResult, evaluate_curve
from .fge import FGEHistory, fge, fge_learning_rate
from .polychain import PolyChain
from .train import CurveHistory, garipov_schedule, train_curve

__all__ = ["BezierCurve", "Curve", "CurveHistory", "CurveResult", "Ensemble", "EnsembleEvaluation", "EnsemblePrediction",
           "FGEHistory", "PolyChain", "ReliabilityBins", "evaluate_curve", "fge", "fge_learning_rate", "garipov_schedule",
           "train_curve"]
