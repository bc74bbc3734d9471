"""Modules the view does not know: their weights are materialised per point and run with vmap.

Any module with parameters (or point-dependent buffers) whose type the view has no native layer for runs as
`torch.func.vmap` over the point axis of `torch.func.functional_call(module, θ(p), inputs[p])`, its whole
subtree included; where vmap cannot batch the module (e.g. nn.LSTM), as a loop over points. Inputs whose
first axis holds the folded points ([P·M, ...]) are split per point; others are passed to every point as they
are. Outputs are folded back along their first axis.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from .layers import SubspaceLayer
from .state import ViewState


class FallbackModule(SubspaceLayer):
    """Runs `module` (a subtree of the user's model) once per point, with mixed weights. Its other attributes
    (e.g. `batch_first`, which a parent module may read) are read from `module`; its weights are not, since they
    differ per point."""

    def __init__(self, state: ViewState, stacked: dict[str, Tensor], constants: dict[str, Tensor], module: nn.Module,
                 pick: Callable[[Any], Tensor] | None = None):
        super().__init__(state, stacked)
        self.module = module
        self.constants = constants
        self.pick = pick  # applied to each point's output (the whole model's: `output=` of evaluate)
        # Tied parameters: functional_call takes one name per tied group (it ties the others to it), so a later
        # name of a group whose first name is stacked is left out (both hold the same mixed values)
        first_name: dict[int, str] = {}
        self.tied_copies = {name for name, p in module.named_parameters(remove_duplicate=False)
                            if first_name.setdefault(id(p), name) != name and first_name[id(p)] in stacked}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        names = list(kwargs)
        values, in_dims = zip(*(self._per_point(v) for v in (*args, *kwargs.values()))) if args or kwargs else ((), ())
        weights = {name: self.mixed(name) for name in self.stacked if name not in self.tied_copies}

        def one_point(point_weights: dict[str, Tensor], *point_values: Any) -> Any:
            point_args, point_kwargs = point_values[:len(args)], dict(zip(names, point_values[len(args):]))
            out = functional_call(self.module, (point_weights, self.constants), point_args, point_kwargs)
            return out if self.pick is None else self.pick(out)

        try:
            out = vmap(one_point, in_dims=(0, *in_dims))(weights, *values)
        except RuntimeError as error:
            if "vmap" not in str(error) and "Batching rule" not in str(error):
                raise
            out = _stack([one_point({n: w[p] for n, w in weights.items()},
                                    *(v if d is None else v[p] for v, d in zip(values, in_dims)))
                          for p in range(self.state.points)])
        return _fold(out)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            module = self._modules.get("module")
            if module is None:
                raise
            if name in module._parameters or name in module._buffers:
                raise AttributeError(f"{name!r} of {type(module).__name__} differs per point in the subspace view "
                                     "(the module runs per point with mixed weights)") from None
            return getattr(module, name)

    def _per_point(self, value: Any) -> tuple[Any, int | None]:
        """(value, None) to pass it to every point, or (value split per point, 0)."""
        state = self.state
        if not isinstance(value, Tensor) or value.dim() == 0:
            return value, None
        shared = state.shared_rows(value)
        if shared is not None:
            return shared[1], None
        folded = state.points * state.samples
        if value.shape[0] % folded == 0 and value.shape[0] > 0:
            return state.per_point(value), 0
        return value, None

    def materialised_bytes_per_point(self) -> int:
        return sum(t[0].numel() * t.element_size() for t in self.stacked.values())


def _stack(outputs: list[Any]) -> Any:
    """Per-point outputs -> one output with a leading point axis (tuples and dicts element by element)."""
    first = outputs[0]
    if isinstance(first, Tensor):
        return torch.stack(outputs)
    if isinstance(first, (tuple, list)):
        return type(first)(_stack([o[i] for o in outputs]) for i in range(len(first)))
    if isinstance(first, dict):
        return {key: _stack([o[key] for o in outputs]) for key in first}
    return first


def _fold(out: Any) -> Any:
    """[P, M, ...] -> [P·M, ...] for a tensor or each tensor of a tuple / list (None passes through)."""
    if out is None:
        return None
    if isinstance(out, Tensor):
        return out.reshape(-1, *out.shape[2:])
    if isinstance(out, (tuple, list)):
        return type(out)(_fold(o) for o in out)
    if isinstance(out, dict):
        return {key: _fold(value) for key, value in out.items()}
    raise TypeError(f"a module the view runs per point returned {type(out).__name__}; tensors and tuples, lists "
                    "or dicts of them are supported")


def contains_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())
