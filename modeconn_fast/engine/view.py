"""The subspace view: the user's own nn.Module, run for P points of a weight subspace in one pass.

A copy of the model in which Linear, Conv1d/2d, BatchNorm1d/2d, LayerNorm and Embedding are swapped for
layers that take their weights from a `Basis` and coefficient rows (DESIGN §2); other modules with
parameters run per point under vmap (`fallback.py`); everything else (activations, pooling, reshapes, the
model's own forward code) runs unchanged on activations whose batch axis holds P·N rows.

Before its first forward the view checks, on two points of a probe batch, that folding points into the batch
axis gives every point what it gives alone. A forward that moves or mixes the batch axis (transposes it,
concatenates or reduces along it) or reaches into a swapped layer fails that check; the view then warns and
runs the whole model per point under vmap, which is always right.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..subspace import Basis
from .attention import SubspaceMultiheadAttention, supports_attention
from .batchnorm import CollectionDone, SubspaceBatchNorm
from .conv_block import FusedSequential, fuse_blocks
from .fallback import FallbackModule, contains_batchnorm
from .outputs import ModelOutputError, OutputSelectionError, OutputSelector, pick_output
from .layers import (SubspaceConv, SubspaceEmbedding, SubspaceLayer, SubspaceLayerNorm, SubspaceLinear,
                     has_forward_hooks)
from .pooling import MaxPool2dFastCPU, faster_pooling
from .recurrent import SubspaceRecurrent, supports_recurrent
from .state import BatchNormPhase, ViewState
from .transformer import STAND_INS

Inputs = Tensor | Sequence[Tensor]
WHOLE_MODEL = "<the model itself>"

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
# Modules served whole, their submodules' tensors included ("out_proj.weight"), when `supports(module)`.
NATIVE_SUBTREES: dict[type, tuple[type[SubspaceLayer], Callable[[Any], bool]]] = {
    nn.MultiheadAttention: (SubspaceMultiheadAttention, supports_attention),
    nn.RNN: (SubspaceRecurrent, supports_recurrent),
    nn.GRU: (SubspaceRecurrent, supports_recurrent),
    nn.LSTM: (SubspaceRecurrent, supports_recurrent),
}


class SubspaceView(nn.Module):
    """`view(coeffs [P, K], inputs [N, ...]) -> outputs [P, N, ...]`: the model at P points of `basis`.

    In eval mode (the default) Dropout is off and BatchNorm follows `bn_phase` (see `batchnorm.py`). In train
    mode (`view.train()`, for training through the view) Dropout is on and every point normalises its batch
    with its own statistics. Gradients reach the basis tensors and the coefficient rows; `rebind` points the
    view at new basis tensors (e.g. a curve's control points after an optimiser step). `output` picks the tensor
    of a model that returns a tuple, dict or dataclass (see `outputs.py`).
    """

    def __init__(self, model: nn.Module, basis: Basis, output: OutputSelector = None):
        super().__init__()
        self.output = output
        self.state = ViewState()
        self.bn_phase: BatchNormPhase = "stored"
        self.fallback_names: list[str] = []
        self.reads_shared_rows_only: tuple[bool, ...] | None = None  # per input; set by `prepare`
        self._model, self._basis = model, basis
        self._bindings: list[tuple[SubspaceLayer, str]] = []  # every layer holding basis tensors, with its prefix
        self._held_inputs: dict[int, _HeldCopies | None] = {}  # per input: the copies of the last named batch
        self.net = self._convert(_frozen_copy(model), "", basis, {})
        if self.fallback_names == [WHOLE_MODEL]:
            own = [name for name, _ in model.named_parameters(recurse=False)]
            own += [name for name, b in model.named_buffers(recurse=False) if b is not None and b.is_floating_point()]
            warnings.warn(f"the model holds tensors of its own ({', '.join(own)}) that the view cannot fold over "
                          "points, so the whole model runs per point with vmap (correct, but slower). Move them into "
                          "a small submodule (e.g. one whose forward adds the position embedding): then only that "
                          "module runs per point", stacklevel=3)
        self.eval()

    def train(self, mode: bool = True) -> "SubspaceView":
        """Train mode: Dropout on, BatchNorm normalising each point's batch with its own statistics."""
        super().train(mode)
        self.bn_phase = "batch" if mode else "stored"
        return self

    def rebind(self, stacked: dict[str, Tensor]) -> None:
        """Use `stacked` (the same entries and shapes as the basis, e.g. tensors that record gradients) from
        the next forward on."""
        for layer, prefix in self._bindings:
            for name in layer.stacked:
                layer.stacked[name] = stacked[prefix + name]
            layer._cache.clear()  # outputs of the old tensors
        self._basis = Basis(stacked, self._basis.constants)

    def forward(self, coeffs: Tensor, inputs: Inputs, offset: int = 0, batch: Hashable | None = None) -> Tensor:
        """The outputs at the points `coeffs`, which are points offset … offset+P−1 of the whole evaluation
        (BatchNorm statistics are kept per point of the whole evaluation). `batch` names the batch of `inputs`
        when the same batch comes back for further chunks of points: layers then reuse what does not depend
        on the points (e.g. a first layer's products with the shared input)."""
        inputs = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
        if self.reads_shared_rows_only is None:
            self.prepare(coeffs, inputs)
        assert self.reads_shared_rows_only is not None
        repeated = self._repeated_inputs(inputs, coeffs.shape[0], batch)
        self.state.sources = inputs
        try:
            return self._run(coeffs, repeated, samples=inputs[0].shape[0], offset=offset, batch=batch,
                             phase=self.bn_phase)
        finally:
            self.state.sources = ()

    def _repeated_inputs(self, inputs: tuple[Tensor, ...], points: int, batch: Hashable | None) -> list[Tensor]:
        """Each input repeated for every point (`_repeat`). For a named batch the copies made for an earlier chunk
        of at least as many points are reused (a prefix of them), while neither the input nor they have changed."""
        assert self.reads_shared_rows_only is not None
        repeated = []
        for i, (x, rows_only) in enumerate(zip(inputs, self.reads_shared_rows_only)):
            held = self._held_inputs.get(i)
            if (batch is not None and held is not None and held.batch == batch and held.source is x
                    and held.source_version == x._version and held.copies._version == held.copies_version
                    and held.copies.shape[0] >= points * x.shape[0]):
                repeated.append(held.copies[: points * x.shape[0]])
                continue
            copies = _repeat(x, points, rows_only)
            self._held_inputs[i] = _HeldCopies(batch, x, x._version, copies, copies._version) if batch is not None else None
            repeated.append(copies)
        return repeated

    def _run(self, coeffs: Tensor, repeated: list[Tensor], *, samples: int, offset: int = 0,
             batch: Hashable | None = None, phase: BatchNormPhase = "stored") -> Tensor:
        points = coeffs.shape[0]
        state = self.state
        state.coeffs, state.samples, state.offset, state.batch, state.bn_phase = coeffs, samples, offset, batch, phase
        state.shared_inputs = [(r.data_ptr(), r.numel(), r._version) for r in repeated]
        try:
            out = self.net(*repeated)
        finally:
            state.shared_inputs, state.lookups = [], []
        if self.fallback_names != [WHOLE_MODEL]:  # the whole-model fallback picks per point
            out = pick_output(out, self.output)
        if out.dim() == 0 or out.shape[0] != points * samples:
            raise ModelOutputError(f"the model's output{'' if self.output is None else f' (output={self.output!r})'} "
                                   f"must have the batch axis first (e.g. logits [N, classes]); got shape "
                                   f"{tuple(out.shape)} for a batch of {samples}")
        return out.reshape(points, samples, *out.shape[1:])

    # --- checks on a probe batch -----------------------------------------------------------------------------
    def prepare(self, coeffs: Tensor, inputs: Inputs) -> None:
        """Once, on two points and two samples of a probe batch: (1) points folded into the batch axis must
        each give what they give alone, else the whole model runs per point under vmap; (2) which inputs are
        read only by native layers (then only one copy of them is written). A Sequential of the view's own
        layers and of modules that treat each sample alone needs no probe (`_sequential_reads_shared_rows`)."""
        inputs = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
        known = _sequential_reads_shared_rows(self.net, inputs)
        if known is not None:
            self.reads_shared_rows_only = (known,)
            return
        probe = tuple(x[:2] for x in inputs)
        two = _two_points(coeffs.detach())
        training, phase = self.training, self.bn_phase
        self.eval()
        try:
            self._check_folding(coeffs.detach(), two, probe)
        finally:
            self.train(training)
            self.bn_phase = phase

    def _check_folding(self, coeffs: Tensor, two: Tensor, probe: tuple[Tensor, ...]) -> None:
        with torch.no_grad():
            problem = self._folding_problem(two, probe)
            if problem is not None and self.fallback_names != [WHOLE_MODEL]:
                warnings.warn(f"{problem}; running the whole model per point with vmap instead (slower)", stacklevel=5)
                self.net = FallbackModule(self.state, dict(self._basis.stacked), dict(self._basis.constants),
                                          _frozen_copy(self._model), pick=lambda out: pick_output(out, self.output))
                self._bindings = [(self.net, "")]
                self.fallback_names = [WHOLE_MODEL]
                problem = self._folding_problem(two, probe)
            if problem is not None:
                raise RuntimeError(f"the model cannot be evaluated at several points at once: {problem}")
            self.reads_shared_rows_only = self._shared_rows_only(coeffs[:1].expand(2, -1), probe)

    def _folding_problem(self, points: Tensor, probe: tuple[Tensor, ...]) -> str | None:
        """None if running both points together equals running each alone, else what went wrong."""
        samples = probe[0].shape[0]
        try:
            together = self._run(points, [_repeat(x, 2, False) for x in probe], samples=samples)
            alone = [self._run(points[i:i + 1], list(probe), samples=samples) for i in range(2)]
        except OutputSelectionError:
            raise  # the model's own output, whatever runs it
        except ModelOutputError as error:
            if self.fallback_names == [WHOLE_MODEL]:  # the model's own output, not the view's doing
                raise
            return f"its output came out of the subspace view in another shape ({error})"
        except (AttributeError, TypeError, RuntimeError, StopIteration, ValueError, IndexError) as error:
            return f"its forward failed in the subspace view ({type(error).__name__}: {error})"
        for i in range(2):
            scale = float(alone[i].abs().nan_to_num(0, 0, 0).max()) + 1.0
            tolerance = scale * torch.finfo(together.dtype).eps ** 0.5 if together.is_floating_point() else 0.0
            difference = (together[i] - alone[i][0]).abs().nan_to_num(0, 0, 0)
            if not (difference.max() <= tolerance and torch.equal(together[i].isnan(), alone[i][0].isnan())):
                return "its forward mixes samples along the batch axis (several points give other outputs together " \
                       "than alone; keep the batch axis first and do not mix samples along it to get the fast path)"
        return None

    def _shared_rows_only(self, points: Tensor, probe: tuple[Tensor, ...]) -> tuple[bool, ...]:
        """For each input: does the model read only the first copy of it (every consumer a native layer that
        uses its shared rows)? Then the other P − 1 copies need not be written. Tested by running two equal
        points with the second copy replaced by noise: the outputs must not change."""
        samples = probe[0].shape[0]
        truth = self._run(points, [_repeat(x, 2, False) for x in probe], samples=samples)
        answers = []
        for i, x in enumerate(probe):
            if not torch.is_floating_point(x):
                answers.append(False)
                continue
            noisy = [_repeat(y, 2, False) for y in probe]
            noisy[i][samples:] = torch.randn_like(x) * 3 + 1
            answers.append(bool(torch.equal(self._run(points, noisy, samples=samples), truth)))
        return tuple(answers)

    # --- BatchNorm -------------------------------------------------------------------------------------------
    def batchnorm_layers(self) -> list[SubspaceBatchNorm]:
        return [m for m in self.net.modules() if isinstance(m, SubspaceBatchNorm)]

    def has_batch_statistics(self) -> bool:
        """Whether some BatchNorm normalises with each batch's own statistics (no running statistics)."""
        return any(not layer.tracks_statistics for layer in self.batchnorm_layers())

    def batchnorm_in_fallback(self) -> list[str]:
        """Names of modules run under vmap that contain BatchNorm (their statistics cannot be recomputed)."""
        return [name or WHOLE_MODEL for name, m in self.net.named_modules()
                if isinstance(m, FallbackModule) and contains_batchnorm(m.module)]

    def recompute_batchnorm(self, coeffs: Tensor, batches: Iterable[Inputs], chunks: Sequence[slice] | None = None) -> None:
        """One pass over `batches` in train-mode BatchNorm, chunk by chunk of points (all at once by default):
        every point of `coeffs` gets its own statistics. Each batch is read once, for all chunks. After the first
        forward each one stops once the last BatchNorm layer has its statistics."""
        chunks = chunks or [slice(0, coeffs.shape[0])]
        self.start_batchnorm_collection(coeffs.shape[0])
        try:
            for index, inputs in enumerate(batches):
                self.collect_batchnorm(coeffs, inputs, chunks, ("bn_data", index))
        except BaseException:
            self._end_collection()  # the stored statistics stay in use
            raise
        self.finish_batchnorm_collection()

    def start_batchnorm_collection(self, points: int) -> None:
        """`recompute_batchnorm` in steps: this, `collect_batchnorm` for every batch, `finish_batchnorm_collection`."""
        for layer in self.batchnorm_layers():
            layer.start_collection(points)
        self.bn_phase = "collect"

    def collect_batchnorm(self, coeffs: Tensor, inputs: Inputs, chunks: Sequence[slice], batch: Hashable) -> None:
        """The statistics of one batch (named `batch`) accumulated for every chunk of points of `coeffs`."""
        state = self.state
        for chunk in chunks:
            state.collected = 0
            try:
                self(coeffs[chunk], inputs, offset=chunk.start, batch=batch)
            except CollectionDone:  # the forward stopped after the last statistics (known after the first)
                pass
            state.collections_per_forward = state.collected

    def finish_batchnorm_collection(self) -> None:
        self._end_collection()
        for layer in self.batchnorm_layers():
            layer.finish_collection()
        self.bn_phase = "recomputed"

    def _end_collection(self) -> None:
        self.bn_phase = "stored"
        self.state.collections_per_forward = None

    def use_stored_batchnorm(self) -> None:
        self.bn_phase = "stored"

    def lane_copy(self) -> "SubspaceView":
        """Another view of the same model and basis tensors, with its own state, BatchNorm statistics and caches: one
        per thread that runs other points at the same time (`lanes.py`). It keeps this view's probe outcome."""
        if self.fallback_names:
            raise ValueError("a view with modules run per point under vmap has no lane copies")
        copy = SubspaceView(self._model, self._basis, output=self.output)
        copy.state.plain = self.state.plain
        copy.reads_shared_rows_only = self.reads_shared_rows_only
        return copy

    def recomputed_batchnorm_state(self) -> dict[str, Tensor]:
        """The running statistics `recompute_batchnorm` gave every point, as state-dict entries of the model with
        a leading point axis (`"<module>.running_mean"`, `"<module>.running_var"`: [P, C]); {} before any."""
        state = {}
        for layer, prefix in self._bindings:  # the model's own names (a ConvBlock holds its layers under others)
            if isinstance(layer, SubspaceBatchNorm) and layer.recomputed is not None:
                state[prefix + "running_mean"], state[prefix + "running_var"] = layer.recomputed
        return state

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
        plain, self.state.plain = self.state.plain, True  # every layer's output seen (fast paths hold as much)
        try:
            with torch.no_grad():
                self(coeffs[:1], [x[:1] for x in inputs])
        finally:
            self.state.plain = plain
            for hook in hooks:
                hook.remove()
        input_bytes = sum(x[:1].numel() * x.element_size() for x in inputs)
        return max(largest[0], input_bytes)

    # --- construction ----------------------------------------------------------------------------------------
    def _convert(self, module: nn.Module, prefix: str, basis: Basis, done: dict[int, nn.Module]) -> nn.Module:
        """The view's stand-in for `module` (named `prefix`); a module reached under several names is
        converted once (`done`, by identity)."""
        if id(module) in done:
            return done[id(module)]
        native = _native_layer(module)
        subtree = _native_subtree(module)
        if native is not None:
            converted: nn.Module = native(self.state, _entries(basis.stacked, prefix, direct=True), module)
            self._bindings.append((converted, prefix))
        elif subtree is not None:
            converted = subtree(self.state, _entries(basis.stacked, prefix, direct=False), module)
            self._bindings.append((converted, prefix))
        elif (pooling := faster_pooling(module)) is not None:
            converted = pooling
        elif _needs_fallback(module, prefix, basis):
            self.fallback_names.append(prefix.rstrip(".") or WHOLE_MODEL)
            converted = FallbackModule(self.state, _entries(basis.stacked, prefix, direct=False),
                                       _entries(basis.constants, prefix, direct=False), module)
            self._bindings.append((converted, prefix))
        else:
            _load_fixed_buffers(module, prefix, basis)
            for name, child in list(module._modules.items()):
                if child is not None:
                    module._modules[name] = self._convert(child, f"{prefix}{name}.", basis, done)
            stand_in = STAND_INS.get(type(module))
            converted = stand_in(module) if stand_in is not None and not has_forward_hooks(module) else module
            if type(converted) is nn.Sequential and not has_forward_hooks(converted):
                converted = fuse_blocks(converted)
        done[id(module)] = converted
        return converted


@dataclass
class _HeldCopies:
    """An input's copies for every point, kept while the chunks of one named batch run (`_repeated_inputs`); the
    source is held, so no other tensor can take its place at its address."""

    batch: Hashable
    source: Tensor
    source_version: int
    copies: Tensor
    copies_version: int


# Modules (exact types) that compute each sample's rows from that sample's rows alone, whatever the batch size.
PER_SAMPLE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Identity,
                      nn.Dropout, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, MaxPool2dFastCPU)


def _sequential_reads_shared_rows(net: nn.Module, inputs: tuple[Tensor, ...]) -> bool | None:
    """For a converted nn.Sequential made only of the view's layers, per-sample modules and Flatten from dim 1,
    without hooks: what the probe would find, without running it. Such a model keeps every point's rows apart
    by construction, and reads only the first copy of its input when its first layer is a Linear or a
    zero-padded convolution fed a floating-point input. None for any other model (the probe decides)."""
    if type(net) not in (nn.Sequential, FusedSequential) or len(net) == 0 or len(inputs) != 1:
        return None
    for module in net.modules():
        if has_forward_hooks(module):
            return None
    for module in net:
        per_sample = type(module) in PER_SAMPLE_MODULES and not getattr(module, "return_indices", False)
        native = isinstance(module, (SubspaceLinear, SubspaceConv, SubspaceBatchNorm, SubspaceLayerNorm))
        if not (per_sample or native or type(module) is nn.Flatten and module.start_dim >= 1):
            return None
    first = net[0]
    zero_padded = isinstance(first, SubspaceConv) and first.pre_padding is None
    return torch.is_floating_point(inputs[0]) and (isinstance(first, SubspaceLinear) or zero_padded)


def _frozen_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).eval().requires_grad_(False)


def _two_points(coeffs: Tensor) -> Tensor:
    """Two different rows of `coeffs` (points being evaluated), or a second point made from the first."""
    different = (coeffs != coeffs[:1]).any(dim=1).nonzero()
    if len(different):
        return torch.stack([coeffs[0], coeffs[int(different[0])]])
    return torch.stack([coeffs[0], coeffs[0] * 0.5])


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


def _native_subtree(module: nn.Module) -> type[SubspaceLayer] | None:
    """The layer serving `module` with its whole subtree, if its type is known, it supports the module's options
    and nothing in the subtree is hooked or parametrized."""
    entry = NATIVE_SUBTREES.get(type(module))
    if entry is None or not entry[1](module):
        return None
    if any(has_forward_hooks(m) or parametrize.is_parametrized(m) for m in module.modules()):
        return None
    return entry[0]


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
