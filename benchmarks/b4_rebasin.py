"""B4 rebasin-wide: weight matching of two models to convergence, against the straightforward port.

Three kinds of pair at each width h: `mlp` (MLP 64-h-h-h-10, trained), `mlp-init` (the same, freshly
initialised: no structure to find, the hardest case for warm starts) and `vgg` (VGG-style, freshly initialised:
three 3×3 convolutions of h channels with BatchNorm and ReLU, 2×2 max-pools after the last two, a linear head).

Both runs visit the groups in the same random order, so they must reach the same objective (relative difference
≤ 1e-6, computed by one function for both). The ceiling is one LAP of size h (scipy) measured in the same run.
The floor (`floor_s`) is the FLOPs of the cost matrices along our trajectory counted as updates (a group's full
product at its first visit, then rank-|K| updates for the K units its neighbours moved, see `update_flops`) at
the fp32 GEMM rate measured in the same run (`gflops`, the faster of before and after the row's runs);
`floor_fraction` = floor ÷ our time. `full_floor_s` counts every group's full product in every sweep instead
(the port's work, far above any warm-started run).
The two models are trained from seeds 0 and 1 on the 8×8 digits (Adam, one pass per epoch, batch 64) in a child
process and read back from .safetensors files, so `peak_rss_gb` (over our first run) holds the models and the matching,
no residue of the training; `pair_sha256` names the pair's weights (two runs whose sweeps differ: were the models
the same?). The port runs up to its kind's PORT_MAX_WIDTH, the VGG pair up to MAX_WIDTH.
Where time goes is split with cProfile: cost matrices (the matcher's `cost`, or the port's `cost_matrix`),
the LAP (`solve_lap`, or the port's `linear_sum_assignment`), and the rest. Each time is the fastest of five runs
at width 512, of two up to width 2048, timed without a profiler (the split from one more, profiled run), else one
profiled run, ours and the port taking turns (`_fastest_alternating`).
With `--device cuda` the two models are moved to the GPU after they are read back: the cost matrices and their
products stay there, the LAPs run on the CPU (issue 15, item 5). The GEMM rate is then the GPU's (fp32 at torch's
matmul precision), the port and the LAP ceiling do not run (CPU programs whose times the CPU rows give), and
`peak_gpu_gb` is the most GPU memory allocated during our runs, the models included.

    python -m benchmarks.b4_rebasin [--quick] [--widths 8192] [--kinds mlp mlp-init vgg] [--without-port] [--markdown]
                                    [--device cuda]
"""
from __future__ import annotations

import argparse
import cProfile
import ctypes
import gc
import multiprocessing
import os
import pstats
import resource
import tempfile
import time
from operator import itemgetter
from typing import Any, Callable

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from sklearn.datasets import load_digits
from torch import nn

from benchmarks.external import b4_row
from benchmarks.harness import markdown_lines, settle, table_rows
from benchmarks.peers import rebasin_port
from modeconn_fast.rebasin import Permutation, lap_loading, matching_objective, permutation_spec, weight_matching
from modeconn_fast.scans.fingerprint import states_sha256

WIDTHS = (512, 2048, 4096, 8192)
KINDS = ("mlp", "mlp-init", "vgg")
PORT_MAX_WIDTH = {"mlp": 4096, "mlp-init": 4096, "vgg": 2048}  # beyond: the port needs tens of minutes at 8192,
# the VGG pair's at 4096 over 1,300 s (its full products' floor and scipy LAPs: README)
MAX_WIDTH = {"vgg": 4096}  # the VGG pair's two models of 8192 channels hold 9.7 GB, beyond the 4 GB target
EPOCHS = 2


def mlp_net(width: int) -> nn.Sequential:
    """MLP 64-w-w-w-10, initialised from torch's global generator."""
    return nn.Sequential(
        nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, 10),
    )  # fmt: skip


def mlp(width: int, seed: int, epochs: int = EPOCHS) -> nn.Sequential:
    """MLP 64-w-w-w-10 from `seed`, trained `epochs` passes over the digits (inputs scaled to [0, 1])."""
    torch.manual_seed(seed)
    model = mlp_net(width)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    with torch.enable_grad():
        for _ in range(epochs):
            for batch in torch.randperm(len(x)).split(64):
                optimizer.zero_grad()
                F.cross_entropy(model(x[batch]), y[batch]).backward()
                optimizer.step()
    return model.eval()


def vgg(width: int, seed: int | None = None) -> nn.Sequential:
    """VGG-style net on 1×8×8 inputs, freshly initialised from `seed` (None: the global generator as it is):
    (conv3×3 → BatchNorm → ReLU) ×3 with 2×2 max-pools after the second and third, then a linear head on the
    2×2×width features."""
    if seed is not None:
        torch.manual_seed(seed)

    def block(c_in: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]

    return nn.Sequential(
        *block(1), *block(width), nn.MaxPool2d(2), *block(width), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * width, 10)
    ).eval()  # fmt: skip


def pair(kind: str, width: int) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """The two models of one B4 row (seeds 0 and 1) and an example input."""
    if kind == "mlp":
        return mlp(width, 0), mlp(width, 1), torch.randn(2, 64)
    if kind == "mlp-init":
        return mlp(width, 0, epochs=0), mlp(width, 1, epochs=0), torch.randn(2, 64)
    if kind == "vgg":
        return vgg(width, 0), vgg(width, 1), torch.randn(2, 1, 8, 8)
    raise ValueError(f"unknown B4 kind {kind!r}: use one of {KINDS}")


def _save_pair(kind: str, width: int, folder: str) -> None:
    """The pair of one B4 row saved as folder/a.safetensors and folder/b.safetensors (run in a child process)."""
    from safetensors.torch import save_file

    for name, model in zip("ab", pair(kind, width)[:2]):
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(folder, f"{name}.safetensors"))


def pair_made_elsewhere(kind: str, width: int) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """`pair(kind, width)`, the models trained and initialised in a child process and read back into memory here:
    this process's peak memory then holds the matching and the models, no residue of their training."""
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as folder:
        child = multiprocessing.get_context("spawn").Process(target=_save_pair, args=(kind, width, folder))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise RuntimeError(f"making the {kind} pair of width {width} failed in its child process ({child.exitcode})")
        models = []
        for name in "ab":
            with torch.device("meta"):
                model = vgg(width) if kind == "vgg" else mlp_net(width)
            model.load_state_dict(load_file(os.path.join(folder, f"{name}.safetensors")), assign=True)
            models.append(model.eval())
    return models[0], models[1], torch.randn(2, 1, 8, 8) if kind == "vgg" else torch.randn(2, 64)


def pair_digest(state_a: dict[str, torch.Tensor], state_b: dict[str, torch.Tensor]) -> str:
    """The first 12 hex digits of both models' weights' SHA-256 (`states_sha256`): two runs whose sweeps differ
    tell by it whether their models did (the pair is trained afresh in each run's child process)."""
    return states_sha256(state_a, state_b)[:12]


def gemm_rate(device: torch.device | str = "cpu") -> float:
    """The device's fp32 GEMM rate now (FLOP/s): the fastest of three n×n×n products (n = 2048 on the CPU, 8192 on
    a GPU, after one untimed product there), at torch's matmul precision."""
    device = torch.device(device)
    n = 2048 if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    if device.type != "cpu":
        a @ b
    best = float("inf")
    for _ in range(3):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on a CUDA device (nothing elsewhere)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def trajectory_flops(spec, state: dict[str, torch.Tensor], sweeps: int) -> float:
    """FLOPs of the published trajectory's cost matrices, every group in every sweep from scratch: Σ over its
    axes of 2·n·numel(tensor) for the n×n product (the port's work, an upper bound on any implementation's)."""
    per_sweep = sum(2 * state[a.tensor].numel() * state[a.tensor].shape[a.dim] for axes in spec.groups.values()
                    for a in axes if a.tensor in state)  # fmt: skip
    return per_sweep * sweeps


def update_flops(spec, state: dict[str, torch.Tensor], visits: list[tuple[str, torch.Tensor]]) -> float:
    """FLOPs of the trajectory's cost matrices formed by updates: the floor of any implementation on it.

    `visits`: (group, the permutation its solve chose) in order, from weight_matching's `on_visit`; the walk
    starts at the identity. A group's cost matrix C_p = Σ_axes mat(W_A)·mat(π(W_B))ᵀ needs the full product
    (2·n_p·numel of the axis's slice) at its first visit; later, for a tensor whose other permuted axis is group
    q's, only the columns of mat(W_B) that the |K| units of q moved since p's last visit changed: a rank update
    of 2·n_p·numel·|K|·inner_q / size of q's dimension. Tensors with no other permuted axis add nothing after
    the first visit; those with two others (or p twice) the full product at every visit."""
    sizes = {g: len(p) for g, p in reversed(visits)}  # every group is visited: its first solve sees every change
    perms = {g: torch.arange(n) for g, n in sizes.items()}
    last: dict[str, dict[str, torch.Tensor]] = {}  # per group, every permutation at its last visit
    total = 0
    for group, perm in visits:
        before = last.get(group)
        for axis in spec.groups[group]:
            if axis.tensor not in state:
                continue
            shape = state[axis.tensor].shape
            start, stop = axis.bounds(shape[axis.dim])
            full = 2 * sizes[group] * state[axis.tensor].numel() // shape[axis.dim] * (stop - start)
            others = [(a, q) for a, q in spec.axes_of(axis.tensor) if a.dim != axis.dim]
            if before is None or len({a.dim for a, _ in others}) > 1 or any(q == group for _, q in others):
                total += full
                continue
            for other, q in others:
                moved = int((perms[q] != before[q]).sum())
                total += full * moved * other.inner // shape[other.dim]
        last[group] = dict(perms)
        perms[group] = perm
    return float(total)


def _profiled(fn: Callable[[], Any]) -> tuple[Any, float, dict[str, float]]:
    """Run fn under cProfile (after `settle`): result, wall seconds, and seconds in the LAP and in cost-matrix
    products."""
    profiler = cProfile.Profile()
    settle()
    start = time.perf_counter()
    result = profiler.runcall(fn)
    seconds = time.perf_counter() - start
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (cc, nc, tt, ct, callers)
    split = {"lap_s": 0.0, "cost_s": 0.0}
    certified_lap = 0.0  # the library's solve_lap, which may itself call linear_sum_assignment
    for (file, _, name), (_, _, _, cumulative, _) in stats.items():
        if name == "solve_lap" and file.endswith("lap.py"):
            certified_lap += cumulative
        elif "linear_sum_assignment" in name:
            split["lap_s"] += cumulative
        elif name == "cost_matrix" or (name == "cost" and file.endswith("matching.py")):
            split["cost_s"] += cumulative
    split["lap_s"] = certified_lap or split["lap_s"]
    split["other_s"] = seconds - split["lap_s"] - split["cost_s"]
    return result, seconds, split


def _fastest_alternating(
    ours: Callable[[], Any], port: Callable[[], Any] | None, repeats: int
) -> tuple[tuple[Any, float, dict[str, float]], tuple[Any, float, dict[str, float]] | None, float]:
    """The fastest of `repeats` runs of each side, ours and the port taking turns (the machine is shared and its
    speed drifts over minutes: turns expose both to the same periods, the minimum is the least disturbed); with
    our peak resident memory (GiB, `peak_rss_gb`) over our first run. The first run of each side follows
    `reset_peak_rss`, which returns freed memory to the system, so that it pays a fresh heap's page faults (8-10 %
    of ours at 512 units); the later runs of both find the heap warm, as repeated calls in one process do.
    (Resetting before each of our runs only charged those faults to ours at every turn, never to the port.)
    The runs are timed without a profiler (cProfile's cost per Python call: 3-5 % of ours at 512 units, alternate
    runs in one process, the port's within its noise), as a user calls them, each after `settle` (the port's
    2-thread ops left OpenMP workers spinning into our next run). Where time goes (`_profiled`) comes
    from one more profiled run of each side after the timed ones, its shares applied to the timed seconds; a
    single run (widths above 2048: seconds to minutes each) is timed under the profiler itself."""
    ours_runs, port_runs, peak = [], [], 0.0
    run = _profiled if repeats == 1 else _timed
    for turn in range(repeats):
        if turn == 0:
            reset_peak_rss()
        ours_runs.append(run(ours))
        if turn == 0:
            peak = peak_rss_gb()
        if port is not None:
            if turn == 0:
                reset_peak_rss()
            port_runs.append(run(port))
    seconds = itemgetter(1)
    best_ours = min(ours_runs, key=seconds)
    best_port = min(port_runs, key=seconds) if port_runs else None
    if repeats > 1:
        best_ours = _with_shares(best_ours, _profiled(ours))
        best_port = _with_shares(best_port, _profiled(port)) if port is not None else None
    return best_ours, best_port, peak


def _timed(fn: Callable[[], Any]) -> tuple[Any, float, dict[str, float]]:
    """Run fn after `settle`: result, wall seconds, and no split (see `_with_shares`)."""
    settle()
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start, {}


def _with_shares(timed: tuple[Any, float, dict[str, float]], profiled: tuple[Any, float, dict[str, float]]
                 ) -> tuple[Any, float, dict[str, float]]:
    """The timed run with the profiled run's split scaled to its seconds (the same shares of the time)."""
    result, seconds, _ = timed
    _, profiled_seconds, split = profiled
    return result, seconds, {part: value * seconds / profiled_seconds for part, value in split.items()}


def reset_peak_rss() -> bool:
    """Reset this process's peak resident memory to its current one (Linux: writing 5 to /proc/self/clear_refs
    resets VmHWM), so that a later `peak_rss_gb` covers what ran since (not earlier rows); False where the
    system does not allow it. Freed memory the allocator still holds (earlier rows') is returned first."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
        return True
    except OSError:
        return False


def peak_rss_gb() -> float:
    """This process's peak resident memory (GiB): since the last `reset_peak_rss`, else since it started."""
    try:
        with open("/proc/self/status") as file:
            kib = next(int(line.split()[1]) for line in file if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 2**20


def run_width(width: int, *, with_port: bool, repeats: int = 1, kind: str = "mlp", device: str = "cpu") -> dict[str, Any]:
    device = torch.device(device)
    model_a, model_b, example = (x.to(device) for x in pair_made_elsewhere(kind, width))
    since_models = reset_peak_rss()  # whether the peak can be reset: then it covers our matching, models resident
    spec = permutation_spec(model_a, example)
    params = {name for name, _ in model_a.named_parameters()}
    state_a = {k: v for k, v in model_a.state_dict().items() if k in params}  # the objective holds no buffers
    state_b = {k: v for k, v in model_b.state_dict().items() if k in params}
    visits: list[tuple[str, torch.Tensor]] = []

    def match() -> Permutation:
        visits.clear()
        result = weight_matching(model_a, model_b, spec=spec, on_visit=lambda g, p: visits.append((g, p.clone())))
        synchronize(device)
        return result

    port = None
    if with_port:
        axes_to_perm = {k: tuple(v) for k, v in _axes_to_perm(spec, state_a).items()}
        perm_to_axes = {g: [(a.tensor, a.dim) for a in axes if a.tensor in params] for g, axes in spec.groups.items()}
        port = lambda: rebasin_port.weight_matching(state_a, state_b, perm_to_axes, axes_to_perm)  # noqa: E731
    rate_before = gemm_rate(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the peak is now what is allocated: the models
    (ours, ours_s, ours_split), port_run, peak = _fastest_alternating(match, port, repeats)
    peak_gpu = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    rate = max(rate_before, gemm_rate(device))  # the faster: a rate timed in a slow moment would lower the bar (one
    # --quick row measured ours at 0.96 of a floor from a rate timed after the runs only)
    floor_s = update_flops(spec, state_a, visits) / rate
    row: dict[str, Any] = {
        "width": width,
        "kind": kind,
        "device": device.type,
        "ours_s": round(ours_s, 3),
        "sweeps": ours.iterations,
        "objective": ours.objective,
        "pair_sha256": pair_digest(state_a, state_b),
        "gflops": round(rate / 1e9, 1),
        "full_floor_s": round(trajectory_flops(spec, state_a, ours.iterations) / rate, 3),
        "floor_s": round(floor_s, 3),
        "floor_fraction": round(floor_s / ours_s, 3),
        **{f"ours_{k}": round(v, 3) for k, v in ours_split.items()},
    }
    if device.type == "cpu":  # scipy's LAP on the CPU whatever the device (223 s at 8192): the CPU rows give it
        row["lap_ceiling_s"] = lap_ceiling(spec, state_a, state_b, width)
    if port_run is not None:
        (perms, sweeps), port_s, port_split = port_run
        port_objective = matching_objective(model_a.state_dict(), model_b.state_dict(), Permutation(spec, perms), params)
        row.update(
            port_s=round(port_s, 3),
            port_sweeps=sweeps,
            port_objective=port_objective,
            ratio=round(port_s / ours_s, 2),
            same_objective=abs(port_objective - ours.objective) <= 1e-6 * abs(port_objective),
            **{f"port_{k}": round(v, 3) for k, v in port_split.items()},
        )
    row["peak_rss_gb"] = round(peak, 2)  # during our matching, the two models in memory
    if peak_gpu is not None:  # over our runs: the models, the cost matrices and the products' temporaries
        row["peak_gpu_gb"] = round(peak_gpu, 2)
    row["peak_rss_scope"] = "matching" if since_models else "process"
    return row


def lap_ceiling(spec, state_a: dict[str, torch.Tensor], state_b: dict[str, torch.Tensor], width: int) -> float:
    """Seconds of one scipy LAP of size `width`: a hidden group's cost matrix at the identity."""
    hidden = spec.groups[sorted(spec.groups)[1]][0]
    cost = torch.movedim(state_a[hidden.tensor], hidden.dim, 0).reshape(width, -1)
    cost = (cost @ torch.movedim(state_b[hidden.tensor], hidden.dim, 0).reshape(width, -1).T).numpy()
    start = time.perf_counter()
    linear_sum_assignment(cost, maximize=True)
    return round(time.perf_counter() - start, 3)


def _axes_to_perm(spec, state) -> dict[str, list[str | None]]:
    table = {key: [None] * value.dim() for key, value in state.items()}
    for group, axes in spec.groups.items():
        for axis in axes:
            if axis.tensor in table:
                table[axis.tensor][axis.dim] = group
    return table


def run(
    quick: bool = False, widths: tuple[int, ...] | None = None, kinds: tuple[str, ...] = KINDS, with_port: bool = True,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """One row per kind and width (up to the kind's MAX_WIDTH): our seconds, the port's (up to its PORT_MAX_WIDTH,
    if `with_port` and on the CPU), the ratio, the LAP ceiling, both objectives and agreement; the models on
    `device`."""
    with_port = with_port and torch.device(device).type == "cpu"  # the port is a CPU program
    widths = widths or ((512, 2048) if quick else WIDTHS)
    with torch.no_grad():  # not set globally: the workloads after this one train
        lap_loading.wait()  # the first call's loading of the compiled LAP (see lap_loading.py) is not timed here
        return [
            run_width(w, with_port=with_port and w <= PORT_MAX_WIDTH[kind], repeats=_repeats(w), kind=kind, device=device)
            for kind in kinds
            for w in widths
            if w <= MAX_WIDTH.get(kind, w)
        ]


def _repeats(width: int) -> int:
    """Runs per implementation, the fastest taken: five at width 512 (a run takes a fraction of a second, and one
    run of either side moved by ±25 % from row to row), two up to 2048 (one --quick run at 2048 took ours 2.8×
    longer than the runs beside it, the port 1.2×), else one."""
    if width <= 512:
        return 5
    return 2 if width <= 2048 else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="widths 512 and 2048 only")
    parser.add_argument("--widths", type=int, nargs="+",
                        help=f"these widths instead (the port runs up to {PORT_MAX_WIDTH['mlp']}, for VGG up to "
                             f"{PORT_MAX_WIDTH['vgg']}; VGG runs up to {MAX_WIDTH['vgg']})")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="model pairs to run")
    parser.add_argument("--without-port", action="store_true", help="ours only")
    parser.add_argument("--device", default="cpu", help="where the models lie: cpu or cuda (the port then does not run)")
    parser.add_argument("--markdown", action="store_true", help="also print the rows as lines of the README's table")
    args = parser.parse_args()
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False)")
    rows = run(quick=args.quick, widths=tuple(args.widths) if args.widths else None, kinds=tuple(args.kinds),
               with_port=not args.without_port, device=args.device)
    columns = ["kind", "width", "device", "ours_s", "port_s", "ratio", "lap_ceiling_s", "sweeps", "port_sweeps", "objective",
               "port_objective", "same_objective", "gflops", "floor_s", "floor_fraction", "full_floor_s", "peak_rss_gb", "peak_gpu_gb", "ours_lap_s", "ours_cost_s", "ours_other_s", "port_lap_s",
               "port_cost_s", "port_other_s", "pair_sha256"]  # fmt: skip
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(str(row.get(c, "—")) for c in columns))
    if args.markdown:
        print("\n".join(markdown_lines(table_rows([b4_row(row).to_dict() for row in rows])[1:])))


if __name__ == "__main__":
    main()
