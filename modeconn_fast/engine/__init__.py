"""One engine for every subspace: any nn.Module, many points per pass, BatchNorm modes, chunking."""
from .evaluate import Evaluation, evaluate
from .view import SubspaceView

__all__ = ["Evaluation", "SubspaceView", "evaluate"]
