"""Curves between models and the ensembles they give (Garipov et al. 2018), low-loss simplexes (Benton et
al. 2021), AutoNEB paths (Draxler et al. 2018): each a trainable basis + coefficient rows."""
from .bezier import BezierCurve
from ..engine.calibration import ReliabilityBins
from .curve import Curve
from .ensemble import Ensemble, EnsembleEvaluation, EnsemblePrediction
from .evaluate import CurveResult, evaluate_curve
from .fge import FGEHistory, fge, fge_learning_rate
from .neb import NEBResult, autoneb
from .polychain import PolyChain
from .simplex import Simplex, SimplexHistory, espro, train_simplex
from .train import CurveHistory, garipov_schedule, train_curve
from .trainable import TrainableSubspace

__all__ = ["BezierCurve", "Curve", "CurveHistory", "CurveResult", "Ensemble", "EnsembleEvaluation", "EnsemblePrediction",
           "FGEHistory", "NEBResult", "PolyChain", "ReliabilityBins", "Simplex", "SimplexHistory", "TrainableSubspace",
           "autoneb", "espro", "evaluate_curve", "fge", "fge_learning_rate", "garipov_schedule", "train_curve",
           "train_simplex"]
