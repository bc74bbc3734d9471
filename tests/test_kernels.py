"""The Triton path of the ops against float64 references: on a GPU where there is one, else in Triton's interpreter.

The interpreter is slow, so on the CPU these run a chosen subset of the shapes that test_ops.py runs in full.
Triton reads TRITON_INTERPRET when it is imported, and `ops` dispatches on it at each call: it is set while
this module imports triton and while its tests run, and only then, so that other tests keep the torch path.
"""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeconn_fast import ops
from ops_cases import check_conv, check_linear, check_permutation_cost

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"

if ON_GPU:
    pytest.importorskip("triton")
else:
    if "triton" in sys.modules:
        raise RuntimeError("triton was imported before tests/test_kernels.py could set TRITON_INTERPRET=1")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        pytest.importorskip("triton")


@pytest.fixture(scope="module", autouse=True)
def triton_runs_here():
    with pytest.MonkeyPatch.context() as patch:
        if not ON_GPU:
            patch.setenv("TRITON_INTERPRET", "1")
        yield


LINEAR_CASES = list(itertools.product([1, 3, 17], [1, 2, 3, 5], [True, False], [True, False])) if ON_GPU else [
    (1, 1, False, True), (3, 2, False, False), (3, 5, True, True), (1, 3, True, False), (17, 3, False, True),
    (17, 5, False, False), (3, 1, True, True),
    (17, 2, True, True),  # shared x, P ≫ K: the per-basis strategy, outside the kernel
]


@pytest.mark.parametrize("points,bases,shared,with_bias", LINEAR_CASES)
def test_combined_linear_kernel(points, bases, shared, with_bias):
    check_linear(points, bases, shared, with_bias, backend="triton", device=DEVICE)


@pytest.mark.parametrize("spatial,points,bases,shared,with_bias,groups,stride,padding,dilation", [
    (2, 3, 2, False, True, 2, 2, 1, 1),
    (2, 1, 3, True, False, 1, (2, 1), (1, 0), (1, 2)),
    (2, 3, 1, False, True, 1, 1, "same", 1),
    (1, 3, 3, False, True, 2, 2, 1, 2),
])
@pytest.mark.filterwarnings("ignore:Using padding='same'")  # the reference's own F.conv2d, for even kernels
def test_combined_conv_kernel(spatial, points, bases, shared, with_bias, groups, stride, padding, dilation):
    check_conv(points, bases, shared, with_bias, backend="triton", spatial=spatial, groups=groups, stride=stride,
               padding=padding, dilation=dilation, device=DEVICE)


@pytest.mark.parametrize("widths,permuted", [((19, 37), (True, False)), ((5,), (True,))])
def test_permutation_cost_kernel(widths, permuted):
    check_permutation_cost(widths, permuted, backend="triton", device=DEVICE)


def test_weight_gradient_alone_matches_torch_path():
    """Curve training differentiates in the basis only: the kernel's path without coefficient gradients."""
    x = torch.randn(5, 37, 19, device=DEVICE)
    coeffs = torch.randn(5, 3, device=DEVICE)
    weights = {backend: torch.randn(3, 23, 19, generator=torch.Generator().manual_seed(0)).to(DEVICE).requires_grad_()
               for backend in ("triton", "torch")}
    grads = {}
    for backend, weight in weights.items():
        ops.combined_linear(x, weight, None, coeffs, backend=backend).square().sum().backward()
        grads[backend] = weight.grad
    torch.testing.assert_close(grads["triton"], grads["torch"], rtol=1e-4, atol=1e-3)


@pytest.mark.skipif(not ON_GPU, reason="half precision is checked on a GPU only (the interpreter's bf16 dot is wrong)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_gpu(dtype):
    x, weight = torch.randn(64, 100, 96, device="cuda"), torch.randn(3, 80, 96, device="cuda") / 10
    bias, coeffs = torch.randn(3, 80, device="cuda"), torch.rand(64, 3, device="cuda")
    y = ops.combined_linear(x.to(dtype), weight.to(dtype), bias.to(dtype), coeffs.to(dtype), backend="triton")
    expected = ops.combined_linear(x, weight, bias, coeffs, backend="torch")
    torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=5e-2)


@pytest.mark.skipif(ON_GPU, reason="on a GPU the tests above compile and run the kernels")
def test_kernels_compile_for_hopper():
    """The interpreter does not type-check like the compiler: compile each kernel for sm_90 (no GPU needed)."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("compile_kernels.py")
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count(": compiled") == 8, result.stdout


@pytest.mark.skipif(ON_GPU, reason="on a GPU, run `python -m benchmarks.gpu_kernels` itself")
def test_gpu_benchmark_script_runs_in_smoke_mode():
    """benchmarks/gpu_kernels.py cannot run here for real; its --smoke mode runs every path on tiny shapes."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_kernels", "--smoke"], env=env, capture_output=True,
                            text=True, timeout=600, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr[-4000:]
    assert "checks against the float64 reference: passed" in result.stdout, result.stdout
    assert result.stdout.count("triton kernel") == 6, result.stdout  # 4 linear rows and 2 permutation_cost rows


def _gpu_args(op: str) -> tuple:
    """Small random arguments of each custom op on the GPU, forced onto the Triton path."""
    leaf = lambda *shape: torch.randn(*shape, device="cuda", requires_grad=True)
    if op == "linear":
        return leaf(3, 37, 19), leaf(2, 23, 19), leaf(2, 23), leaf(3, 2), "triton"
    if op == "conv":
        return leaf(3, 2, 4, 9, 7), leaf(2, 6, 2, 3, 2), leaf(2, 6), leaf(3, 2), [1, 2], [1, 0], [1, 1], 2, "triton"
    perms = [torch.randperm(19, device="cuda"), torch.empty(0, dtype=torch.long, device="cuda")]
    return [leaf(23, 19), leaf(23, 5)], [leaf(23, 19), leaf(23, 5)], perms, "triton"


@pytest.mark.skipif(not ON_GPU, reason="the Triton path is opchecked on a GPU (test_ops.py opchecks the torch path)")
@pytest.mark.parametrize("op", ["linear", "conv", "cost"])
def test_opcheck_triton_path_on_gpu(op):
    custom_op = {"linear": ops._combined_linear, "conv": ops._combined_conv, "cost": ops._permutation_cost}[op]
    torch.library.opcheck(custom_op, _gpu_args(op))


@pytest.mark.skipif(not ON_GPU, reason="inductor compiles Triton code on a GPU only")
@pytest.mark.parametrize("op", ["linear", "conv", "cost"])
def test_inductor_fullgraph_on_gpu(op):
    """torch.compile with its default backend (inductor) over each op: same values and gradients as eager."""
    args = _gpu_args(op)
    call = {
        "linear": lambda x, w, b, c: torch.relu(ops.combined_linear(x, w, b, c)),
        "conv": lambda x, w, b, c: ops.combined_conv2d(x, w, b, c, stride=(1, 2), padding=(1, 0), groups=2).tanh(),
        "cost": lambda a0, a1, b0, b1: ops.permutation_cost([a0, a1], [b0, b1], [args[2][0], None]) * 2,
    }[op]
    leaves = list(args[:4]) if op != "cost" else [*args[0], *args[1]]
    compiled = torch.compile(call, fullgraph=True)
    results = []
    for run in (call, compiled):
        for t in leaves:
            t.grad = None
        y = run(*leaves)
        y.square().sum().backward()
        results.append([y.detach()] + [t.grad.clone() for t in leaves])
    for eager, inductor in zip(*results):
        torch.testing.assert_close(inductor, eager, rtol=1e-4, atol=1e-4)
