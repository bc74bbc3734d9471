"""Modules the view does not know: their weights are materialised per point and run with vmap.

Any module with parameters (or point-dependent buffers) whose type the view has no native layer for runs as
`torch.func.vmap` over the point axis of `torch.func.functional_call(module, θ(p), inputs[p])`, its whole
subtree included. Correct for any module vmap can trace; slower than the native layers.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.func import functional_call, vmap

from .layers import SubspaceLayer
from .state import ViewState


class FallbackModule(SubspaceLayer):
    """Runs `module` (a subtree of the user's model) once per point under vmap, with mixed weights."""

    def __init__(self, state: ViewState, stacked: dict[str, Tensor], constants: dict[str, Tensor], module: nn.Module):
        super().__init__(state, stacked)
        self.module = module
        self.constants = constants

    def forward(self, *args: Any) -> Any:
        state = self.state
        folded = state.points * state.samples
        inputs, in_dims = [], []
        for arg in args:
            shared = state.shared_rows(arg) if isinstance(arg, Tensor) else None
            if shared is not None:
                inputs.append(shared)
                in_dims.append(None)
            elif isinstance(arg, Tensor) and arg.dim() > 0 and arg.shape[0] == folded:
                inputs.append(state.unfold(arg))
                in_dims.append(0)
            else:
                inputs.append(arg)
                in_dims.append(None)
        weights = {name: self.mixed(name) for name in self.stacked}

        def one_point(point_weights: dict[str, Tensor], *point_inputs: Any) -> Any:
            return functional_call(self.module, (point_weights, self.constants), point_inputs)

        return _fold(vmap(one_point, in_dims=(0, *in_dims))(weights, *inputs))

    def materialised_bytes_per_point(self) -> int:
        return sum(t[0].numel() * t.element_size() for t in self.stacked.values())


def _fold(out: Any) -> Any:
    """[P, N, ...] -> [P·N, ...] for a tensor or each tensor of a tuple / list."""
    if isinstance(out, Tensor):
        return out.reshape(-1, *out.shape[2:])
    if isinstance(out, (tuple, list)):
        return type(out)(_fold(o) for o in out)
    raise TypeError(f"a module the view runs with vmap returned {type(out).__name__}; tensors or tuples are supported")


def contains_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())

