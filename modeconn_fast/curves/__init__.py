"""Methods built on curves through weight space: Fast Geometric Ensembling and ensembles evaluated in one pass."""
from .calibration import ReliabilityBins
from .ensemble import Ensemble, EnsembleEvaluation, EnsemblePrediction
from .fge import FGEHistory, fge, fge_learning_rate

__all__ = ["Ensemble", "EnsembleEvaluation", "EnsemblePrediction", "FGEHistory", "ReliabilityBins", "fge",
           "fge_learning_rate"]
