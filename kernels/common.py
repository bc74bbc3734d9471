"""What the Triton kernels share: whether they run in the interpreter, and the precision of fp32 dot products."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton import knobs

# @triton.jit decides between compiled and interpreted code when a kernel is defined, i.e. on import.
INTERPRETED: bool = bool(knobs.runtime.interpret)


def configs(names: tuple[str, str, str], interpreted: tuple[int, int, int],
            shapes: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    """Autotuning configs from (block, block, block, num_warps, num_stages) rows; in the interpreter, whose
    autotune takes a single config only, just the `interpreted` blocks."""
    if INTERPRETED:
        return [triton.Config(dict(zip(names, interpreted)), num_warps=1)]
    return [triton.Config(dict(zip(names, row[:3])), num_warps=row[3], num_stages=row[4]) for row in shapes]


def dot_precision() -> str:
    """tl.dot's input_precision for fp32 operands. On a GPU with torch's fp32 matmul precision at "highest"
    (its default): "tf32x3", three TF32 products on the tensor cores whose error is at fp32's level; Triton's
    "ieee" dot runs on the CUDA cores instead and was measured at 4 TFLOP/s on an H200 (cuBLAS: 52). With
    "high" or "medium": plain "tf32". The interpreter computes exactly ("ieee")."""
    if INTERPRETED:
        return "ieee"
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Whether tl.dot must see fp32 operands: always in the interpreter, whose bf16 dot is wrong."""
    return INTERPRETED or dtype == torch.float32


@triton.jit
def combine(base_ptr, offsets, mask, coeff_ptr, stride_coeff, stride_basis, K: tl.constexpr, acc):
    """acc + Σ_k coeff[k] · base[k·stride_basis + offsets] in fp32: one tile of a combined weight or bias.
    K is a compile-time constant, so the loop unrolls and its loads join the GEMM loop's software pipeline."""
    for k in tl.static_range(K):
        coeff = tl.load(coeff_ptr + k * stride_coeff).to(tl.float32)
        acc += coeff * tl.load(base_ptr + k * stride_basis + offsets, mask=mask, other=0.0).to(tl.float32)
    return acc


@triton.jit
def dot(acc, a, b, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b: fp32 operands where `dot_in_fp32`, else both in a's dtype."""
    if DOT_FP32:
        acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
    else:
        acc += tl.dot(a, b.to(a.dtype))
    return acc
