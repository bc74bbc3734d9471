"""Landscape scans: planes and lines of weight space evaluated on grids, stored chunk by chunk, resumable,
shared across torchrun ranks (DESIGN §5–§6)."""
from .planes import Line, Plane, Subspace
from .result import GridResult
from .scan import scan
from .storage import ScanMismatchError
from .trajectory import TrajectoryRecorder

__all__ = ["GridResult", "Line", "Plane", "ScanMismatchError", "Subspace", "TrajectoryRecorder", "scan"]
