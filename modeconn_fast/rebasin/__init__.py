"""Re-Basin: align the hidden units of two networks before interpolating them (Ainsworth et al. 2023)."""
from .derive import permutation_spec
from .matching import matching_objective, weight_matching
from .permutation import FunctionChangedError, Permutation
from .spec import Axis, PermutationSpec, SpecError

__all__ = [
    "Axis",
    "FunctionChangedError",
    "Permutation",
    "PermutationSpec",
    "SpecError",
    "matching_objective",
    "permutation_spec",
    "weight_matching",
]
