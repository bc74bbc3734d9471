"""`evaluate`: per-point metrics of many points of a weight subspace, through the user's own model.

    metrics[p] = metric( model with weights θ(p) = Σ_k coeffs[p,k] θ_k , data )

All points of a chunk run in one pass of the subspace view; chunks of points (and batches of a tensor
dataset) are sized so that activations and combined weights fit `memory_budget`.
"""
from __future__ import annotations

import itertools
import warnings
from contextlib import nullcontext
from typing import Any, Iterator, Literal, Mapping, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..memory import keep_freed_memory
from ..ops import mix
from ..subspace import Basis, StateLike, as_basis
from . import compiled_cpu
from .batches import Batches, move
from .chunks import plan_chunks
from .conv_block import ConvBlock, FusedSequential
from .conv_metrics import ConvMetrics
from .lanes import lane_shares, run_in_lanes
from .metrics import LossFn, MetricFn, MetricSpec, MetricSums, check_metrics
from .mlp_metrics import FusedMlpMetrics
from .outputs import OutputSelector
from .view import SubspaceView

BatchNormMode = Literal["auto", "recompute", "eval"]
# Lanes at most: the Python between the ops holds the GIL, about a fifth of a lane's time (B3 on one thread), so
# beyond about four lanes they would queue for it (measured on 2 cores only; more threads are shared among the lanes).
MAX_LANES = 4


class Evaluation(dict):
    """Per-point metrics by name, e.g. `{"loss": Tensor[P], "error": Tensor[P]}` (float64), and how BatchNorm ran:
    `bn_mode` is "recompute", "eval" or "none" (the model has no BatchNorm)."""

    def __init__(self, values: dict[str, Tensor], bn_mode: str):
        super().__init__(values)
        self.bn_mode = bn_mode

    def __repr__(self) -> str:
        return f"Evaluation({dict.__repr__(self)}, bn_mode={self.bn_mode!r})"


def evaluate(
    model: nn.Module,
    basis: Basis | Sequence[StateLike],
    coeffs: Tensor,
    data: Any,
    *,
    loss_fn: LossFn | None = None,
    metrics: Sequence[MetricSpec] = ("loss", "error"),
    bn: BatchNormMode = "auto",
    bn_data: Any = None,
    memory_budget: int | None = None,
    progress: bool | None = None,
    output: OutputSelector = None,
    fast: bool = True,
) -> Evaluation:
    """Metrics (loss and error by default) of the model at every point θ(p) = Σ_k coeffs[p,k] basis[k].

    model: the architecture (any nn.Module; its own weights are not used). basis: K models or state dicts
    of that architecture, or a `Basis`. coeffs: [P, K]. data: `(inputs, targets)` tensors or an iterable of
    such batches; or a dict of them by name (e.g. {"train": ..., "test": ...}), evaluated in the same pass
    over the points, with results named "train_loss", "test_error", ... loss_fn: per-target losses
    (reduction='none') or a mean; default cross-entropy. metrics: any of "loss", "error", "nll", "brier", "ece"
    (see `metrics.py`) and custom `(name, fn)` pairs, fn(outputs [N, ...], targets) -> Tensor[N] one value per
    sample (averaged over all samples); each over all batches, in float64. bn: "recompute" (statistics from `bn_data` for
    every point), "eval" (mix the stored statistics) or "auto" (recompute when the model has BatchNorm and
    `bn_data` is given). memory_budget: bytes for the chunks of points in flight (one, or one per lane: see
    `lanes.py`; default 1 GiB on CPU, a quarter of the free memory on GPU). progress: show a progress bar (default:
    when the work lasts more than a second).
    output: for a model that returns a tuple, dict or dataclass, which part holds the logits: an index, a key
    (or field name), or a callable given the output. The basis members' floating dtypes must be the model's.
    fast: take the fast paths where they apply (fused conv and linear blocks, one-pass cross-entropy and arg-max
    for fewer than 16 classes, a CNN's points in lanes on several threads: `lanes.py`); False runs every layer's and
    metric's plain torch path, in one lane (the reference the fast paths are tested against; for debugging: the
    results agree to float rounding).
    """
    basis = as_basis(basis, model)
    device = _device_of(basis)
    coeffs = _check_coeffs(coeffs, basis, device)
    metrics = check_metrics(metrics)
    datasets = _named_datasets(data)
    broken = basis.nonfinite_members()
    view = SubspaceView(model, basis.with_nonfinite_zeroed() if broken else basis, output=output)
    view.state.plain = not fast
    view.prepare(coeffs, move(_first_rows(datasets), device))
    bn_mode = batchnorm_mode(bn, view, bn_data)
    if bn_mode == "eval":
        _warn_of_negative_variances(view, coeffs)
    bn_batches = Batches(bn_data, "bn_data", targets_optional=True) if bn_mode == "recompute" else None
    chunks = plan_chunks(view, coeffs, list(datasets.values()), bn_batches, memory_budget, device)
    lanes = _lane_count(view, len(chunks), device, metrics, loss_fn)
    if lanes > 1:  # each lane's chunks planned in its share of the memory budget
        chunks = plan_chunks(view, coeffs, list(datasets.values()), bn_batches, memory_budget, device, lanes)
    if bn_batches is not None and fast:  # the same batches of the same rows: their first layers' outputs reused
        for batches in datasets.values():
            batches.align_with(bn_batches)

    shares = [_Share(view if lane == 0 else view.lane_copy(), coeffs, points, share_chunks, list(datasets), metrics,
                     device, loss_fn, fast)
              for lane, (points, share_chunks) in enumerate(lane_shares(chunks, lanes))]
    sources = [*datasets.values(), *([bn_batches] if bn_batches is not None else [])]
    known = all(source.has_length() for source in sources)
    total = sum(len(source) for source in sources) if known else None
    bar = tqdm(total=total, desc="evaluate", unit="batch", delay=0.0 if progress else 1.0, disable=progress is False,
               leave=False)
    if device.type == "cpu":
        keep_freed_memory()
    with torch.no_grad(), bar, compiled_cpu.counting() if device.type == "cpu" else nullcontext():
        run_in_lanes(shares, _batches_in_order(datasets, bn_batches, device, bar))
    results = [share.results() for share in shares]
    values = {column: torch.cat([result[column] for result in results]) for column in results[0]}
    if broken:  # points that use a member with NaN or ±inf weights
        uses_broken = (coeffs[:, broken] != 0).any(dim=1)
        values = {name: torch.where(uses_broken, torch.full_like(v, float("nan")), v) for name, v in values.items()}
    return Evaluation(values, bn_mode)


class _Share:
    """The points `points` of an evaluation with their own view, chunks (from the share's first point), metric sums
    and fused metric paths: one lane (`lanes.py`), fed the batches in order (`_batches_in_order`)."""

    def __init__(self, view: SubspaceView, coeffs: Tensor, points: slice, chunks: list[slice], names: list[str],
                 metrics: dict[str, MetricFn | None], device: torch.device, loss_fn: LossFn | None, fast: bool):
        self.view, self.coeffs, self.chunks = view, coeffs[points], chunks
        self.sums = {name: MetricSums(metrics, self.coeffs.shape[0], device, loss_fn, fast) for name in names}
        self.fused = {name: FusedMlpMetrics.of(view, sums, device) for name, sums in self.sums.items()}
        self.tails = {name: ConvMetrics.of(view, sums, device) for name, sums in self.sums.items()}
        view.use_stored_batchnorm()

    def __call__(self, item: tuple) -> None:
        view, coeffs = self.view, self.coeffs
        if item[0] == "collect":  # ("collect", batch name, inputs): BatchNorm statistics of every chunk
            if view.bn_phase != "collect":
                view.start_batchnorm_collection(coeffs.shape[0])
            view.collect_batchnorm(coeffs, item[2], self.chunks, item[1])
        elif item[0] == "collected":
            if view.bn_phase != "collect":  # bn_data gave no batch: the layers say so
                view.start_batchnorm_collection(coeffs.shape[0])
            view.finish_batchnorm_collection()
        else:  # ("evaluate", dataset name, batch name, inputs, targets): read once, for all chunks of points
            _, name, batch, inputs, targets = item
            sums, mlp, tail = self.sums[name], self.fused[name], self.tails[name]
            if mlp is not None and mlp.add(coeffs, inputs, targets, batch, sums):
                return  # one compiled pass over all points
            for chunk in self.chunks:
                if tail is not None:  # the last conv block straight to the metrics where it can
                    tail.add(view, coeffs[chunk], inputs, targets, chunk.start, batch, sums)
                else:
                    outputs = view(coeffs[chunk], inputs, offset=chunk.start, batch=batch)
                    sums.add(outputs, targets, chunk.start)

    def results(self) -> dict[str, Tensor]:
        """Per-point metrics of the share's points by column name ("loss", or "train_loss" for a named dataset)."""
        return {f"{name}_{metric}" if name else metric: value
                for name, sums in self.sums.items() for metric, value in sums.result().items()}


def _batches_in_order(datasets: dict[str, Batches], bn_batches: Batches | None, device: torch.device,
                      bar: tqdm) -> Iterator[tuple]:
    """What every share runs, in order: the BatchNorm batches (if recomputed) and their end, then every dataset's
    batches, each named once."""
    if bn_batches is not None:
        for index, (inputs, _) in enumerate(bn_batches):
            yield "collect", ("bn_data", index), move(inputs, device)
            bar.update()
        yield ("collected",)
    batch_names = itertools.count()
    for name, batches in datasets.items():
        for inputs, targets in batches:
            yield "evaluate", name, next(batch_names), move(inputs, device), targets.to(device, non_blocking=True)
            bar.update()


def _lane_count(view: SubspaceView, chunks: int, device: torch.device, metrics: dict[str, MetricFn | None],
                loss_fn: LossFn | None) -> int:
    """How many lanes (`lanes.py`) run the points: one per intra-op thread (at most MAX_LANES) on CPU for a CNN of
    the view's conv blocks (where lanes measured faster on a busy machine; `lanes.py` has the numbers), with its
    fast paths, the built-in metrics and loss (a user's function may not be safe to call from two threads at once),
    outside autocast (thread-local: the lanes' threads would not see it), and no more lanes than the `chunks` of
    points one lane would run (more would split chunks and add forwards, each with its Python: on a quiet machine
    two lanes of B3's 11 points took 62 ms against 45 ms in one); else 1."""
    threads = torch.get_num_threads()
    if (device.type != "cpu" or threads < 2 or view.state.plain or view.fallback_names or loss_fn is not None
            or any(fn is not None for fn in metrics.values()) or torch.is_autocast_enabled("cpu")):
        return 1
    if not any(isinstance(step, ConvBlock) for m in view.net.modules() if isinstance(m, FusedSequential)
               for step in m.steps):
        return 1
    return max(1, min(threads, MAX_LANES, chunks))


def _first_rows(datasets: dict[str, Batches]) -> Any:
    """A few rows of the first batch: the probe the view checks itself on."""
    inputs = next(iter(datasets.values())).first[0]
    return inputs[:2] if isinstance(inputs, Tensor) else tuple(x[:2] for x in inputs)


def _named_datasets(data: Any) -> dict[str, Batches]:
    """One dataset (named "") or a dict of datasets by name."""
    if isinstance(data, Mapping):
        if not data:
            raise ValueError("data is an empty dict: name at least one dataset")
        return {str(name): Batches(value, f"data[{name!r}]") for name, value in data.items()}
    return {"": Batches(data, "data")}


def _device_of(basis: Basis) -> torch.device:
    for tensor in basis.stacked.values():
        return tensor.device
    return torch.device("cpu")


def _check_coeffs(coeffs: Tensor, basis: Basis, device: torch.device) -> Tensor:
    coeffs = torch.as_tensor(coeffs)
    if coeffs.dim() != 2 or coeffs.shape[1] != basis.size:
        raise ValueError(f"coeffs must have shape [points, {basis.size}] (one column per basis member), "
                         f"got {tuple(coeffs.shape)}")
    if coeffs.shape[0] == 0:
        raise ValueError("coeffs has no rows: there are no points to evaluate")
    if coeffs.is_floating_point() and not bool(torch.isfinite(coeffs).all()):
        rows = (~torch.isfinite(coeffs)).any(dim=1).nonzero().flatten().tolist()
        shown = ", ".join(map(str, rows[:10])) + (f" and {len(rows) - 10} more" if len(rows) > 10 else "")
        raise ValueError(f"coeffs rows {shown} hold NaN or ±inf: every coefficient must be finite")
    dtype = next(iter(basis.stacked.values())).dtype if basis.stacked else torch.get_default_dtype()
    return coeffs.to(device=device, dtype=dtype)


def _warn_of_negative_variances(view: SubspaceView, coeffs: Tensor) -> None:
    """bn="eval" mixes running variances linearly, σ²(p) = Σ_k c[p,k] σ²_k: away from the members' convex hull
    the mix can fall to zero or below, where BatchNorm divides by the square root of a negative number."""
    negative = torch.zeros(coeffs.shape[0], dtype=torch.bool, device=coeffs.device)
    for layer in view.batchnorm_layers():
        if layer.tracks_statistics:
            variances = mix(coeffs, layer.stacked["running_var"].to(coeffs.dtype))  # [P, C]
            negative |= (variances + layer.eps <= 0).any(dim=1)
    count = int(negative.sum())
    if count:
        warnings.warn(f"bn='eval': at {count} of {len(negative)} points a BatchNorm layer's mixed running variance "
                      "is not positive (coefficients far outside the members' convex hull), so their loss and "
                      "error are NaN; pass bn_data to recompute the statistics per point", stacklevel=3)


def batchnorm_mode(bn: str, view: SubspaceView, bn_data: Any) -> str:
    """"none" (no BatchNorm with running statistics), "recompute" or "eval"."""
    if bn not in ("auto", "recompute", "eval"):
        raise ValueError(f"bn must be 'auto', 'recompute' or 'eval', got {bn!r}")
    in_fallback = view.batchnorm_in_fallback()
    if not (in_fallback or any(layer.tracks_statistics for layer in view.batchnorm_layers())):
        return "none"
    if bn == "recompute" and bn_data is None:
        raise ValueError("bn='recompute' needs bn_data: the batches to recompute BatchNorm statistics from "
                         "(usually the training data)")
    if bn == "auto" and bn_data is None:
        warnings.warn("the model has BatchNorm and no bn_data was given: mixing the stored statistics (bn='eval'), "
                      "which is only sound close to the basis members; pass bn_data (the training data) to "
                      "recompute them per point", stacklevel=3)
    mode = "recompute" if bn in ("auto", "recompute") and bn_data is not None else "eval"
    if mode == "recompute" and in_fallback:
        raise ValueError(f"BatchNorm inside {in_fallback}, run per point with vmap, cannot have its statistics "
                         "recomputed; use bn='eval'")
    return mode
