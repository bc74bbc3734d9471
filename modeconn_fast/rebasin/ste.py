"""Straight-through estimator matching (Ainsworth et al. 2023, §3.3, Alg. 3): learn the permutation by
minimising the loss at the midpoint of the aligned line.

Keep a free copy W̃ of the weights (initialised to θ_A). Each step projects it onto the permutations of θ_B,
π = argmax_π ⟨W̃, π(θ_B)⟩ (weight matching, warm-started from the last π), and descends on

    L( ½ (θ_A + π(θ_B) + W̃ − sg(W̃)) )

whose forward value uses π(θ_B) and whose gradient flows to W̃ straight through the projection (sg: stop
gradient). BatchNorm layers use batch statistics during these steps.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..engine.batches import Batches
from .derive import permutation_spec
from .matching import weight_matching
from .permutation import Permutation
from .spec import PermutationSpec, check_same_architecture


def ste_matching(
    model_a: nn.Module,
    model_b: nn.Module,
    train_data: Any,
    *,
    spec: PermutationSpec | None = None,
    epochs: int = 2,
    batch_size: int = 128,
    lr: float = 1e-3,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    seed: int = 0,
) -> Permutation:
    """Permutation of model_b found by the straight-through estimator; `loss_history` holds the midpoint loss
    of every step and `iterations` the steps. train_data: `(inputs, targets)` (split into `batch_size` rows)
    or an iterable of batches."""
    check_same_architecture(model_a, model_b)
    batches = Batches(train_data, "train_data")
    batches.batch_size = batch_size
    if spec is None:
        spec = permutation_spec(model_a, batches.first[0])
    params = {name for name, _ in model_a.named_parameters()}
    state_a = {k: v.detach() for k, v in model_a.state_dict().items()}
    free = {k: state_a[k].clone().requires_grad_(True) for k in params}
    optimizer = torch.optim.Adam(free.values(), lr=lr)
    shadow, target = copy.deepcopy(model_a), copy.deepcopy(model_b)  # hold W̃ for matching; model for calls
    permutation = weight_matching(model_a, model_b, spec=spec, seed=seed)
    losses: list[float] = []
    target.train()
    for _ in range(epochs):
        for inputs, labels in batches:
            with torch.no_grad():
                shadow.load_state_dict({**state_a, **{k: v.detach() for k, v in free.items()}})
            permutation = weight_matching(shadow, model_b, spec=spec, seed=seed + len(losses), init=permutation)
            permuted_b = permutation.permute_state(model_b.state_dict())
            midpoint = {k: 0.5 * (state_a[k] + permuted_b[k] + free[k] - free[k].detach()) for k in params}
            buffers = {k: (0.5 * (v + permuted_b[k]) if v.is_floating_point() else v.clone())
                       for k, v in state_a.items() if k not in params}  # fmt: skip
            args = inputs if isinstance(inputs, tuple) else (inputs,)
            loss = loss_fn(functional_call(target, {**midpoint, **buffers}, args), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    with torch.no_grad():
        shadow.load_state_dict({**state_a, **{k: v.detach() for k, v in free.items()}})
    result = weight_matching(shadow, model_b, spec=spec, seed=seed, init=permutation)
    return Permutation(spec, result.perms, loss_history=losses, iterations=len(losses))
