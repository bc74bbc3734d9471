"""Triton kernels of combined_linear, all P points in one launch, W(p) = Σ_k c[p,k] W_k never written to memory.

    forward:      y[p] = x[p] @ W(p)ᵀ + Σ_k c[p,k] b_k        (x may be shared: stride 0 on the point axis)
    grad_params:  ∂/∂W_k = Σ_p c[p,k] grad[p]ᵀ x[p],   ∂/∂c[p,k] = ⟨grad[p]ᵀ x[p], W_k⟩

The forward kernel forms each combined weight tile in registers inside the GEMM's reduction loop. The
gradient kernel computes each tile of grad[p]ᵀ x[p] once and folds it into all K weight gradients and into
the coefficient gradients; points are split across programs and the partial sums added afterwards, so the
result is deterministic. ∂/∂x of a per-point x is the forward kernel on the transposed basis.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import INTERPRETED, configs, combine, dot, dot_in_fp32, dot_precision


_CONFIGS = configs(("BLOCK_N", "BLOCK_O", "BLOCK_I"), (32, 32, 16), [
    (128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 64, 4, 3), (32, 64, 64, 4, 4),
    (16, 128, 64, 4, 3), (16, 64, 64, 4, 4)
])


@triton.autotune(configs=_CONFIGS, key=["N", "DIN", "DOUT", "K"])
@triton.jit
def _forward_kernel(
    x_ptr, w_ptr, b_ptr, c_ptr, y_ptr,
    N, DIN, DOUT, K,
    stride_xp, stride_xn, stride_xi,
    stride_wk, stride_wo, stride_wi,
    stride_bk, stride_bo,
    stride_cp, stride_ck,
    stride_yp, stride_yn, stride_yo,
    HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
):
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_o = tl.cdiv(DOUT, BLOCK_O)
    pid = tl.program_id(0)
    point = (pid // (tiles_n * tiles_o)).to(tl.int64)
    tile = pid % (tiles_n * tiles_o)
    rows = (tile // tiles_o) * BLOCK_N + tl.arange(0, BLOCK_N)
    outs = (tile % tiles_o) * BLOCK_O + tl.arange(0, BLOCK_O)
    ins = tl.arange(0, BLOCK_I)
    x_base = x_ptr + point * stride_xp  # stride_xp = 0 for a shared x
    c_base = c_ptr + point * stride_cp

    acc = tl.zeros((BLOCK_N, BLOCK_O), dtype=tl.float32)
    for i0 in range(0, DIN, BLOCK_I):
        i = i0 + ins
        x_tile = tl.load(x_base + rows[:, None] * stride_xn + i[None, :] * stride_xi,
                         mask=(rows[:, None] < N) & (i[None, :] < DIN), other=0.0)
        w_tile = combine(w_ptr, outs[None, :] * stride_wo + i[:, None] * stride_wi,  # Σ_k c[p,k] W_kᵀ, this tile
                         (i[:, None] < DIN) & (outs[None, :] < DOUT), c_base, stride_ck, stride_wk, K,
                         tl.zeros((BLOCK_I, BLOCK_O), dtype=tl.float32))
        acc = dot(acc, x_tile, w_tile, DOT_FP32, PRECISION)
    if HAS_BIAS:
        acc += combine(b_ptr, outs * stride_bo, outs < DOUT, c_base, stride_ck, stride_bk, K,
                       tl.zeros((BLOCK_O,), dtype=tl.float32))[None, :]
    tl.store(y_ptr + point * stride_yp + rows[:, None] * stride_yn + outs[None, :] * stride_yo,
             acc.to(y_ptr.dtype.element_ty), mask=(rows[:, None] < N) & (outs[None, :] < DOUT))


def forward(x: Tensor, weight: Tensor, bias: Tensor | None, coeffs: Tensor) -> Tensor:
    """y [P, N, Dout] from x [N, Din] or [P, N, Din], weight [K, Dout, Din] (any strides), bias [K, Dout] or None."""
    P, K = coeffs.shape
    _, Dout, Din = weight.shape
    N = x.shape[-2]
    y = torch.empty(P, N, Dout, device=x.device, dtype=x.dtype)
    stride_xp = 0 if x.dim() == 2 else x.stride(0)
    b = weight if bias is None else bias  # any pointer when there is no bias; never read
    grid = lambda meta: (P * triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(Dout, meta["BLOCK_O"]),)
    _forward_kernel[grid](
        x, weight, b, coeffs, y,
        N, Din, Dout, K,
        stride_xp, x.stride(-2), x.stride(-1),
        *weight.stride(),
        b.stride(0), b.stride(1),
        *coeffs.stride(),
        *y.stride(),
        HAS_BIAS=bias is not None, DOT_FP32=dot_in_fp32(x.dtype), PRECISION=dot_precision(),
    )
    return y


@triton.jit
def _grad_params_kernel(
    g_ptr, x_ptr, w_ptr, c_ptr, gw_ptr, gc_ptr,
    P, N, DIN, DOUT, K, SPLITS,
    stride_gp, stride_gn, stride_go,
    stride_xp, stride_xn, stride_xi,
    stride_wk, stride_wo, stride_wi,
    stride_cp, stride_ck,
    NEED_WEIGHT: tl.constexpr, NEED_COEFFS: tl.constexpr, DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr, K_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    """Program (split s, tile t): gw_part[s, :, tile t] = Σ_{p ≡ s} c[p,:] ⊗ G_p and gc_part[t, p, :] = ⟨G_p, W_:⟩,
    where G_p = grad[p]ᵀ x[p] restricted to the tile."""
    tiles_o = tl.cdiv(DOUT, BLOCK_O)
    tiles_i = tl.cdiv(DIN, BLOCK_I)
    pid = tl.program_id(0)
    split = pid // (tiles_o * tiles_i)
    tile = (pid % (tiles_o * tiles_i)).to(tl.int64)
    outs = (tile // tiles_i) * BLOCK_O + tl.arange(0, BLOCK_O)
    ins = (tile % tiles_i) * BLOCK_I + tl.arange(0, BLOCK_I)
    ks = tl.arange(0, K_BLOCK)
    rows = tl.arange(0, BLOCK_N)
    tile_mask = (outs[:, None] < DOUT) & (ins[None, :] < DIN)
    mask3 = (ks[:, None, None] < K) & tile_mask[None, :, :]
    if NEED_COEFFS:
        w3 = tl.load(w_ptr + ks[:, None, None] * stride_wk + outs[None, :, None] * stride_wo
                     + ins[None, None, :] * stride_wi, mask=mask3, other=0.0).to(tl.float32)
    acc_w = tl.zeros((K_BLOCK, BLOCK_O, BLOCK_I), dtype=tl.float32)

    for step in range(0, tl.cdiv(P - split, SPLITS)):
        p = (split + step * SPLITS).to(tl.int64)
        g_base = g_ptr + p * stride_gp
        x_base = x_ptr + p * stride_xp  # stride_xp = 0 for a shared x
        acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            n = n0 + rows
            g_t = tl.load(g_base + outs[:, None] * stride_go + n[None, :] * stride_gn,
                          mask=(outs[:, None] < DOUT) & (n[None, :] < N), other=0.0)
            x_t = tl.load(x_base + n[:, None] * stride_xn + ins[None, :] * stride_xi,
                          mask=(n[:, None] < N) & (ins[None, :] < DIN), other=0.0)
            acc = dot(acc, g_t, x_t, DOT_FP32, PRECISION)
        c = tl.load(c_ptr + p * stride_cp + ks * stride_ck, mask=ks < K, other=0.0).to(tl.float32)
        if NEED_WEIGHT:
            acc_w += c[:, None, None] * acc[None, :, :]
        if NEED_COEFFS:
            partial = tl.sum(tl.sum(w3 * acc[None, :, :], axis=2), axis=1)
            tl.store(gc_ptr + (tile * P + p) * K + ks, partial, mask=ks < K)

    if NEED_WEIGHT:
        gw = gw_ptr + split.to(tl.int64) * K * DOUT * DIN + ks[:, None, None] * DOUT * DIN + outs[None, :, None] * DIN + ins[None, None, :]
        tl.store(gw, acc_w, mask=mask3)


def grad_params(grad: Tensor, x: Tensor, weight: Tensor, coeffs: Tensor, need_weight: bool,
                need_coeffs: bool) -> tuple[Tensor, Tensor]:
    """∂/∂W [K, Dout, Din] and the weight part of ∂/∂c [P, K]; an empty tensor for each one not needed."""
    P, K = coeffs.shape
    _, Dout, Din = weight.shape
    N = grad.shape[1]
    k_block = triton.next_power_of_2(K)
    block_o = 16 if INTERPRETED or k_block > 4 else 32  # K_BLOCK·BLOCK_O·BLOCK_I accumulators in registers
    block_i, block_n = 32, 32 if INTERPRETED else 64
    tiles = triton.cdiv(Dout, block_o) * triton.cdiv(Din, block_i)
    target_programs = 4 if INTERPRETED else 4 * torch.cuda.get_device_properties(grad.device).multi_processor_count
    splits = max(1, min(P, target_programs // tiles)) if need_weight else 1
    gw_part = torch.empty(splits if need_weight else 0, K, Dout, Din, device=grad.device, dtype=torch.float32)
    gc_part = torch.empty(tiles if need_coeffs else 0, P, K, device=grad.device, dtype=torch.float32)
    _grad_params_kernel[(splits * tiles,)](
        grad, x, weight, coeffs, gw_part, gc_part,
        P, N, Din, Dout, K, splits,
        *grad.stride(),
        0 if x.dim() == 2 else x.stride(0), x.stride(-2), x.stride(-1),
        *weight.stride(),
        *coeffs.stride(),
        NEED_WEIGHT=need_weight, NEED_COEFFS=need_coeffs, DOT_FP32=dot_in_fp32(grad.dtype),
        PRECISION=dot_precision(), K_BLOCK=k_block, BLOCK_N=block_n, BLOCK_O=block_o, BLOCK_I=block_i,
        num_warps=1 if INTERPRETED else 4,
    )
    empty = grad.new_empty(0)
    grad_weight = gw_part.sum(0).to(grad.dtype) if need_weight else empty
    grad_coeffs = gc_part.sum(0).to(grad.dtype) if need_coeffs else empty
    return grad_weight, grad_coeffs
