"""Curves between models and the ensembles they give (Garipov et al. 2018), low-loss simplexes (Benton et
al. 2021), AutoNEB paths (Draxler et al. 2018): each a trainable basis + coefficient rows."""
from .bezier import BezierCurve
from .curve import Curve
from .evaluate import CurveResult, evaluate_curve
from .neb import NEBResult, autoneb
from .polychain import PolyChain
from .simplex import Simplex, SimplexHistory, espro, train_simplex
from .train import CurveHistory, garipov_schedule, train_curve
from .trainable import TrainableSubspace

__all__ = ["BezierCurve", "Curve", "CurveHistory", "CurveResult", "NEBResult", "PolyChain", "Simplex",
           "SimplexHistory", "TrainableSubspace", "autoneb", "espro", "evaluate_curve", "garipov_schedule",
           "train_curve", "train_simplex"]
