"""The subspace view: the user's own nn.Module, run for P points of a weight subspace in one pass.

A copy of the model in which Linear, Conv1d/2d, BatchNorm1d/2d, LayerNorm and Embedding are swapped for
layers that take their weights from a `Basis` and coefficient rows (DESIGN §2); other modules with
parameters run per point under vmap (`fallback.py`); everything else (activations, pooling, reshapes, the
model's own forward code) runs unchanged on activations whose batch axis holds P·N rows.
"""
from __future__ import annotations

import copy
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..subspace import Basis
from .batchnorm import SubspaceBatchNorm
from .fallback import FallbackModule, contains_batchnorm
from .layers import SubspaceConv, SubspaceEmbedding, SubspaceLayer, SubspaceLayerNorm, SubspaceLinear
from .pooling import faster_pooling
from .state import BatchNormPhase, ViewState

Inputs = Tensor | Sequence[Tensor]

# Exact types only: a subclass may override forward.
NATIVE_LAYERS: dict[type, type[SubspaceLayer]] = {
    nn.Linear: SubspaceLinear,
    nn.Conv1d: SubspaceConv,
    nn.Conv2d: SubspaceConv,
    nn.BatchNorm1d: SubspaceBatchNorm,
    nn.BatchNorm2d: SubspaceBatchNorm,
    nn.LayerNorm: SubspaceLayerNorm,
    nn.Embedding: SubspaceEmbedding,
}
_NATIVE_PARAMETERS = {"weight", "bias"}


class SubspaceView(nn.Module):
    """`view(coeffs [P, K], inputs [N, ...]) -> outputs [P, N, ...]`: the model at P points of `basis`."""

    def __init__(self, model: nn.Module, basis: Basis):
        super().__init__()
        self.state = ViewState()
        self.bn_phase: BatchNormPhase = "stored"  # each forward copies it into the state
        self.fallback_names: list[str] = []
        self.reads_shared_rows_only: tuple[bool, ...] | None = None  # per input, found by a probe on first use
        self.net = self._convert(copy.deepcopy(model).eval().requires_grad_(False), "", basis)

    def forward(self, coeffs: Tensor, inputs: Inputs, offset: int = 0) -> Tensor:
        """The outputs at the points `coeffs`, which are points offset … offset+P−1 of the whole evaluation
        (BatchNorm statistics are kept per point of the whole evaluation)."""
        inputs = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
        if self.reads_shared_rows_only is None:
            self.reads_shared_rows_only = self._probe_shared_rows_only(coeffs, inputs)
        repeated = [_repeat(x, coeffs.shape[0], rows_only) for x, rows_only in zip(inputs, self.reads_shared_rows_only)]
        self.state.inputs = inputs
        self.state.input_key = tuple((x.data_ptr(), tuple(x.shape), x.stride(), x._version) for x in inputs)
        return self._run(coeffs, inputs[0].shape[0], repeated, offset, self.bn_phase)

    def _run(self, coeffs: Tensor, samples: int, repeated: list[Tensor], offset: int, phase: BatchNormPhase) -> Tensor:
        points = coeffs.shape[0]
        state = self.state
        state.coeffs, state.samples, state.offset, state.bn_phase = coeffs, samples, offset, phase
        state.shared_inputs = [(r.data_ptr(), r.numel(), r._version) for r in repeated]
        try:
            out = self.net(*repeated)
        finally:
            state.shared_inputs = []
        if not isinstance(out, Tensor) or out.dim() == 0 or out.shape[0] != points * samples:
            raise TypeError("the model must return one tensor with the batch axis first (e.g. logits [N, classes]); "
                            "wrap a model that returns a tuple or dict so that it returns that tensor")
        return out.reshape(points, samples, *out.shape[1:])

    def _probe_shared_rows_only(self, coeffs: Tensor, inputs: tuple[Tensor, ...]) -> tuple[bool, ...]:
        """For each input: does the model read only the first copy of it (every consumer a native layer that
        uses its shared rows)? Then the other P − 1 copies need not be written. Tested by running two equal
        points with the second copy replaced by noise: the outputs must not change."""
        points = coeffs[:1].expand(2, -1)
        probe = [x[:2] for x in inputs]
        self.state.inputs, self.state.input_key = (), ()  # no caching across these runs
        with torch.no_grad():
            truth = self._run(points, probe[0].shape[0], [_repeat(x, 2, False) for x in probe], 0, "stored")
            answers = []
            for i, x in enumerate(probe):
                if not torch.is_floating_point(x):
                    answers.append(False)
                    continue
                noisy = [_repeat(y, 2, False) for y in probe]
                noisy[i][x.shape[0]:] = torch.randn_like(x) * 3 + 1
                answers.append(bool(torch.equal(self._run(points, x.shape[0], noisy, 0, "stored"), truth)))
        return tuple(answers)

    # --- BatchNorm -------------------------------------------------------------------------------------------
    def batchnorm_layers(self) -> list[SubspaceBatchNorm]:
        return [m for m in self.net.modules() if isinstance(m, SubspaceBatchNorm)]

    def batchnorm_in_fallback(self) -> list[str]:
        """Names of modules run under vmap that contain BatchNorm (their statistics cannot be recomputed)."""
        return [name for name, m in self.net.named_modules() if isinstance(m, FallbackModule) and contains_batchnorm(m.module)]

    def recompute_batchnorm(self, coeffs: Tensor, batches: Iterable[Inputs], chunk: int | None = None) -> None:
        """One pass over `batches` in train-mode BatchNorm, `chunk` points at a time (all by default): every
        point of `coeffs` gets its own statistics. Each batch is read once, for all chunks."""
        points = coeffs.shape[0]
        chunk = chunk or points
        layers = self.batchnorm_layers()
        for layer in layers:
            layer.start_collection(points)
        self.bn_phase = "collect"
        try:
            for inputs in batches:
                for start in range(0, points, chunk):
                    self(coeffs[start:start + chunk], inputs, offset=start)
        finally:
            self.bn_phase = "stored"
        for layer in layers:
            layer.finish_collection()
        self.bn_phase = "recomputed"

    def use_stored_batchnorm(self) -> None:
        self.bn_phase = "stored"

    # --- memory ----------------------------------------------------------------------------------------------
    def materialised_bytes_per_point(self) -> int:
        """The largest combined weights one point may need at a time (layers run one after another)."""
        sizes = [m.materialised_bytes_per_point() for m in self.net.modules() if isinstance(m, SubspaceLayer)]
        return max(sizes, default=0)

    def activation_bytes_per_sample(self, coeffs: Tensor, inputs: Inputs) -> int:
        """Bytes of the largest activation of one point and one sample, measured by running one of each."""
        largest = [0]

        def record(_module: nn.Module, _args: object, out: object) -> None:
            if isinstance(out, Tensor):
                largest[0] = max(largest[0], out.numel() * out.element_size())

        inputs = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
        hooks = [m.register_forward_hook(record) for m in self.net.modules()]
        try:
            with torch.no_grad():
                self(coeffs[:1], [x[:1] for x in inputs])
        finally:
            for hook in hooks:
                hook.remove()
        input_bytes = sum(x[:1].numel() * x.element_size() for x in inputs)
        return max(largest[0], input_bytes)

    # --- construction ----------------------------------------------------------------------------------------
    def _convert(self, module: nn.Module, prefix: str, basis: Basis) -> nn.Module:
        native = _native_layer(module)
        if native is not None:
            return native(self.state, _entries(basis.stacked, prefix, direct=True), module)
        pooling = faster_pooling(module)
        if pooling is not None:
            return pooling
        if _needs_fallback(module, prefix, basis):
            self.fallback_names.append(prefix.rstrip(".") or "<the model itself>")
            return FallbackModule(self.state, _entries(basis.stacked, prefix, direct=False),
                                  _entries(basis.constants, prefix, direct=False), module)
        _load_fixed_buffers(module, prefix, basis)
        for name, child in list(module.named_children()):
            module._modules[name] = self._convert(child, f"{prefix}{name}.", basis)
        return module


def _repeat(x: Tensor, points: int, first_copy_only: bool) -> Tensor:
    """[N, ...] -> a new [P·N, ...], point-major; with `first_copy_only` the other copies are left unwritten."""
    if not first_copy_only:
        return x.repeat(points, *([1] * (x.dim() - 1)))
    repeated = x.new_empty(points * x.shape[0], *x.shape[1:])
    repeated[: x.shape[0]] = x
    return repeated


def _native_layer(module: nn.Module) -> type[SubspaceLayer] | None:
    layer = NATIVE_LAYERS.get(type(module))
    if layer is None or module._forward_hooks or module._forward_pre_hooks or parametrize.is_parametrized(module):
        return None
    if not set(module._parameters) <= _NATIVE_PARAMETERS:
        return None
    if isinstance(module, nn.Embedding) and module.max_norm is not None:  # renormalises its weight in place
        return None
    return layer


def _needs_fallback(module: nn.Module, prefix: str, basis: Basis) -> bool:
    """Unknown modules with their own parameters, or with float buffers that differ between basis members."""
    if parametrize.is_parametrized(module) or any(p is not None for p in module._parameters.values()):
        return True
    for name in module._buffers:
        stacked = basis.stacked.get(prefix + name)
        if stacked is not None and not bool((stacked == stacked[:1]).all()):
            return True
    return False


def _load_fixed_buffers(module: nn.Module, prefix: str, basis: Basis) -> None:
    """Buffers equal in every basis member (or integer ones) take the basis's value, not the model's."""
    for name, buffer in module._buffers.items():
        value = basis.stacked[prefix + name][0] if prefix + name in basis.stacked else basis.constants.get(prefix + name)
        if buffer is not None and value is not None:
            buffer.copy_(value)


def _entries(tensors: dict[str, Tensor], prefix: str, *, direct: bool) -> dict[str, Tensor]:
    """Entries under `prefix`, renamed relative to it; with `direct`, only the module's own (no dots left)."""
    picked = {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}
    return {name: t for name, t in picked.items() if not direct or "." not in name}
