"""CPU figures of the torch path of `combined_linear` at the layer shapes of workloads B1 and B2 (BENCHMARKS.md).

    python -m benchmarks.cpu_ops [--repeats 5]

Per layer: `ops.combined_linear` (its own choice of strategy), each of its two strategies forced, and the
peers — materialise W(p) then `F.linear` point by point, and `torch.func.vmap` of `F.linear` over the
materialised weights. Every contender first has its output checked against the float64 reference on a few
points. The contenders of a layer run in turns, one call each per round, so that the load of a shared machine
falls on all of them alike; times are medians over `--repeats` rounds. GFLOP/s counts 2·P·N·Din·Dout; the
ceiling is this machine's fp32 rate on a 2048² `torch.matmul`, timed in the same rounds.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from modeconn_fast import ops, reference
from modeconn_fast.ops_torch import linear_forward, linear_per_basis, mix

Layer = tuple[str, int, int, int, int, bool]  # name, points P, rows N, Din, Dout, shared x
K = 3  # a plane: three basis tensors
LAYERS: list[Layer] = [
    ("B1 layer 1 (64→32, shared x)", 1000, 512, 64, 32, True),
    ("B1 layer 2 (32→32)", 1000, 512, 32, 32, False),
    ("B1 layer 3 (32→10)", 1000, 512, 32, 10, False),
    ("B2 layer 1 (64→512, shared x)", 16, 1797, 64, 512, True),
    ("B2 layer 2 (512→512)", 16, 1797, 512, 512, False),
    ("B2 layer 3 (512→10)", 16, 1797, 512, 10, False),
]


def median_seconds_in_turns(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each call, the calls taking turns round by round (after one warm-up round)."""
    times: dict[str, list[float]] = {label: [] for label in runs}
    for round_ in range(repeats + 1):
        for label, run in runs.items():
            start = time.perf_counter()
            run()
            if round_:
                times[label].append(time.perf_counter() - start)
    return {label: statistics.median(t) for label, t in times.items()}


def contenders(x: Tensor, weight: Tensor, bias: Tensor, shared: bool) -> dict[str, Callable[[Tensor], Tensor]]:
    """Each takes coeffs [P, K] and returns [P, N, Dout]."""
    def per_point_x(p: int) -> Tensor:
        return x if shared else x[p]

    def loop(coeffs: Tensor) -> Tensor:
        w, b = mix(coeffs, weight), mix(coeffs, bias)
        return torch.stack([F.linear(per_point_x(p), w[p], b[p]) for p in range(coeffs.shape[0])])

    def vmapped(coeffs: Tensor) -> Tensor:
        w, b = mix(coeffs, weight), mix(coeffs, bias)
        return torch.func.vmap(F.linear, in_dims=(None if shared else 0, 0, 0))(x if shared else x[:coeffs.shape[0]], w, b)

    def materialised(coeffs: Tensor) -> Tensor:
        xs = x.expand(coeffs.shape[0], *x.shape) if shared else x[:coeffs.shape[0]]
        return linear_forward(xs, weight, bias, coeffs)

    found = {
        "combined_linear": lambda c: ops.combined_linear(x if shared else x[:c.shape[0]], weight, bias, c, backend="torch"),
        "  strategy: materialise + baddbmm": materialised,
    }
    if shared:
        found["  strategy: per basis + mix"] = lambda c: mix(c, linear_per_basis(x, weight, bias))
    found["peer: materialise + F.linear per point"] = loop
    found["peer: vmap(F.linear)"] = vmapped
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    square = torch.randn(2048, 2048)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; K = {K}; medians of {args.repeats} rounds\n")
    print(f"{'layer':32} {'contender':40} {'ms':>9} {'GFLOP/s':>8} {'of ceiling':>10} {'vs best peer':>12}")
    for name, points, rows, din, dout, shared in LAYERS:
        x = torch.randn(*([] if shared else [points]), rows, din)
        weight, bias = torch.randn(K, dout, din) / din ** 0.5, torch.randn(K, dout)
        coeffs = torch.randn(points, K)
        runs = contenders(x, weight, bias, shared)
        expected = reference.combined_linear(x if shared else x[:2], weight, bias, coeffs[:2])
        for label, run in runs.items():
            torch.testing.assert_close(run(coeffs[:2]).double(), expected, rtol=1e-4, atol=1e-4,
                                       msg=lambda m, label=label: f"{name}, {label}: {m}")
        timed = {label: (lambda run=run: run(coeffs)) for label, run in runs.items()}
        seconds = median_seconds_in_turns({**timed, "ceiling": lambda: square @ square}, args.repeats)
        ceiling = 2 * 2048 ** 3 / seconds.pop("ceiling") / 1e9
        best_peer = min(s for label, s in seconds.items() if label.startswith("peer"))
        flops = 2 * points * rows * din * dout
        for label, s in seconds.items():
            print(f"{name:32} {label:40} {s * 1e3:9.2f} {flops / s / 1e9:8.1f} {flops / s / 1e9 / ceiling:10.0%} "
                  f"{best_peer / s:11.2f}×")
            name = ""
        print(f"{'':32} {'(ceiling: 2048² matmul in the same rounds)':40} {'':9} {ceiling:8.1f}")


if __name__ == "__main__":
    main()
