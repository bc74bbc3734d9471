"""Shared benchmark machinery: interleaved timing, equal-results checks, the machine and its GEMM ceiling,
result rows, and the table / markdown / JSON / PNG renderings.

Every workload module (`b1_grid_tiny`, …) exposes `run(quick: bool = False) -> list[dict]`: rows in the
schema of `Row.to_dict()`. Timings of the project and its peers are taken in one process, alternating
contenders repeat by repeat, and reported as medians; a peer whose numbers differ from ours is marked.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

HERE = Path(__file__).resolve().parent


# --- timing ------------------------------------------------------------------------------------------------
SETTLE_S = 0.05  # pause before each timed run (`settle`)


def settle() -> None:
    """Pause before a timed run so that it does not share the cores with what ran before it: after each parallel
    region torch's OpenMP workers (GNU libgomp, active waiting) spin on for about 10 ms of CPU (measured: process
    CPU time during a sleep just after a 2-thread product), so a contender that runs after another's multi-threaded
    ops loses a core meanwhile. Measured: weight matching at 512 units (torch on one thread) ran 7-12 ms (7-12 %)
    slower right after a 2-thread product than 50 ms after it; the B4 port, which runs torch on 2 threads, ran
    before each of ours."""
    time.sleep(SETTLE_S)


@dataclass
class Contender:
    """One way of computing a workload: `run()` evaluates `points` of the workload's `total_points`. With `prepare`,
    each timed call is `run(prepare())`, prepare untimed (e.g. a fresh copy of a training run's start state)."""

    name: str
    run: Callable[..., Any]
    points: int
    total_points: int
    prepare: Callable[[], Any] | None = None

    @property
    def extrapolated(self) -> bool:
        return self.points != self.total_points


def interleaved_medians(contenders: Sequence[Contender], repeats: int) -> dict[str, float]:
    """Median seconds per call of each contender, timed in alternation (the order rotates every repeat)
    so that load changes on a shared machine hit every contender alike, each call after `settle`."""
    times: dict[str, list[float]] = {c.name: [] for c in contenders}
    for r in range(repeats):
        for i in range(len(contenders)):
            contender = contenders[(i + r) % len(contenders)]
            given = () if contender.prepare is None else (contender.prepare(),)
            settle()
            start = time.perf_counter()
            contender.run(*given)
            times[contender.name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def time_once(fn: Callable[[], Any]) -> tuple[float, Any]:
    settle()
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def pedantic(benchmark: Any, contender: Contender, group: str, rounds: int = 3) -> Any:
    """Time a contender under pytest-benchmark (one warm-up round), recording how many points it ran."""
    benchmark.group = group
    benchmark.extra_info.update(points=contender.points, workload_points=contender.total_points)
    prepare = contender.prepare
    setup = None if prepare is None else (lambda: ((prepare(),), {}))  # untimed, as in `interleaved_medians`
    return benchmark.pedantic(contender.run, setup=setup, rounds=rounds, warmup_rounds=1)


@contextlib.contextmanager
def threads(count: int) -> Iterator[None]:
    """Run a block with `count` torch threads (setup such as training uses 1: tiny ops under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --- checks ------------------------------------------------------------------------------------------------
@dataclass
class Check:
    """Did a peer compute the same numbers as the project? `deviation` is the largest one found."""

    ok: bool
    deviation: float
    tolerance: str

    def __str__(self) -> str:
        return f"{'ok' if self.ok else 'FAILED'} (max dev {self.deviation:.1e}, {self.tolerance})"


def compare(ours: Tensor, theirs: Tensor, *, rtol: float = 0.0, atol: float = 0.0) -> Check:
    """|ours − theirs| ≤ atol + rtol·|ours| everywhere (NaN anywhere fails); deviation relative when rtol is set."""
    ours, theirs = torch.as_tensor(ours, dtype=torch.float64).flatten(), torch.as_tensor(theirs, dtype=torch.float64).flatten()
    if ours.shape != theirs.shape:
        return Check(False, float("inf"), f"shapes {tuple(ours.shape)} vs {tuple(theirs.shape)}")
    diff = (ours - theirs).abs()
    finite = bool(torch.isfinite(diff).all())
    ok = finite and bool((diff <= atol + rtol * ours.abs()).all())
    scale = ours.abs().clamp_min(1e-30) if rtol else torch.ones_like(ours)
    deviation = float((diff / scale).max()) if finite else float("inf")
    tolerance = f"rel ≤ {rtol:g}" if rtol else f"abs ≤ {atol:g}"
    return Check(ok, deviation, tolerance)


def combine(checks: Sequence[Check]) -> Check:
    worst = max(checks, key=lambda c: c.deviation)
    return Check(all(c.ok for c in checks), worst.deviation, worst.tolerance)


# --- the machine -------------------------------------------------------------------------------------------
GEMM_SIZE = 2048
GEMM_FLOPS = 2 * GEMM_SIZE**3
GEMM_NAME = "fp32 GEMM"


def gemm_contender() -> Contender:
    """One fp32 2048² torch.matmul: the machine's ceiling, timed among the contenders it bounds."""
    a, b = torch.randn(GEMM_SIZE, GEMM_SIZE), torch.randn(GEMM_SIZE, GEMM_SIZE)
    return Contender(GEMM_NAME, lambda: torch.matmul(a, b), 1, 1)


def gemm_rate(repeats: int = 5) -> float:
    """fp32 FLOP/s of a 2048² torch.matmul on this machine now (median of `repeats` after a warm-up)."""
    gemm = gemm_contender()
    gemm.run()
    return GEMM_FLOPS / interleaved_medians([gemm], repeats)[gemm.name]


def machine() -> dict[str, Any]:
    """CPU model, cores, threads, load, library versions, GPU (if any), and the commit measured."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "loss_landscapes": _version("loss-landscapes"),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "commit": _commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


# --- result rows -------------------------------------------------------------------------------------------
@dataclass
class PeerTime:
    """A peer's time for the whole workload; `measured_points` < the workload's points means extrapolated."""

    name: str
    seconds: float
    measured_points: int | None
    check: str
    check_ok: bool


@dataclass
class Row:
    workload: str
    case: str
    points: int | None  # None where the workload is not a set of points (B4)
    ours_s: float
    peers: list[PeerTime] = field(default_factory=list)
    ours_measured_points: int | None = None  # set when ours ran a subset of the points (extrapolated)
    ceiling: str = ""  # e.g. "0.81 of fp32 GEMM (62 GFLOP/s)"
    target: str = ""
    met: bool | None = None
    note: str = ""

    @property
    def fastest_peer(self) -> PeerTime | None:
        return min(self.peers, key=lambda p: p.seconds, default=None)

    @property
    def ratio(self) -> float | None:
        fastest = self.fastest_peer
        return None if fastest is None else fastest.seconds / self.ours_s

    @property
    def checks_ok(self) -> bool:
        return all(p.check_ok for p in self.peers)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ratio"] = self.ratio
        data["checks_ok"] = self.checks_ok
        return data


def peer_times(peers: Sequence[Contender], medians: dict[str, float], checks: dict[str, Check]) -> list[PeerTime]:
    """Each peer's median scaled to the workload's points (per-point extrapolation where it ran a subset)."""
    return [PeerTime(p.name, medians[p.name] * p.total_points / p.points, p.points, str(checks[p.name]),
                     checks[p.name].ok) for p in peers]


def target_met(ratio: float | None, at_least: float, checks_ok: bool) -> bool | None:
    if ratio is None:
        return None
    return checks_ok and ratio >= at_least


# --- rendering ---------------------------------------------------------------------------------------------
def _seconds(value: float) -> str:
    if value >= 100:
        return f"{value:.0f} s"
    if value >= 1:
        return f"{value:.2f} s"
    if value >= 1e-3:
        return f"{value * 1e3:.1f} ms"
    return f"{value * 1e6:.0f} µs"


def _peer_cell(row: dict[str, Any], peer: dict[str, Any]) -> str:
    mark = "" if peer["check_ok"] else " ✗"
    extrapolated = "~" if peer["measured_points"] not in (None, row["points"]) else ""
    return f"{peer['name']} {extrapolated}{_seconds(peer['seconds'])}{mark}"


def _met(row: dict[str, Any]) -> str:
    if row.get("met") is None:
        return "—"
    return "yes" if row["met"] else "NO"


def table_rows(rows: Sequence[dict[str, Any]]) -> list[list[str]]:
    header = ["workload", "case", "points", "ours", "peers (same run)", "× fastest peer", "ceiling", "target", "met"]
    body = [header]
    for row in rows:
        ratio = row.get("ratio")
        ours_extrapolated = "~" if row.get("ours_measured_points") not in (None, row["points"]) else ""
        body.append([row["workload"], row["case"], f"{row['points']:,}" if row["points"] else "—", ours_extrapolated + _seconds(row["ours_s"]),
                     "; ".join(_peer_cell(row, p) for p in row["peers"]) or "—",
                     f"{ratio:.2f}×" if ratio is not None else "—", row.get("ceiling") or "—",
                     row.get("target") or "—", _met(row)])
    return body


FOOTNOTE = ("~ timed on a subset of the points and extrapolated per point; ✗ its numbers differ from ours "
            "(the row does not count). Medians of alternating repeats in one process, the engine's compiled CPU "
            "kernels loaded before timing (once per process; a job loads them in the background after its first "
            "second of evaluations).")


def render_table(results: dict[str, Any]) -> str:
    """The plain-text table printed by `python -m benchmarks`, with the machine on top and notes below."""
    m = results["machine"]
    lines = [f"{m['cpu']} · {m['cores']} cores · torch {m['torch']} ({m['torch_threads']} threads) · triton "
             f"{m['triton']} · GPU {m['gpu'] or 'none'} · load {m['load_average'][0]:.1f} → "
             f"{results.get('load_average_end', m['load_average'])[0]:.1f} · fp32 GEMM "
             f"{results['gemm_flops'] / 1e9:.1f} GFLOP/s"]
    if m["load_average"][0] > m["cores"] and m["torch_threads"] > 1:
        lines.append(f"note: load {m['load_average'][0]:.1f} > {m['cores']} cores: with {m['torch_threads']} threads, "
                     "torch's small ops wait for each other, per-point peers most (try --threads 1)")
    body = table_rows(results["rows"])
    widths = [max(len(r[i]) for r in body) for i in range(len(body[0]))]
    for index, r in enumerate(body):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append(FOOTNOTE)
    lines += [f"{row['workload']}: {row['note']}" for row in results["rows"] if row.get("note")]
    lines += [f"skipped: {s}" for s in results.get("skipped", [])]
    return "\n".join(lines)


def markdown_lines(body: Sequence[Sequence[str]]) -> list[str]:
    """Table rows (`table_rows` without its header) as markdown lines, pipes in cells escaped."""
    return ["| " + " | ".join(cell.replace("|", "\\|") for cell in r) + " |" for r in body]


def render_markdown(results: dict[str, Any]) -> str:
    """The README's benchmark table, rendered from results.json."""
    m = results["machine"]
    body = table_rows(results["rows"])
    command = results.get("command", "python -m benchmarks" + (" --quick" if results.get("quick") else ""))
    out = [f"Measured with `{command}` on {m['cpu']}, "
           f"{m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), load {m['load_average'][0]:.1f}, "
           f"fp32 GEMM {results['gemm_flops'] / 1e9:.1f} GFLOP/s, commit {m['commit']}.", ""]
    out.append("| " + " | ".join(body[0]) + " |")
    out.append("| " + " | ".join("---" for _ in body[0]) + " |")
    out += markdown_lines(body[1:])
    out += ["", FOOTNOTE]
    return "\n".join(out)


def write_json(results: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def plot(results: dict[str, Any], path: Path) -> None:
    """Bar chart: speed-up of the project over each peer, per workload row (log scale, 1× line)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r["peers"]]
    names = sorted({p["name"] for r in rows for p in r["peers"]})
    fig, ax = plt.subplots(figsize=(max(6.0, 1.8 * len(rows) + 2), 4.8))
    width = 0.8 / max(1, len(names))
    for j, name in enumerate(names):
        xs, ys = [], []
        for i, r in enumerate(rows):
            for p in r["peers"]:
                if p["name"] == name:
                    xs.append(i + (j - (len(names) - 1) / 2) * width)
                    ys.append(p["seconds"] / r["ours_s"])
        ax.bar(xs, ys, width=width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1, 2, 5)))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}×"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    labels = [f"{r['workload']}\n" + textwrap.fill(r["case"], 22) for r in rows]
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("peer time ÷ our time (higher: we are faster)")
    ax.set_title(f"modeconn_fast vs peers · {results['machine']['cpu']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
