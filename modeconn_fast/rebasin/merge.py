"""Merging several models: align them all into one basin, then average (Ainsworth et al. 2023, MergeMany).

Start by aligning every model to the reference (weight matching); then, for `rounds` rounds, re-align each
model in turn to the average of the others (warm-started from its current permutation) until no permutation
changes. The merged weights are the mean of the aligned models. With `data`, BatchNorm running statistics are
recomputed on it afterwards (averaged statistics do not describe the averaged network).
"""
from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from torch import nn

from ..engine.batches import Batches
from .derive import permutation_spec
from .matching import weight_matching
from .permutation import Permutation
from .spec import PermutationSpec, SpecError, check_same_architecture


def merge(
    models: Sequence[nn.Module],
    data: Any = None,
    *,
    spec: PermutationSpec | None = None,
    example_input: Any = None,
    reference: int = 0,
    rounds: int = 3,
    seed: int = 0,
) -> nn.Module:
    """One model whose weights are the mean of `models` after aligning their hidden units (a new module).

    data: `(inputs, targets)` or an iterable of batches, used for BatchNorm statistics and, when neither spec
    nor example_input is given, as the example input for deriving the spec.
    """
    if len(models) < 2:
        raise ValueError(f"merge needs at least two models, got {len(models)}")
    for other in models[1:]:
        check_same_architecture(models[0], other)
    batches = Batches(data, "data") if data is not None else None
    if spec is None:
        if example_input is None and batches is None:
            raise SpecError("merge needs spec=, example_input= or data= to derive the permutation spec")
        spec = permutation_spec(models[reference], example_input if example_input is not None else batches.first[0])
    anchor = models[reference]
    perms = [weight_matching(anchor, m, spec=spec, seed=seed) if i != reference else None for i, m in enumerate(models)]
    states = [p.permute_state(m.state_dict()) if p is not None else m.state_dict() for p, m in zip(perms, models)]
    generator = torch.Generator().manual_seed(seed)
    for round_index in range(rounds):
        changed = False
        for i in torch.randperm(len(models), generator=generator).tolist():
            others = copy.deepcopy(anchor)
            others.load_state_dict(_mean([s for j, s in enumerate(states) if j != i]))
            init = perms[i] if perms[i] is not None else Permutation.identity(spec, models[i].state_dict())
            found = weight_matching(others, models[i], spec=spec, seed=seed + round_index, init=init)
            if any(not torch.equal(found.perms[g], init.perms[g]) for g in spec.groups):
                changed = True
            perms[i] = found
            states[i] = found.permute_state(models[i].state_dict())
        if not changed:
            break
    merged = copy.deepcopy(anchor)
    merged.load_state_dict(_mean(states))
    if batches is not None:
        reset_batchnorm(merged, batches)
    return merged.eval()


def _mean(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    first = states[0]
    return {k: torch.stack([s[k] for s in states]).mean(0) if v.is_floating_point() else v for k, v in first.items()}


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
