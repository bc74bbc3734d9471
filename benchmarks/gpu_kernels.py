"""Workload B5 of BENCHMARKS.md on a CUDA GPU: the Triton kernels against their peers, after checking them.

    python -m benchmarks.gpu_kernels            # on a machine with a CUDA GPU and triton
    python -m benchmarks.gpu_kernels --smoke    # tiny shapes on the CPU, in Triton's interpreter: the script's own test

First every op (combined_linear forward and gradients, combined_conv, permutation_cost) is checked against
the float64 reference on odd shapes, in fp32 and bf16. Then `combined_linear` (per-point x, with bias) is
timed for K ∈ {2, 3}, P ∈ {1, 64, 1024}, a small and a large layer, fp32 and bf16, against: our torch path;
materialise W(p) then `F.linear` point by point; `vmap` of `functional_call` over the materialised weights;
and cuBLAS on one GEMM of the same size ([P·N, Din] @ [Din, Dout], the ceiling). Times are medians of
`triton.testing.do_bench`; TFLOP/s counts 2·P·N·Din·Dout; "of GEMM" is the fraction of the ceiling's rate.
fp32 runs at torch's default matmul precision, "highest": plain fp32 in cuBLAS, three-pass TF32 ("tf32x3",
an error at fp32's level) in the kernels' dot products.
Contenders whose materialised weights would not fit in memory are reported as skipped.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modeconn_fast import ops, reference

Timer = Callable[[Callable[[], object]], float]  # median milliseconds of a call


def gpu_timer() -> Timer:
    from triton.testing import do_bench

    return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")


def cpu_timer(fn: Callable[[], object]) -> float:
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


# -------------------------------------------------------------------------------------------- checks


def _tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 6e-2}


def check_ops(device: str) -> None:
    """Each op on the Triton path against the float64 reference (gradients against the torch path in fp32)."""
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    dtypes = [torch.float32] if device == "cpu" else [torch.float32, torch.bfloat16]
    for dtype, (P, K, shared) in ((d, case) for d in dtypes for case in ((1, 1, False), (3, 3, True), (17, 5, False))):
        tol = _tolerance(dtype)
        x = torch.randn(*([] if shared else [P]), 37, 19, generator=g)
        weight, bias, coeffs = torch.randn(K, 23, 19, generator=g) / 4, torch.randn(K, 23, generator=g), torch.randn(P, K, generator=g)
        inputs = [t.to(device, dtype) for t in (x, weight, bias, coeffs)]
        y = ops.combined_linear(*inputs, backend="triton")
        torch.testing.assert_close(y.double().cpu(), reference.combined_linear(x, weight, bias, coeffs), **tol)
        if dtype == torch.float32:
            grads = {}
            for backend in ("triton", "torch"):
                leaves = [t.clone().requires_grad_() for t in inputs]
                ops.combined_linear(*leaves, backend=backend).square().sum().backward()
                grads[backend] = [t.grad for t in leaves]
            for ours, theirs in zip(grads["triton"], grads["torch"]):
                torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-3)
        conv_x = torch.randn(P, 3, 4, 9, 7, generator=g)
        conv_w, conv_b = torch.randn(K, 6, 2, 3, 2, generator=g) / 3, torch.randn(K, 6, generator=g)
        options = dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2)
        y = ops.combined_conv(*(t.to(device, dtype) for t in (conv_x, conv_w, conv_b, coeffs)), **options, backend="triton")
        torch.testing.assert_close(y.double().cpu(), reference.combined_conv(conv_x, conv_w, conv_b, coeffs, **options), **tol)
        a, b = [torch.randn(23, m, generator=g) for m in (19, 37)], [torch.randn(23, m, generator=g) for m in (19, 37)]
        perms = [torch.randperm(19, generator=g), None]
        cost = ops.permutation_cost([t.to(device, dtype) for t in a], [t.to(device, dtype) for t in b],
                                    [None if p is None else p.to(device) for p in perms], backend="triton")
        torch.testing.assert_close(cost.double().cpu(), reference.permutation_cost(a, b, perms),
                                   rtol=tol["rtol"], atol=tol["atol"] * 10)
    print(f"checks against the float64 reference: passed ({', '.join(str(d) for d in dtypes)})")


# ------------------------------------------------------------------------------------------ timings


def linear_contenders(x: Tensor, weight: Tensor, bias: Tensor, coeffs: Tensor,
                      fits: bool) -> dict[str, Callable[[], object] | None]:
    """Each computes y [P, N, Dout] for per-point x; None where its materialised weights would not fit."""
    P, (_, Dout, Din) = coeffs.shape[0], weight.shape
    layer = nn.Linear(Din, Dout, device=x.device, dtype=x.dtype)

    def loop() -> list[Tensor]:
        w, b = ops.mix(coeffs, weight), ops.mix(coeffs, bias)
        return [F.linear(x[p], w[p], b[p]) for p in range(P)]

    def vmapped() -> Tensor:
        w, b = ops.mix(coeffs, weight), ops.mix(coeffs, bias)
        return torch.func.vmap(lambda w, b, x: torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,)))(w, b, x)

    flat_x, flat_w = x.reshape(P * x.shape[1], Din), weight[0]
    return {
        "triton kernel": lambda: ops.combined_linear(x, weight, bias, coeffs, backend="triton"),
        "torch path (materialise + baddbmm)": (lambda: ops.combined_linear(x, weight, bias, coeffs, backend="torch")) if fits else None,
        "peer: materialise + F.linear per point": loop if fits else None,
        "peer: vmap(functional_call)": vmapped if fits else None,
        "cuBLAS: one GEMM of the same size": lambda: flat_x @ flat_w.T,
    }


def time_linear(device: str, timer: Timer, points: list[int], layers: list[tuple[str, int, int, int]],
                dtypes: list[torch.dtype]) -> None:
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (interpreter smoke run: times mean nothing)"
    print(f"\nB5 combined_linear on {name}; torch {torch.__version__}\n")
    print(f"{'dtype':9} {'K':>2} {'P':>5} {'layer N×Din×Dout':18} {'contender':40} {'ms':>9} {'TFLOP/s':>8} "
          f"{'of GEMM':>8} {'vs loop':>8}")
    for dtype in dtypes:
        for K in (2, 3):
            for P in points:
                for label, N, Din, Dout in layers:
                    x = torch.randn(P, N, Din, device=device, dtype=dtype)
                    weight = torch.randn(K, Dout, Din, device=device, dtype=dtype) / Din ** 0.5
                    bias, coeffs = torch.randn(K, Dout, device=device, dtype=dtype), torch.rand(P, K, device=device, dtype=dtype)
                    free = torch.cuda.mem_get_info()[0] if device == "cuda" else 1 << 40
                    fits = 2 * P * Dout * Din * x.element_size() < 0.5 * free
                    runs = linear_contenders(x, weight, bias, coeffs, fits)
                    ms = {contender: None if run is None else timer(run) for contender, run in runs.items()}
                    flops = 2 * P * N * Din * Dout
                    gemm, loop = ms["cuBLAS: one GEMM of the same size"], ms["peer: materialise + F.linear per point"]
                    for contender, t in ms.items():
                        if t is None:
                            print(f"{str(dtype)[6:]:9} {K:>2} {P:>5} {label:18} {contender:40} {'skipped: weights do not fit':>35}")
                            continue
                        vs_loop = f"{loop / t:7.1f}×" if loop else "       —"
                        print(f"{str(dtype)[6:]:9} {K:>2} {P:>5} {label:18} {contender:40} {t:9.3f} "
                              f"{flops / t / 1e9:8.2f} {gemm / t:8.0%} {vs_loop}")
                    del x, weight, runs


def time_permutation_cost(device: str, timer: Timer, widths: list[int]) -> None:
    """A cost matrix of one group (two [n, n] terms), the kernel against torch: both terms permuted (the kernel
    fuses the gather), and neither (the products weight matching runs, plain cuBLAS for torch)."""
    print(f"\npermutation_cost, fp32, two [n, n] terms\n{'n':>6} {'terms':14} {'contender':32} {'ms':>9}")
    for n in widths:
        a = [torch.randn(n, n, device=device) for _ in range(2)]
        b = [torch.randn(n, n, device=device) for _ in range(2)]
        for terms, perms in (("both permuted", [torch.randperm(n, device=device) for _ in range(2)]),
                             ("unpermuted", [None, None])):
            runs = {"triton kernel": lambda: ops.permutation_cost(a, b, perms, backend="triton"),
                    "torch: (gather +) addmm": lambda: ops.permutation_cost(a, b, perms, backend="torch")}
            for contender, run in runs.items():
                print(f"{n:>6} {terms:14} {contender:32} {timer(run):9.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU in Triton's interpreter")
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"],
                        help="the dtypes timed (all are checked)")
    parser.add_argument("--points", nargs="+", type=int, default=[1, 64, 1024], help="the values of P timed")
    args = parser.parse_args()
    if args.smoke:
        if "triton" in sys.modules:
            raise SystemExit("--smoke must set TRITON_INTERPRET=1 before triton is imported")
        os.environ["TRITON_INTERPRET"] = "1"
        check_ops("cpu")
        time_linear("cpu", cpu_timer, [1, 3], [("tiny 17×19×23", 17, 19, 23)], [torch.float32])
        time_permutation_cost("cpu", cpu_timer, [40])
        return
    if not torch.cuda.is_available():
        print("benchmarks.gpu_kernels: no CUDA GPU here, nothing to measure (try --smoke for the script's own test)")
        return
    try:
        timer = gpu_timer()
    except ImportError:
        print("benchmarks.gpu_kernels: triton is not installed (pip install triton), nothing to measure")
        return
    check_ops("cuda")
    time_linear("cuda", timer, args.points, [("small 64×64×64", 64, 64, 64), ("large 256×2048×2048", 256, 2048, 2048)],
                [getattr(torch, name) for name in args.dtypes])
    time_permutation_cost("cuda", timer, [2048, 8192])


if __name__ == "__main__":
    main()
