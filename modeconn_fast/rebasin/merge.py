"""Merging several models: align them all into one basin, then average (Ainsworth et al. 2023, MergeMany).

Start by aligning every model to the reference (weight matching); then, for `rounds` rounds, re-align each
model in turn to the average of the others (warm-started from its current permutation) until no permutation
changes. The merged weights are the mean of the aligned models. With `data`, BatchNorm running statistics are
recomputed on it afterwards (averaged statistics do not describe the averaged network).
"""
from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..engine.batches import Batches
from .derive import permutation_spec
from .matching import weight_matching
from .permutation import Permutation
from .sources import ModelSource, read_source
from .spec import PermutationSpec, SpecError, check_same_architecture, check_same_states


def merge(
    models: Sequence[ModelSource],
    data: Any = None,
    *,
    spec: PermutationSpec | None = None,
    example_input: Any = None,
    reference: int = 0,
    rounds: int = 3,
    seed: int = 0,
    max_iter: int = 100,
) -> nn.Module | dict[str, Tensor]:
    """One model whose weights are the mean of `models` after aligning their hidden units (a new module).

    data: `(inputs, targets)` or an iterable of batches, used for BatchNorm statistics and, when neither spec
    nor example_input is given, as the example input for deriving the spec. The models may also be state dicts
    or paths of saved state dicts (read memory-mapped, see `sources.py`; `spec` needed, `data` refused): then
    the result is the merged state dict, built one tensor at a time. `max_iter`: sweeps per alignment (see
    `weight_matching`).
    """
    if len(models) < 2:
        raise ValueError(f"merge needs at least two models, got {len(models)}")
    modules = all(isinstance(m, nn.Module) for m in models)
    states = [read_source(m, f"models[{i}]") for i, m in enumerate(models)]
    for i, state in enumerate(states[1:], 1):
        if modules:
            check_same_architecture(models[0], models[i])
        else:
            check_same_states(states[0], state)
    if not modules and (spec is None or data is not None):
        raise SpecError("merging state dicts or files needs spec= and no data= (no module to derive a spec or to "
                        "recompute BatchNorm statistics with): derive the spec once with permutation_spec(model, x)")
    batches = Batches(data, "data") if data is not None else None
    if spec is None:
        if example_input is None and batches is None:
            raise SpecError("merge needs spec=, example_input= or data= to derive the permutation spec")
        spec = permutation_spec(models[reference], example_input if example_input is not None else batches.first[0])
    anchor = models[reference]
    perms = [
        weight_matching(anchor, m, spec=spec, seed=seed, max_iter=max_iter) if i != reference else Permutation.identity(spec, states[i])
        for i, m in enumerate(models)
    ]
    generator = torch.Generator().manual_seed(seed)
    for round_index in range(rounds):
        changed = False
        for i in torch.randperm(len(models), generator=generator).tolist():
            others = _aligned_mean(states, perms, skip=i)
            if modules:
                others = _module_with(anchor, others)
            found = weight_matching(others, models[i], spec=spec, seed=seed + round_index, init=perms[i], max_iter=max_iter)
            if any(not torch.equal(found.perms[g], perms[i].perms[g]) for g in spec.groups):
                changed = True
            perms[i] = found
        if not changed:
            break
    merged = _aligned_mean(states, perms)
    if not modules:
        return merged
    model = _module_with(anchor, merged)
    if batches is not None:
        reset_batchnorm(model, batches)
    return model.eval()


def _aligned_mean(states: Sequence[Mapping[str, Tensor]], perms: Sequence[Permutation], skip: int = -1) -> dict[str, Tensor]:
    """Mean over the models but `skip` of each aligned tensor, one tensor at a time (integer tensors: the first
    model's)."""
    chosen = [(state, perm) for j, (state, perm) in enumerate(zip(states, perms)) if j != skip]
    mean = {}
    for key, value in chosen[0][0].items():
        if value.is_floating_point():
            mean[key] = torch.stack([perm.permute_tensor(key, state[key]) for state, perm in chosen]).mean(0)
        else:
            mean[key] = value
    return mean


def _module_with(anchor: nn.Module, state: Mapping[str, Tensor]) -> nn.Module:
    model = copy.deepcopy(anchor)
    model.load_state_dict(state)
    return model


def reset_batchnorm(model: nn.Module, batches: Batches) -> None:
    """Recompute every BatchNorm's running statistics as the exact average over `batches` (train-mode pass)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [(m, m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    training = model.training
    model.train()
    with torch.no_grad():
        for inputs, _ in batches:
            model(*(inputs if isinstance(inputs, tuple) else (inputs,)))
    model.train(training)
    for m, momentum in saved:
        m.momentum = momentum
