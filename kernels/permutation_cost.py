"""Triton kernel of the weight-matching cost: cost = Σ_j a_j @ b_j[:, perm_j]ᵀ, the column gather done while loading.

One launch per term j adds a_j @ b_j[:, perm_j]ᵀ into an fp32 accumulator (the launches run in order, so
the sum is deterministic); the result is cast to the inputs' dtype at the end.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import configs, dot, dot_in_fp32, dot_precision


_CONFIGS = configs(("BLOCK_R", "BLOCK_C", "BLOCK_M"), (16, 16, 16), [
    (128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 64, 64, 4, 3), (64, 128, 32, 4, 4)
])


@triton.autotune(configs=_CONFIGS, key=["N", "M"], restore_value=["out_ptr"])  # trials must not add twice
@triton.jit
def _cost_kernel(
    a_ptr, b_ptr, perm_ptr, out_ptr,
    N, M,
    stride_ar, stride_am, stride_br, stride_bm, stride_or, stride_oc,
    HAS_PERM: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """out[r, c] += Σ_m a[r, m] · b[c, perm[m]] for one (BLOCK_R, BLOCK_C) tile."""
    tiles_c = tl.cdiv(N, BLOCK_C)
    pid = tl.program_id(0)
    rows = (pid // tiles_c) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (pid % tiles_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        a_tile = tl.load(a_ptr + rows[:, None] * stride_ar + m[None, :] * stride_am,
                         mask=(rows[:, None] < N) & (m[None, :] < M), other=0.0)
        if HAS_PERM:
            source = tl.load(perm_ptr + m, mask=m < M, other=0)
        else:
            source = m
        b_tile = tl.load(b_ptr + cols[None, :] * stride_br + source[:, None] * stride_bm,
                         mask=(m[:, None] < M) & (cols[None, :] < N), other=0.0)  # [BLOCK_M, BLOCK_C] = b[:, perm]ᵀ
        acc = dot(acc, a_tile, b_tile, DOT_FP32, PRECISION)
    out = out_ptr + rows[:, None] * stride_or + cols[None, :] * stride_oc
    mask = (rows[:, None] < N) & (cols[None, :] < N)
    tl.store(out, tl.load(out, mask=mask, other=0.0) + acc, mask=mask)


def permutation_cost(a: Sequence[Tensor], b: Sequence[Tensor], perms: Sequence[Tensor | None]) -> Tensor:
    """Σ_j a[j] @ b[j][:, perms[j]]ᵀ for a[j], b[j] of shape [n, m_j] -> [n, n]."""
    n = a[0].shape[0]
    cost = torch.zeros(n, n, device=a[0].device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_R"]) * triton.cdiv(n, meta["BLOCK_C"]),)
    for a_j, b_j, perm in zip(a, b, perms):
        _cost_kernel[grid](
            a_j, b_j, a_j if perm is None else perm, cost,  # any pointer when there is no permutation; never read
            n, a_j.shape[1],
            *a_j.stride(), *b_j.stride(), *cost.stride(),
            HAS_PERM=perm is not None, DOT_FP32=dot_in_fp32(a_j.dtype), PRECISION=dot_precision(),
        )
    return cost.to(a[0].dtype)
