"""`scan`: a metric at every point of a grid on a plane or line, in chunks, stored as they finish, resumable,
and shared across the ranks of a torchrun job.

The grid is (xs[i], ys[j]) for every j, i, taken in row-major order of the [len(ys), len(xs)] result: point
n = j·len(xs) + i. Chunk c holds points c·chunk_points … (c+1)·chunk_points − 1; each is one `evaluate` call
(which bounds memory by chunking further), so a 1000×1000 scan holds the basis, one chunk and the result arrays.
"""
from __future__ import annotations

import importlib.metadata
import os
import time
import warnings
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..engine import evaluate
from ..engine.metrics import check_metrics
from .distributed import Ranks, current_ranks
from .fingerprint import array_summary, basis_sha256, describe_data, describe_model
from .planes import Subspace
from .result import GridResult
from .storage import ScanStore

# Points per chunk, each one `evaluate` call: every call pays a fixed cost (a view of the model, its probe and chunk
# plan, the first layer's per-basis products, a chunk file written with fsync): 3 ms on one idle thread, 10-70 ms on
# two threads of a loaded machine, where each parallel region may wait for a descheduled thread. B1 (fused MLP,
# 20-35 µs a point) then spends under 10 % of a 32768-point chunk there; at 4096 points its 1000×1000 scan lost
# about 30 % to it.
DEFAULT_CHUNK_POINTS = 32768
WORKING_SET = 4  # as the engine counts: the largest activation, its input and temporaries
MIN_ROWS = 2  # the engine evaluates at least two samples at once
Chunk = tuple[dict[str, np.ndarray], float, str]  # a chunk's values by metric, its seconds, the BatchNorm mode


def scan(subspace: Subspace, model: nn.Module, data: Any, *, xs: Sequence[float] | Tensor | np.ndarray,
         ys: Sequence[float] | Tensor | np.ndarray | None = None, metrics: Sequence[str] = ("loss", "error"),
         bn: str = "auto", bn_data: Any = None, out: str | os.PathLike | None = None, resume: bool = True,
         progress: bool = True, memory_budget: int | None = None, chunk_points: int | None = None,
         loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None) -> GridResult:
    """Evaluate `model` at every grid point of `subspace` (a `Plane` or `Line`) on `data`.

    xs, ys: strictly increasing coordinates (ys only for a plane). metrics, bn, bn_data, memory_budget, loss_fn:
    as in `evaluate` (bn_data: the training data, to recompute BatchNorm statistics at every point). out: a
    folder where every finished chunk is written at once; a scan started again with the same arguments and
    resume=True computes only the chunks missing there (resume=False discards them). chunk_points: points per
    chunk (default 32768, fewer where memory_budget needs it). Inside a torchrun job the chunks are shared out
    among the ranks (`out` then on a file system all ranks share) and every rank returns the whole result.
    """
    started = time.perf_counter()
    if not isinstance(subspace, Subspace):
        raise TypeError("subspace must be a Plane or a Line (modeconn_fast.Plane.through, ...), "
                        f"got {type(subspace).__name__}")
    x = _axis(xs, "xs")
    y = _axis(ys, "ys") if ys is not None else None
    if subspace.dims == 2 and y is None:
        raise ValueError("a plane needs ys as well as xs: the grid is every (xs[i], ys[j])")
    if subspace.dims == 1 and y is not None:
        raise ValueError("a line has one coordinate: pass xs only (ys=None)")
    subspace.basis.check_compatible(model)
    data, bn_data = _reiterable(data), _reiterable(bn_data)  # read by the fingerprint, then by every chunk
    metrics = check_metrics(metrics)
    names = _metric_names(metrics, data)
    points = x.size * (y.size if y is not None else 1)
    chunk = _chunk_points(chunk_points, points, memory_budget, model, subspace, data, len(names))
    count = -(-points // chunk)
    device = next(iter(subspace.basis.stacked.values())).device
    ranks = current_ranks(device)
    manifest = {"points": points, "chunk_points": chunk, "chunks": count, "metrics": names, "fingerprint": {
        "subspace": {**subspace.describe(), "basis_sha256": basis_sha256(subspace.basis)},
        "xs": array_summary(x), "ys": array_summary(y) if y is not None else None,
        "data": describe_data(data), "bn_data": describe_data(bn_data), "metrics": list(metrics), "bn": bn,
        "model": describe_model(model), "chunk_points": chunk,
        "loss_fn": None if loss_fn is None else getattr(loss_fn, "__qualname__", repr(loss_fn))}}
    store = _open_store(out, manifest, resume, ranks) if out is not None else None

    mine = [c for c in range(count) if ranks.owns(c)]
    done = {c: stored for c in mine if store is not None and (stored := store.read_chunk(c, _size(c, chunk, points)))}
    computed = 0
    bar = tqdm(total=len(mine) - len(done), desc="scan", unit="chunk", disable=not progress or ranks.rank != 0)
    with bar:
        for c in mine:
            if c in done:
                continue
            done[c] = _compute_chunk(c, chunk, points, subspace, x, y, model, data, metrics=metrics, bn=bn,
                                     bn_data=bn_data, memory_budget=memory_budget, loss_fn=loss_fn)
            if store is not None:
                store.write_chunk(c, *done[c], rank=ranks.rank)
            computed += 1
            bar.set_postfix(points_per_s=f"{_size(c, chunk, points) / done[c][1]:.0f}")
            bar.update()

    result = _assemble(ranks.gather((done, computed)), x, y, names, manifest["fingerprint"], ranks.world)
    result.timings["seconds"] = time.perf_counter() - started
    if subspace.coordinates is not None:  # a training trajectory's plane (Plane.pca): its checkpoints, drawn on plots
        result.trajectory = subspace.coordinates.numpy()
    if store is not None and ranks.rank == 0:
        result.save(store.result_path)
    return result


def _assemble(parts: list[tuple[dict[int, Chunk], int]], x: np.ndarray, y: np.ndarray | None, names: list[str],
              fingerprint: dict[str, Any], world: int) -> GridResult:
    """The result from every rank's (chunks by index, chunks computed in this call)."""
    every: dict[int, Chunk] = {}
    for chunks, _ in parts:
        every.update(chunks)
    order = sorted(every)
    shape = (y.size, x.size) if y is not None else (x.size,)
    values = {name: np.concatenate([every[c][0][name] for c in order]).reshape(shape) for name in names}
    chunk_seconds = sum(every[c][1] for c in order)
    span = [[float(axis[0]), float(axis[-1])] for axis in (x, y) if axis is not None]
    points = int(np.prod(shape))
    timings = {"seconds": 0.0, "chunk_seconds": chunk_seconds,
               "points_per_second": points / chunk_seconds if chunk_seconds > 0 else float("nan"),
               "points": points, "chunks": len(order), "chunks_computed": sum(n for _, n in parts), "ranks": world}
    return GridResult(x=x, y=y, values=values, bn_mode=every[order[0]][2], subspace={**fingerprint["subspace"],
                      "span": span}, data=fingerprint["data"], timings=timings, version=_version())


def grid_coordinates(x: np.ndarray, y: np.ndarray | None, start: int, stop: int) -> Tensor:
    """Coordinates [stop − start, d] of grid points start … stop − 1 (point n = j·len(x) + i)."""
    index = np.arange(start, stop)
    if y is None:
        return torch.from_numpy(x[index])[:, None]
    return torch.from_numpy(np.stack([x[index % x.size], y[index // x.size]], axis=1))


def _compute_chunk(c: int, chunk: int, points: int, subspace: Subspace, x: np.ndarray, y: np.ndarray | None,
                   model: nn.Module, data: Any, **options: Any) -> Chunk:
    start = c * chunk
    rows = subspace.rows(grid_coordinates(x, y, start, start + _size(c, chunk, points)))
    began = time.perf_counter()
    result = evaluate(model, subspace.basis, rows, data, progress=False, **options)
    seconds = time.perf_counter() - began
    return {name: value.detach().cpu().double().numpy() for name, value in result.items()}, seconds, result.bn_mode


def _size(c: int, chunk: int, points: int) -> int:
    return min(chunk, points - c * chunk)


def _open_store(out: str | os.PathLike, manifest: dict[str, Any], resume: bool, ranks: Ranks) -> ScanStore:
    """Rank 0 checks or creates the folder; the others learn whether that worked and attach to it."""
    error = None
    store = None
    if ranks.rank == 0:
        try:
            store = ScanStore.open(out, manifest, resume=resume)
        except (ValueError, OSError) as caught:
            error = caught
    error = ranks.broadcast(None if error is None else (type(error), str(error)))
    if error is not None:
        kind, message = error
        raise kind(message)
    return store if store is not None else ScanStore.attach(out, manifest)


def _axis(values: Any, name: str) -> np.ndarray:
    """A grid axis as float64: one-dimensional, non-empty, finite and strictly increasing."""
    array = np.asarray(values.detach().cpu() if isinstance(values, Tensor) else values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-d sequence of coordinates, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty: give at least one coordinate (e.g. numpy.linspace(-1, 1, 51))")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds NaN or infinite coordinates")
    steps = np.diff(array)
    if (steps <= 0).any():
        where = int(np.argmax(steps <= 0))
        raise ValueError(f"{name} must be strictly increasing: {name}[{where + 1}] = {array[where + 1]:g} follows "
                         f"{name}[{where}] = {array[where]:g}")
    return array


def _reiterable(data: Any) -> Any:
    """A one-shot iterator of batches (a generator) read into a list; anything else as it is."""
    if isinstance(data, Mapping):
        return {name: _reiterable(value) for name, value in data.items()}
    return list(data) if isinstance(data, Iterator) else data


def _metric_names(metrics: tuple[str, ...], data: Any) -> list[str]:
    """The names `evaluate` gives its results: "loss", or "train_loss", ... for a dict of datasets."""
    if isinstance(data, Mapping):
        return [f"{name}_{metric}" for name in data for metric in metrics]
    return list(metrics)


def _chunk_points(requested: int | None, points: int, budget: int | None, model: nn.Module, subspace: Subspace,
                  data: Any, metric_count: int) -> int:
    """Points per chunk: `requested` or the default, within what `budget` holds beside one point of the model."""
    if requested is not None and (not isinstance(requested, int) or requested < 1):
        raise ValueError(f"chunk_points must be a positive integer, got {requested!r}")
    chunk = min(requested or DEFAULT_CHUNK_POINTS, points)
    if budget is None:
        return chunk
    one_point = _one_point_bytes(model, subspace, data)
    per_point = 8 * (subspace.basis.size + 2 * metric_count + 3)  # rows, results (twice), the engine's sums
    fitting = (budget - one_point) // per_point
    if fitting < 1:
        raise ValueError(f"memory_budget={budget} bytes cannot hold one point of this model: it needs about "
                         f"{one_point + per_point} bytes (its combined weights and the activations of {MIN_ROWS} "
                         "samples); raise memory_budget")
    if requested is not None and requested > fitting:
        raise ValueError(f"chunk_points={requested} does not fit memory_budget={budget} bytes: at most {fitting} "
                         "points per chunk do; lower chunk_points or raise memory_budget")
    return int(min(chunk, fitting))


def _one_point_bytes(model: nn.Module, subspace: Subspace, data: Any) -> int:
    """One point's combined weights plus the working set of its largest activation over MIN_ROWS samples,
    measured by one forward of the model (in eval mode, without gradients) on the first rows of the data."""
    weights = sum(t[0].numel() * t.element_size() for t in subspace.basis.stacked.values())
    inputs = _first_inputs(data)
    if inputs is None:
        return weights
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    inputs = inputs.to(device) if isinstance(inputs, Tensor) else tuple(t.to(device) for t in inputs)
    largest = [0]

    def record(_module: nn.Module, _args: object, output: object) -> None:
        if isinstance(output, Tensor):
            largest[0] = max(largest[0], output.numel() * output.element_size())

    training = [(m, m.training) for m in model.modules()]
    hooks = [m.register_forward_hook(record) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(*inputs) if isinstance(inputs, tuple) else model(inputs)
    finally:
        for hook in hooks:
            hook.remove()
        for module, mode in training:
            module.train(mode)
    return weights + WORKING_SET * largest[0]


def _first_inputs(data: Any) -> Tensor | tuple[Tensor, ...] | None:
    """The first MIN_ROWS rows of the first inputs of `data` (tuple of tensors or a dict of them); None for
    batches given as an iterable (not read here)."""
    if isinstance(data, Mapping):
        data = next(iter(data.values()))
    if isinstance(data, (tuple, list)) and len(data) == 2:
        inputs = data[0]
        if isinstance(inputs, Tensor):
            return inputs[:MIN_ROWS]
        if isinstance(inputs, (tuple, list)) and all(isinstance(t, Tensor) for t in inputs):
            return tuple(t[:MIN_ROWS] for t in inputs)
    return None


def _version() -> str:
    try:
        return importlib.metadata.version("modeconn_fast")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
