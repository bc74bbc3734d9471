"""Triton kernel of combined_conv's forward: an implicit GEMM over all P points in one launch.

    y[p, n, o, oh, ow] = Σ_{c, kh, kw} x[p, n, c, oh·s_h − pad_h + kh·d_h, ow·s_w − pad_w + kw·d_w] · W(p)[o, c, kh, kw]
                         + Σ_k c[p,k] b_k[o],          W(p) = Σ_k c[p,k] W_k

Per point and group, the GEMM rows are (n, oh, ow), its columns the output channels of the group, its
reduction (c, kh, kw); the input tile is gathered from x with zero padding, the combined weight tile formed
in registers. A 1-d convolution runs as a 2-d one of height 1.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import configs, combine, dot, dot_in_fp32, dot_precision


_CONFIGS = configs(("BLOCK_M", "BLOCK_C", "BLOCK_R"), (64, 16, 16), [
    (128, 64, 32, 4, 3), (64, 64, 32, 4, 4), (128, 32, 32, 4, 4), (64, 32, 64, 4, 3), (128, 128, 32, 8, 3)
])


@triton.autotune(configs=_CONFIGS, key=["M", "COUT_G", "R", "K"])
@triton.jit
def _forward_kernel(
    x_ptr, w_ptr, b_ptr, c_ptr, y_ptr,
    M, COUT_G, R, GROUPS, CIN_G, H, W, OH, OW, KH, KW,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    stride_xp, stride_xn, stride_xc, stride_xh, stride_xw,
    stride_wk, stride_wo, stride_wc, stride_wh, stride_ww,
    stride_bk, stride_bo,
    stride_cp, stride_ck,
    stride_yp, stride_yn, stride_yo, stride_yh, stride_yw,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_c = tl.cdiv(COUT_G, BLOCK_C)
    per_point = GROUPS * tiles_m * tiles_c
    pid = tl.program_id(0)
    point = (pid // per_point).to(tl.int64)
    rest = pid % per_point
    group = rest // (tiles_m * tiles_c)
    rest = rest % (tiles_m * tiles_c)
    rows = (rest // tiles_c) * BLOCK_M + tl.arange(0, BLOCK_M)  # (n, oh, ow) flattened
    cols = (rest % tiles_c) * BLOCK_C + tl.arange(0, BLOCK_C)  # output channel within the group
    n = rows // (OH * OW)
    oh = (rows // OW) % OH
    ow = rows % OW
    outs = group * COUT_G + cols
    x_base = x_ptr + point * stride_xp + n[:, None] * stride_xn  # stride_xp = 0 for a shared x
    c_base = c_ptr + point * stride_cp

    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)  # (c, kh, kw) flattened
        ch = r // (KH * KW)
        kh = (r // KW) % KH
        kw = r % KW
        ih = oh[:, None] * STRIDE_H - PAD_H + kh[None, :] * DIL_H
        iw = ow[:, None] * STRIDE_W - PAD_W + kw[None, :] * DIL_W
        x_mask = (rows[:, None] < M) & (r[None, :] < R) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_tile = tl.load(x_base + (group * CIN_G + ch[None, :]) * stride_xc + ih * stride_xh + iw * stride_xw,
                         mask=x_mask, other=0.0)
        w_offsets = outs[None, :] * stride_wo + ch[:, None] * stride_wc + kh[:, None] * stride_wh + kw[:, None] * stride_ww
        w_tile = combine(w_ptr, w_offsets, (r[:, None] < R) & (cols[None, :] < COUT_G), c_base, stride_ck, stride_wk, K,
                         tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32))
        acc = dot(acc, x_tile, w_tile, DOT_FP32, PRECISION)
    if HAS_BIAS:
        acc += combine(b_ptr, outs * stride_bo, cols < COUT_G, c_base, stride_ck, stride_bk, K,
                       tl.zeros((BLOCK_C,), dtype=tl.float32))[None, :]
    y = y_ptr + point * stride_yp + n[:, None] * stride_yn + outs[None, :] * stride_yo + oh[:, None] * stride_yh \
        + ow[:, None] * stride_yw
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < COUT_G))


def forward(x: Tensor, weight: Tensor, bias: Tensor | None, coeffs: Tensor, stride: Sequence[int],
            padding: Sequence[int], dilation: Sequence[int], groups: int) -> Tensor:
    """y [P, N, Cout, *out] from x [N, C, *sp] or [P, N, C, *sp] and weight [K, Cout, C/groups, *kernel], 1-d or 2-d."""
    P, K = coeffs.shape
    one_d = weight.dim() == 4
    if one_d:  # height 1
        x, weight = x.unsqueeze(-2), weight.unsqueeze(-2)
        stride, padding, dilation = (1, *stride), (0, *padding), (1, *dilation)
    _, Cout, cin_g, KH, KW = weight.shape
    N, _, H, W = x.shape[-4:]
    OH = (H + 2 * padding[0] - dilation[0] * (KH - 1) - 1) // stride[0] + 1
    OW = (W + 2 * padding[1] - dilation[1] * (KW - 1) - 1) // stride[1] + 1
    y = torch.empty(P, N, Cout, OH, OW, device=x.device, dtype=x.dtype)
    stride_xp = 0 if x.dim() == 4 else x.stride(0)
    b = weight if bias is None else bias  # any pointer when there is no bias; never read
    M, cout_g, R = N * OH * OW, Cout // groups, cin_g * KH * KW
    grid = lambda meta: (P * groups * triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(cout_g, meta["BLOCK_C"]),)
    _forward_kernel[grid](
        x, weight, b, coeffs, y,
        M, cout_g, R, groups, cin_g, H, W, OH, OW, KH, KW,
        *stride, *padding, *dilation,
        stride_xp, *x.stride()[-4:],
        *weight.stride(),
        b.stride(0), b.stride(1),
        *coeffs.stride(),
        *y.stride(),
        K=K, HAS_BIAS=bias is not None, DOT_FP32=dot_in_fp32(x.dtype), PRECISION=dot_precision(),
    )
    return y.squeeze(-2) if one_d else y
