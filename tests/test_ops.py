"""The ops' torch path against float64 references, dispatch, input errors, opcheck and torch.compile.

The Triton path runs the same checks in tests/test_kernels.py.
"""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from modeconn_fast import ops
from ops_cases import check_conv, check_linear, check_permutation_cost


@pytest.mark.parametrize("points,bases,shared,with_bias",
                         list(itertools.product([1, 3, 17], [1, 2, 3, 5], [True, False], [True, False])))
def test_combined_linear_matches_reference(points, bases, shared, with_bias):
    check_linear(points, bases, shared, with_bias, backend="torch")


@pytest.mark.parametrize("spatial,points,bases,shared,with_bias,groups,stride,padding,dilation", [
    (2, 1, 1, True, True, 1, 1, 0, 1),
    (2, 3, 2, False, True, 2, 2, 1, 1),
    (2, 17, 3, True, False, 2, 1, "same", 2),  # shared x with P ≫ K: the per-basis strategy
    (2, 3, 5, True, True, 1, (2, 1), (1, 0), (1, 2)),
    (2, 3, 3, False, False, 1, 1, "same", 1),  # even kernel width: 'same' pads one more on the right
    (1, 1, 2, False, True, 2, 2, 1, 1),
    (1, 17, 3, True, True, 1, 1, "valid", 2),
    (1, 3, 5, True, False, 2, 1, "same", 1),
])
@pytest.mark.filterwarnings("ignore:Using padding='same'")  # the reference's own F.conv2d, for even kernels
def test_combined_conv_matches_reference(spatial, points, bases, shared, with_bias, groups, stride, padding, dilation):
    check_conv(points, bases, shared, with_bias, backend="torch", spatial=spatial, groups=groups, stride=stride,
               padding=padding, dilation=dilation)


@pytest.mark.parametrize("widths,permuted", [((19,), (True,)), ((19, 37), (True, False)), ((1, 5, 8), (False, True, True))])
def test_permutation_cost_matches_reference(widths, permuted):
    check_permutation_cost(widths, permuted, backend="torch")


def test_both_linear_strategies_agree():
    """Shared x: the per-basis strategy (many points) and the materialised one (one point) give one answer."""
    x, weight, bias = torch.randn(37, 19), torch.randn(3, 23, 19), torch.randn(3, 23)
    coeffs = torch.randn(40, 3)
    assert ops.ops_torch.linear_uses_per_basis(x, weight, coeffs)
    assert not ops.ops_torch.linear_uses_per_basis(x, weight, coeffs[:1])
    many = ops.combined_linear(x, weight, bias, coeffs, backend="torch")
    one_by_one = torch.cat([ops.combined_linear(x, weight, bias, coeffs[p:p + 1], backend="torch") for p in range(40)])
    torch.testing.assert_close(many, one_by_one, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------------------- dispatch


def test_auto_dispatch_uses_torch_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert ops.resolve_backend(None, torch.device("cpu")) == "torch"
    assert ops.resolve_backend("torch", torch.device("cpu")) == "torch"


def test_forced_triton_on_cpu_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, weight, coeffs = torch.randn(4, 3), torch.randn(2, 5, 3), torch.randn(1, 2)
    with pytest.raises(RuntimeError, match="cannot run: (the tensors are on the CPU.*TRITON_INTERPRET=1|triton is not installed)"):
        ops.combined_linear(x, weight, None, coeffs, backend="triton")


def test_forced_triton_without_triton_says_why(monkeypatch):
    monkeypatch.setattr(ops, "_TRITON_INSTALLED", False)
    with pytest.raises(RuntimeError, match="triton is not installed"):
        ops.resolve_backend("triton", torch.device("cpu"))
    assert ops.resolve_backend(None, torch.device("cpu")) == "torch"


def test_auto_dispatch_in_the_interpreter(monkeypatch):
    """TRITON_INTERPRET=1 sends CPU tensors to Triton, except dtypes the kernels do not take."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops.resolve_backend(None, torch.device("cpu"), torch.float32) == "triton"
    assert ops.resolve_backend(None, torch.device("cpu"), torch.float64) == "torch"
    with pytest.raises(RuntimeError, match="take float32, float16 and bfloat16 tensors, not torch.float64"):
        ops.resolve_backend("triton", torch.device("cpu"), torch.float64)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend must be None, 'triton' or 'torch'; got 'cuda'"):
        ops.resolve_backend("cuda", torch.device("cpu"))


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("x_shape,weight_shape,bias_shape,coeffs_shape,message", [
    ((4, 3), (2, 5, 4), None, (1, 2), r"x must be \[N, Din\] or \[P, N, Din\] .* got x \(4, 3\), weight \(2, 5, 4\)"),
    ((2, 4, 3), (2, 5, 3), None, (3, 2), r"P = coeffs.shape\[0\] = 3; got x \(2, 4, 3\)"),
    ((4, 3), (3, 5, 3), None, (1, 2), r"K = coeffs.shape\[1\] = 2 first; got weight \(3, 5, 3\), coeffs \(1, 2\)"),
    ((4, 3), (2, 5, 3), (2, 4), (1, 2), r"bias must be \[K, Dout\] = \(2, 5\) .* got bias \(2, 4\)"),
    ((4, 3), (2, 5, 3), None, (2,), r"coeffs must be \[P, K\]; got shape \(2,\)"),
])
def test_combined_linear_bad_shapes(x_shape, weight_shape, bias_shape, coeffs_shape, message):
    bias = None if bias_shape is None else torch.randn(bias_shape)
    with pytest.raises(ValueError, match=message):
        ops.combined_linear(torch.randn(x_shape), torch.randn(weight_shape), bias, torch.randn(coeffs_shape))


def test_combined_linear_bad_device():
    with pytest.raises(ValueError, match="weight is on cpu but x is on meta; devices of x, weight, coeffs must match"):
        ops.combined_linear(torch.randn(4, 3, device="meta"), torch.randn(2, 5, 3), None, torch.randn(1, 2))


def test_combined_linear_bad_dtype():
    with pytest.raises(ValueError, match="coeffs has dtype torch.float64 but x has torch.float32"):
        ops.combined_linear(torch.randn(4, 3), torch.randn(2, 5, 3), None, torch.randn(1, 2, dtype=torch.float64))


@pytest.mark.parametrize("call,message", [
    (lambda: ops.combined_conv(torch.randn(2, 4, 9, 9), torch.randn(2, 6, 3, 3, 3), None, torch.randn(1, 2)),
     r"C = weight.shape\[2\]·groups = 3 .* got x \(2, 4, 9, 9\)"),
    (lambda: ops.combined_conv(torch.randn(2, 8, 9, 9), torch.randn(2, 6, 2, 3, 3), None, torch.randn(1, 2), groups=4),
     r"groups = 4 must divide Cout"),
    (lambda: ops.combined_conv(torch.randn(2, 4, 9, 9), torch.randn(2, 6, 4, 3, 3), None, torch.randn(1, 2),
                               padding="same", stride=2), r"padding='same' needs stride 1"),
    (lambda: ops.combined_conv(torch.randn(2, 4, 2, 2), torch.randn(2, 6, 4, 3, 3), None, torch.randn(1, 2)),
     r"the output would be empty"),
    (lambda: ops.combined_conv(torch.randn(2, 4, 9, 9), torch.randn(2, 6, 4, 3, 3), None, torch.randn(1, 2), stride=(1, 1, 1)),
     r"stride must be an int or 2 ints"),
    (lambda: ops.combined_conv2d(torch.randn(2, 4, 9), torch.randn(2, 6, 4, 3), None, torch.randn(1, 2)),
     r"combined_conv2d: weight must be \[K, Cout, C/groups, H, W\]; got \(2, 6, 4, 3\)"),
    (lambda: ops.combined_conv1d(torch.randn(2, 4, 9, 9), torch.randn(2, 6, 4, 3, 3), None, torch.randn(1, 2)),
     r"combined_conv1d: weight must be \[K, Cout, C/groups, L\]; got \(2, 6, 4, 3, 3\)"),
])
def test_combined_conv_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("a,b,perms,message", [
    ([torch.randn(4, 3)], [torch.randn(4, 2)], [None], r"a\[0\] and b\[0\] must both be \[n, m_0\] .* got a\[0\] \(4, 3\), b\[0\] \(4, 2\)"),
    ([torch.randn(4, 3)], [torch.randn(4, 3)], [torch.arange(2)], r"perms\[0\] must be None or an integer tensor of length m_0 = 3"),
    ([torch.randn(4, 3)], [torch.randn(4, 3)], [], r"equal length; got 1, 1, 0"),
    ([torch.randn(4, 3), torch.randn(5, 3)], [torch.randn(4, 3), torch.randn(5, 3)], [None, None], r"n = 4 \(from a\[0\]\)"),
])
def test_permutation_cost_bad_input(a, b, perms, message):
    with pytest.raises(ValueError, match=message):
        ops.permutation_cost(a, b, perms)


# ------------------------------------------------------------------------------------ opcheck, compile


def _linear_args(shared: bool) -> tuple:
    x = torch.randn(*([] if shared else [3]), 5, 4, requires_grad=True)
    return (x, torch.randn(2, 6, 4, requires_grad=True), torch.randn(2, 6, requires_grad=True),
            torch.randn(3, 2, requires_grad=True), "torch")


def _conv_args(shared: bool) -> tuple:
    x = torch.randn(*([] if shared else [3]), 2, 4, 6, 5, requires_grad=True)
    return (x, torch.randn(2, 6, 2, 3, 2, requires_grad=True), torch.randn(2, 6, requires_grad=True),
            torch.randn(3, 2, requires_grad=True), [1, 2], [1, 0], [1, 1], 2, "torch")


def _cost_args() -> tuple:
    a = [torch.randn(6, 5, requires_grad=True), torch.randn(6, 3, requires_grad=True)]
    b = [torch.randn(6, 5, requires_grad=True), torch.randn(6, 3, requires_grad=True)]
    return a, b, [torch.randperm(5), torch.empty(0, dtype=torch.long)], "torch"


@pytest.mark.parametrize("op,args", [
    (ops._combined_linear, _linear_args(shared=True)),
    (ops._combined_linear, _linear_args(shared=False)),
    (ops._combined_conv, _conv_args(shared=True)),
    (ops._combined_conv, _conv_args(shared=False)),
    (ops._permutation_cost, _cost_args()),
], ids=["linear-shared", "linear-per-point", "conv-shared", "conv-per-point", "permutation-cost"])
def test_opcheck(op, args):
    torch.library.opcheck(op, args)


def _compiled_matches_eager(fn, *inputs: torch.Tensor) -> None:
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for run in (fn, compiled):
        for t in inputs:
            t.grad = None
        run(*inputs).square().sum().backward()
        if run is fn:
            expected = [fn(*inputs).detach()] + [t.grad.clone() for t in inputs]
    got = [compiled(*inputs).detach()] + [t.grad for t in inputs]
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e)


def test_compile_combined_linear():
    x, weight, bias, coeffs, _ = _linear_args(shared=False)
    _compiled_matches_eager(lambda *t: torch.relu(ops.combined_linear(*t)), x, weight, bias, coeffs)


def test_compile_combined_conv():
    x, weight, bias, coeffs = _conv_args(shared=True)[:4]
    _compiled_matches_eager(lambda *t: ops.combined_conv2d(*t, stride=(1, 2), padding=(1, 0), groups=2).tanh(),
                            x, weight, bias, coeffs)


def test_compile_permutation_cost():
    (a0, a1), (b0, b1), (perm, _), _ = _cost_args()
    _compiled_matches_eager(lambda a0, a1, b0, b1: ops.permutation_cost([a0, a1], [b0, b1], [perm, None]) * 2,
                            a0, a1, b0, b1)


def test_the_cpu_path_works_without_triton_installed():
    """In a fresh interpreter where `triton` cannot be found or imported, the ops and the engine still run."""
    script = textwrap.dedent("""
        import importlib.abc, importlib.util, sys
        class NoTriton(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "triton":
                    raise ModuleNotFoundError("No module named 'triton'")
        sys.meta_path.insert(0, NoTriton())
        real_find_spec = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name.split(".")[0] == "triton" else real_find_spec(name, *a)
        import torch
        import modeconn_fast
        from modeconn_fast import ops
        assert not ops._TRITON_INSTALLED and "triton" not in sys.modules
        y = ops.combined_linear(torch.randn(4, 3), torch.randn(2, 5, 3), None, torch.randn(6, 2))
        net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        path = modeconn_fast.interpolate(net, net, (torch.randn(8, 3), torch.randint(0, 2, (8,))), points=3)
        assert y.shape == (6, 4, 5) and path.loss.shape == (3,) and "triton" not in sys.modules
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
