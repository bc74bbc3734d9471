"""The engine's primitives, as custom ops with a Triton path and a torch path.

    combined_linear:   y[p] = x[p] @ (Σ_k c[p,k] W_k)ᵀ + Σ_k c[p,k] b_k
    combined_conv:     the same for Conv1d / Conv2d (combined_conv1d / combined_conv2d check the rank)
    permutation_cost:  Σ_j a[j] @ b[j][:, perms[j]]ᵀ
    mix:               Σ_k c[p,k] T_k

`x` is either shared by all points (no leading point axis) or carries one: [P, N, ...].

Each op is a `torch.library.custom_op` (namespace `modeconn_fast`) with a fake implementation and a
hand-written backward, so it runs in eager mode and under `torch.compile(fullgraph=True)`. Dispatch, with
`backend=None`: CUDA tensors and Triton installed -> the Triton kernels of `modeconn_fast.kernels`; CPU
tensors with TRITON_INTERPRET=1 -> the same kernels in Triton's interpreter (slow: for tests); otherwise the
torch implementations of `modeconn_fast.ops_torch`. `backend="triton"` or `"torch"` forces a path;
`"triton"` raises RuntimeError where Triton cannot run. Malformed inputs raise ValueError.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops_torch
from .ops_torch import mix

__all__ = ["mix", "combined_linear", "combined_conv", "combined_conv1d", "combined_conv2d", "permutation_cost",
           "resolve_backend"]

_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


# -------------------------------------------------------------------------------------------- dispatch


_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _why_triton_cannot_run(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when the Triton kernels can run on tensors of this device and dtype, else the reason."""
    if not _TRITON_INSTALLED:
        return "triton is not installed (pip install triton)"
    if dtype not in _TRITON_DTYPES:
        return f"the Triton kernels take float32, float16 and bfloat16 tensors, not {dtype}"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return "the tensors are on the CPU, where Triton runs only in its interpreter (set TRITON_INTERPRET=1)"
    return f"Triton does not run on {device.type} tensors"


def resolve_backend(backend: str | None, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """The path a call takes for tensors of this device and dtype: 'triton' or 'torch' (see the module docstring)."""
    if backend not in (None, "triton", "torch"):
        raise ValueError(f"backend must be None, 'triton' or 'torch'; got {backend!r}")
    if backend == "torch":
        return "torch"
    reason = _why_triton_cannot_run(device, dtype)
    if reason is None:
        return "triton"
    if backend == "triton":
        raise RuntimeError(f"backend='triton' cannot run: {reason}")
    return "torch"


def _kernels(name: str, device: torch.device) -> ModuleType:
    """The Triton module `modeconn_fast.kernels.<name>`, refusing CPU tensors if it was not built interpreted."""
    module = importlib.import_module(f"modeconn_fast.kernels.{name}")
    if device.type == "cpu" and not importlib.import_module("modeconn_fast.kernels.common").INTERPRETED:
        raise RuntimeError("backend='triton' cannot run: the Triton kernels were imported without TRITON_INTERPRET=1, "
                           "so they cannot run on CPU tensors (set it before the first call)")
    return module


def _plain_call() -> bool:
    """Eager: the torch path is called directly, without the custom op's dispatch (about 0.1 ms a call, which
    many small chunks of points, or a training step's few layers, would pay again and again). Autograd then
    differentiates the torch path's own ops; the hand-written backward serves the Triton kernels and
    torch.compile (measured on B6, curve training of a small CNN on one thread: 7.0 ms a step through the custom
    ops, 6.4 ms without them)."""
    return not torch.compiler.is_compiling()


# ---------------------------------------------------------------------------------------- validation


def _shape(t: Tensor | None) -> tuple[int, ...] | None:
    return None if t is None else tuple(t.shape)


def _check_alike(op: str, **tensors: Tensor | None) -> None:
    """Same floating dtype and same device for all the given tensors."""
    given = {name: t for name, t in tensors.items() if t is not None}
    first_name, first = next(iter(given.items()))
    if not first.is_floating_point():
        raise ValueError(f"{op}: {first_name} must be a floating-point tensor; got {first.dtype}")
    for name, t in given.items():
        if t.dtype != first.dtype:
            raise ValueError(f"{op}: {name} has dtype {t.dtype} but {first_name} has {first.dtype}; "
                             f"dtypes of {', '.join(given)} must match")
        if t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first_name} is on {first.device}; "
                             f"devices of {', '.join(given)} must match")


def _autocast(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Under `torch.autocast` for the tensors' device, all of them in its lower-precision dtype, as autocast treats
    F.linear and F.conv*d (weights mixed from the cast members; cast back by the caller's next fp32 op)."""
    device_type = next(t for t in tensors if t is not None).device.type
    if not (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def _check_coeffs_weight(op: str, weight: Tensor, coeffs: Tensor, weight_dims: Sequence[int]) -> None:
    if coeffs.dim() != 2:
        raise ValueError(f"{op}: coeffs must be [P, K]; got shape {_shape(coeffs)}")
    if weight.dim() not in weight_dims or weight.shape[0] != coeffs.shape[1]:
        raise ValueError(f"{op}: weight must have {' or '.join(map(str, weight_dims))} dims with K = coeffs.shape[1] = "
                         f"{coeffs.shape[1]} first; got weight {_shape(weight)}, coeffs {_shape(coeffs)}")


def _check_bias(op: str, bias: Tensor | None, weight: Tensor) -> None:
    if bias is not None and tuple(bias.shape) != tuple(weight.shape[:2]):
        raise ValueError(f"{op}: bias must be [K, Dout] = {tuple(weight.shape[:2])} (from weight {_shape(weight)}) "
                         f"or None; got bias {_shape(bias)}")


# -------------------------------------------------------------------------------------- combined_linear


@torch.library.custom_op("modeconn_fast::combined_linear", mutates_args=())
def _combined_linear(x: Tensor, weight: Tensor, bias: Tensor | None, coeffs: Tensor, backend: str) -> Tensor:
    if backend == "triton" and not ops_torch.linear_uses_per_basis(x, weight, coeffs):
        return _kernels("combined_linear", x.device).forward(x, weight, bias, coeffs)
    return ops_torch.linear_forward(x, weight, bias, coeffs)


@_combined_linear.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None, coeffs: Tensor, backend: str) -> Tensor:
    return x.new_empty(coeffs.shape[0], x.shape[-2], weight.shape[1])


@torch.library.custom_op("modeconn_fast::combined_linear_grad_input", mutates_args=())
def _combined_linear_grad_input(grad: Tensor, weight: Tensor, coeffs: Tensor, shared: bool, backend: str) -> Tensor:
    if backend == "triton" and not shared:  # grad[p] @ W(p) is a combined_linear with the transposed basis
        return _kernels("combined_linear", grad.device).forward(grad, weight.transpose(1, 2), None, coeffs)
    return ops_torch.linear_grad_input(grad, weight, coeffs, shared)


@_combined_linear_grad_input.register_fake
def _(grad: Tensor, weight: Tensor, coeffs: Tensor, shared: bool, backend: str) -> Tensor:
    return grad.new_empty(*([] if shared else [coeffs.shape[0]]), grad.shape[1], weight.shape[2])


@torch.library.custom_op("modeconn_fast::combined_linear_grad_params", mutates_args=())
def _combined_linear_grad_params(grad: Tensor, x: Tensor, weight: Tensor, coeffs: Tensor, need_weight: bool,
                                 need_coeffs: bool, backend: str) -> tuple[Tensor, Tensor]:
    if backend == "triton" and not ops_torch.linear_uses_per_basis(x, weight, coeffs):
        return _kernels("combined_linear", grad.device).grad_params(grad, x, weight, coeffs, need_weight, need_coeffs)
    return ops_torch.linear_grad_params(grad, x, weight, coeffs, need_weight, need_coeffs)


@_combined_linear_grad_params.register_fake
def _(grad: Tensor, x: Tensor, weight: Tensor, coeffs: Tensor, need_weight: bool, need_coeffs: bool,
      backend: str) -> tuple[Tensor, Tensor]:
    return (grad.new_empty(weight.shape if need_weight else (0,)),
            grad.new_empty(coeffs.shape if need_coeffs else (0,)))


def _bias_grads(grad_sum: Tensor, bias: Tensor, coeffs: Tensor) -> tuple[Tensor, Tensor]:
    """From grad summed over everything but points and channels ([P, Dout]): ∂/∂bias and the bias part of ∂/∂c."""
    return coeffs.T @ grad_sum, grad_sum @ bias.T


def _linear_setup_context(ctx, inputs, output) -> None:
    x, weight, bias, coeffs, backend = inputs
    ctx.save_for_backward(x, weight, bias, coeffs)
    ctx.backend = backend


def _linear_backward(ctx, grad: Tensor):
    x, weight, bias, coeffs = ctx.saved_tensors
    need_x, need_weight, need_bias, need_coeffs = ctx.needs_input_grad[:4]
    grad = grad.contiguous()
    grad_x = grad_weight = grad_bias = grad_coeffs = bias_part = None
    if need_x:
        grad_x = _combined_linear_grad_input(grad, weight, coeffs, x.dim() == 2, ctx.backend)
    if need_weight or need_coeffs:
        grad_weight, grad_coeffs = _combined_linear_grad_params(grad, x, weight, coeffs, need_weight, need_coeffs,
                                                                ctx.backend)
    if bias is not None and (need_bias or need_coeffs):
        grad_bias, bias_part = _bias_grads(grad.sum(1), bias, coeffs)
    if need_coeffs and bias_part is not None:
        grad_coeffs = grad_coeffs + bias_part
    return (grad_x, grad_weight if need_weight else None, grad_bias if need_bias else None,
            grad_coeffs if need_coeffs else None, None)


_combined_linear.register_autograd(_linear_backward, setup_context=_linear_setup_context)


def combined_linear(x: Tensor, weight: Tensor, bias: Tensor | None, coeffs: Tensor, *,
                    backend: str | None = None) -> Tensor:
    """y[p] = x[p] @ (Σ_k coeffs[p,k] weight[k])ᵀ + Σ_k coeffs[p,k] bias[k].

    x [N, Din] (shared by all points) or [P, N, Din]; weight [K, Dout, Din]; bias [K, Dout] or None;
    coeffs [P, K] -> [P, N, Dout]. Differentiable in x, weight, bias and coeffs.
    """
    op = "combined_linear"
    _check_coeffs_weight(op, weight, coeffs, (3,))
    P, Din = coeffs.shape[0], weight.shape[2]
    if x.dim() not in (2, 3) or x.shape[-1] != Din or (x.dim() == 3 and x.shape[0] != P):
        raise ValueError(f"{op}: x must be [N, Din] or [P, N, Din] with Din = weight.shape[2] = {Din} and "
                         f"P = coeffs.shape[0] = {P}; got x {_shape(x)}, weight {_shape(weight)}, coeffs {_shape(coeffs)}")
    _check_bias(op, bias, weight)
    x, weight, bias, coeffs = _autocast(x, weight, bias, coeffs)
    _check_alike(op, x=x, weight=weight, bias=bias, coeffs=coeffs)
    backend = resolve_backend(backend, x.device, x.dtype)
    if backend == "torch" and _plain_call():
        return ops_torch.linear_forward(x, weight, bias, coeffs)
    return _combined_linear(x, weight, bias, coeffs, backend)


# ---------------------------------------------------------------------------------------- combined_conv


@torch.library.custom_op("modeconn_fast::combined_conv", mutates_args=())
def _combined_conv(x: Tensor, weight: Tensor, bias: Tensor | None, coeffs: Tensor, stride: Sequence[int],
                   padding: Sequence[int], dilation: Sequence[int], groups: int, backend: str) -> Tensor:
    if backend == "triton" and not ops_torch.conv_uses_per_basis(x, weight, coeffs, stride, padding, dilation):
        return _kernels("combined_conv", x.device).forward(x, weight, bias, coeffs, stride, padding, dilation, groups)
    return ops_torch.conv_forward(x, weight, bias, coeffs, stride, padding, dilation, groups)


@_combined_conv.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None, coeffs: Tensor, stride: Sequence[int], padding: Sequence[int],
      dilation: Sequence[int], groups: int, backend: str) -> Tensor:
    spatial = weight.dim() - 3
    out = ops_torch.conv_output_size(x.shape[-spatial:], weight.shape[3:], stride, padding, dilation)
    return x.new_empty(coeffs.shape[0], x.shape[-spatial - 2], weight.shape[1], *out)


@torch.library.custom_op("modeconn_fast::combined_conv_backward", mutates_args=())
def _combined_conv_backward(grad: Tensor, x: Tensor, weight: Tensor, coeffs: Tensor, stride: Sequence[int],
                            padding: Sequence[int], dilation: Sequence[int], groups: int, need_input: bool,
                            need_weight: bool, need_coeffs: bool) -> tuple[Tensor, Tensor, Tensor]:
    return ops_torch.conv_backward(grad, x, weight, coeffs, stride, padding, dilation, groups, need_input,
                                  need_weight, need_coeffs)


@_combined_conv_backward.register_fake
def _(grad: Tensor, x: Tensor, weight: Tensor, coeffs: Tensor, stride: Sequence[int], padding: Sequence[int],
      dilation: Sequence[int], groups: int, need_input: bool, need_weight: bool,
      need_coeffs: bool) -> tuple[Tensor, Tensor, Tensor]:
    return (grad.new_empty(x.shape if need_input else (0,)), grad.new_empty(weight.shape if need_weight else (0,)),
            grad.new_empty(coeffs.shape if need_coeffs else (0,)))


def _conv_setup_context(ctx, inputs, output) -> None:
    x, weight, bias, coeffs, stride, padding, dilation, groups, _ = inputs
    ctx.save_for_backward(x, weight, bias, coeffs)
    ctx.options = (stride, padding, dilation, groups)


def _conv_backward(ctx, grad: Tensor):
    x, weight, bias, coeffs = ctx.saved_tensors
    need_x, need_weight, need_bias, need_coeffs = ctx.needs_input_grad[:4]
    grad = grad.contiguous()
    grad_bias = bias_part = None
    grad_x, grad_weight, grad_coeffs = _combined_conv_backward(grad, x, weight, coeffs, *ctx.options, need_x,
                                                               need_weight, need_coeffs)
    if bias is not None and (need_bias or need_coeffs):
        grad_bias, bias_part = _bias_grads(grad.sum([1, *range(3, grad.dim())]), bias, coeffs)
    if need_coeffs and bias_part is not None:
        grad_coeffs = grad_coeffs + bias_part
    return (grad_x if need_x else None, grad_weight if need_weight else None, grad_bias if need_bias else None,
            grad_coeffs if need_coeffs else None, None, None, None, None, None)


_combined_conv.register_autograd(_conv_backward, setup_context=_conv_setup_context)


def _as_tuple(value: int | Sequence[int], spatial: int, name: str) -> list[int]:
    values = [value] * spatial if isinstance(value, int) else list(value)
    if len(values) != spatial:
        raise ValueError(f"combined_conv: {name} must be an int or {spatial} ints; got {value!r}")
    return values


def _resolve_padding(padding: int | str | Sequence[int], kernel: Sequence[int], stride: Sequence[int],
                     dilation: Sequence[int]) -> tuple[list[int], list[int]]:
    """Symmetric padding for the op, and extra zeros on the right (F.pad order) where 'same' needs them."""
    spatial = len(kernel)
    if padding == "valid":
        return [0] * spatial, []
    if padding == "same":
        if any(s != 1 for s in stride):
            raise ValueError(f"combined_conv: padding='same' needs stride 1; got stride {tuple(stride)}")
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        extra = [t % 2 for t in totals]
        right = [amount for e in reversed(extra) for amount in (0, e)] if any(extra) else []
        return [t // 2 for t in totals], right
    if isinstance(padding, str):
        raise ValueError(f"combined_conv: padding must be an int, {spatial} ints, 'same' or 'valid'; got {padding!r}")
    return _as_tuple(padding, spatial, "padding"), []


def combined_conv(x: Tensor, weight: Tensor, bias: Tensor | None, coeffs: Tensor, *,
                  stride: int | Sequence[int] = 1, padding: int | str | Sequence[int] = 0,
                  dilation: int | Sequence[int] = 1, groups: int = 1, backend: str | None = None) -> Tensor:
    """Convolution of x[p] with Σ_k coeffs[p,k] weight[k] plus Σ_k coeffs[p,k] bias[k], 1-d or 2-d by weight's rank.

    x [N, C, *spatial] (shared by all points) or [P, N, C, *spatial]; weight [K, Cout, C/groups, *kernel];
    bias [K, Cout] or None; coeffs [P, K] -> [P, N, Cout, *spatial_out]. Options as in F.conv1d / F.conv2d.
    """
    op = "combined_conv"
    _check_coeffs_weight(op, weight, coeffs, (4, 5))
    spatial, P = weight.dim() - 3, coeffs.shape[0]
    C = weight.shape[2] * groups
    if (x.dim() not in (spatial + 2, spatial + 3) or x.shape[-spatial - 1] != C
            or (x.dim() == spatial + 3 and x.shape[0] != P)):
        raise ValueError(f"{op}: x must be [N, C, *spatial] or [P, N, C, *spatial] with {spatial} spatial dims, "
                         f"C = weight.shape[2]·groups = {C} and P = coeffs.shape[0] = {P}; got x {_shape(x)}, "
                         f"weight {_shape(weight)}, groups {groups}, coeffs {_shape(coeffs)}")
    if groups < 1 or weight.shape[1] % groups:
        raise ValueError(f"{op}: groups = {groups} must divide Cout = weight.shape[1]; got weight {_shape(weight)}")
    _check_bias(op, bias, weight)
    x, weight, bias, coeffs = _autocast(x, weight, bias, coeffs)
    _check_alike(op, x=x, weight=weight, bias=bias, coeffs=coeffs)
    stride_, dilation_ = _as_tuple(stride, spatial, "stride"), _as_tuple(dilation, spatial, "dilation")
    padding_, right = _resolve_padding(padding, weight.shape[3:], stride_, dilation_)
    if right:
        x = F.pad(x, right)
    out = ops_torch.conv_output_size(x.shape[-spatial:], weight.shape[3:], stride_, padding_, dilation_)
    if min(out) < 1:
        raise ValueError(f"{op}: the output would be empty: x {_shape(x)}, weight {_shape(weight)}, "
                         f"stride {stride_}, padding {padding_}, dilation {dilation_}")
    backend = resolve_backend(backend, x.device, x.dtype)
    if backend == "torch" and _plain_call():
        return ops_torch.conv_forward(x, weight, bias, coeffs, stride_, padding_, dilation_, groups)
    return _combined_conv(x, weight, bias, coeffs, stride_, padding_, dilation_, groups, backend)


def _check_rank(op: str, weight: Tensor, layout: str) -> None:
    if weight.dim() != layout.count(",") + 1:
        raise ValueError(f"{op}: weight must be {layout}; got {_shape(weight)}")


def combined_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None, coeffs: Tensor, *,
                    stride: int | Sequence[int] = 1, padding: int | str | Sequence[int] = 0,
                    dilation: int | Sequence[int] = 1, groups: int = 1, backend: str | None = None) -> Tensor:
    """`combined_conv` for a weight [K, Cout, C/groups, L]: x [N, C, L] or [P, N, C, L] -> [P, N, Cout, L_out]."""
    _check_rank("combined_conv1d", weight, "[K, Cout, C/groups, L]")
    return combined_conv(x, weight, bias, coeffs, stride=stride, padding=padding, dilation=dilation, groups=groups,
                         backend=backend)


def combined_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, coeffs: Tensor, *,
                    stride: int | Sequence[int] = 1, padding: int | str | Sequence[int] = 0,
                    dilation: int | Sequence[int] = 1, groups: int = 1, backend: str | None = None) -> Tensor:
    """`combined_conv` for a weight [K, Cout, C/groups, H, W]: x [N, C, H, W] or [P, N, C, H, W] -> [P, N, Cout, H', W']."""
    _check_rank("combined_conv2d", weight, "[K, Cout, C/groups, H, W]")
    return combined_conv(x, weight, bias, coeffs, stride=stride, padding=padding, dilation=dilation, groups=groups,
                         backend=backend)


# ------------------------------------------------------------------------------------- permutation_cost


@torch.library.custom_op("modeconn_fast::permutation_cost", mutates_args=())
def _permutation_cost(a: list[Tensor], b: list[Tensor], perms: list[Tensor], backend: str) -> Tensor:
    """As `permutation_cost`, with an empty tensor for the identity in perms (custom-op lists hold no None)."""
    given = [perm if perm.numel() else None for perm in perms]
    if backend == "triton":
        return _kernels("permutation_cost", a[0].device).permutation_cost(a, b, given)
    return ops_torch.permutation_cost(a, b, given)


@_permutation_cost.register_fake
def _(a: list[Tensor], b: list[Tensor], perms: list[Tensor], backend: str) -> Tensor:
    return a[0].new_empty(a[0].shape[0], b[0].shape[0])


def _cost_setup_context(ctx, inputs, output) -> None:
    a, b, perms, _ = inputs
    ctx.count = len(a)
    ctx.save_for_backward(*a, *b, *perms)


def _cost_backward(ctx, grad: Tensor):
    """cost = Σ_j a_j b̃_jᵀ with b̃_j = b_j[:, perm_j]: ∂/∂a_j = grad @ b̃_j, ∂/∂b̃_j = gradᵀ @ a_j scattered back."""
    saved, count = ctx.saved_tensors, ctx.count
    a, b, perms = saved[:count], saved[count:2 * count], saved[2 * count:]
    grad_a = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_a = [grad @ (b_j[:, perm] if perm.numel() else b_j) for b_j, perm in zip(b, perms)]
    if ctx.needs_input_grad[1]:
        grad_b = [torch.zeros_like(g).index_add_(1, perm, g) if perm.numel() else g
                  for g, perm in ((grad.T @ a_j, perm) for a_j, perm in zip(a, perms))]
    return grad_a, grad_b, [None] * count, None


_permutation_cost.register_autograd(_cost_backward, setup_context=_cost_setup_context)


def permutation_cost(a: Sequence[Tensor], b: Sequence[Tensor], perms: Sequence[Tensor | None], *,
                     backend: str | None = None) -> Tensor:
    """Weight-matching cost of one permutation group: Σ_j a[j] @ b[j][:, perms[j]]ᵀ -> [n, n].

    a[j], b[j] are [n, m_j] (the group's axis first, everything else flattened); perms[j] permutes the
    other axis of b[j] (an integer tensor of length m_j) or is None.
    """
    op = "permutation_cost"
    if not (len(a) == len(b) == len(perms) >= 1):
        raise ValueError(f"{op}: a, b and perms must be non-empty and of equal length; got {len(a)}, {len(b)}, {len(perms)}")
    n = a[0].shape[0] if a[0].dim() == 2 else None
    for j, (a_j, b_j, perm) in enumerate(zip(a, b, perms)):
        if a_j.dim() != 2 or a_j.shape != b_j.shape or a_j.shape[0] != n:
            raise ValueError(f"{op}: a[{j}] and b[{j}] must both be [n, m_{j}] with n = {n} (from a[0]); "
                             f"got a[{j}] {_shape(a_j)}, b[{j}] {_shape(b_j)}")
        _check_alike(op, **{"a[0]": a[0], f"a[{j}]": a_j, f"b[{j}]": b_j})
        if perm is not None and (perm.dim() != 1 or perm.shape[0] != a_j.shape[1] or perm.is_floating_point()
                                 or perm.device != a_j.device):
            raise ValueError(f"{op}: perms[{j}] must be None or an integer tensor of length m_{j} = {a_j.shape[1]} "
                             f"on {a_j.device}; got {perm.dtype} {_shape(perm)} on {perm.device}")
    given = [a_j.new_empty(0, dtype=torch.long) if perm is None else perm.long() for a_j, perm in zip(a, perms)]
    return _permutation_cost(list(a), list(b), given, resolve_backend(backend, a[0].device, a[0].dtype))
