"""Re-Basin: align the hidden units of two networks before interpolating them (Ainsworth et al. 2023).

    permutation_spec(model, x)                    which tensor axes each hidden-unit permutation acts on (torch.fx)
    weight_matching(model_a, model_b, ...)        Permutation maximising Σ ⟨W_A, π(W_B)⟩; .apply(model_b) aligns
    activation_matching(model_a, model_b, data)   one LAP per group on activation correlations
    ste_matching(model_a, model_b, train_data)    straight-through estimator on the midpoint loss
    repair(model_a, model_b, data, alpha=0.5)     interpolated model with REPAIR's channel statistics
    merge(models, data)                           align several models into one basin and average them
"""
from .activation import activation_matching
from .derive import permutation_spec
from .matching import matching_objective, weight_matching
from .merge import merge
from .permutation import FunctionChangedError, Permutation
from .repair import repair
from .spec import Axis, Heads, PermutationSpec, SpecError
from .ste import ste_matching

__all__ = [
    "Axis",
    "FunctionChangedError",
    "Heads",
    "Permutation",
    "PermutationSpec",
    "SpecError",
    "activation_matching",
    "matching_objective",
    "merge",
    "permutation_spec",
    "repair",
    "ste_matching",
    "weight_matching",
]
