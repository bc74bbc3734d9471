"""Compile every Triton kernel for an H100 (sm_90) without a GPU: `python tests/compile_kernels.py`.

Triton's interpreter does not type-check a kernel the way its compiler does; this does, ahead of time, with
the first autotuning config of each kernel, for fp32 and bf16 operands. Must run without TRITON_INTERPRET.
"""
from __future__ import annotations

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner

from modeconn_fast.kernels import combined_conv, combined_linear, permutation_cost

FP32_ONLY = {"gw_ptr", "gc_ptr", "out_ptr"}  # the fp32 accumulators


def compile_for_sm90(kernel, constexprs: dict, dtype: str) -> None:
    config = kernel.configs[0] if isinstance(kernel, Autotuner) else None
    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
    constexprs = {**constexprs, **(config.kwargs if config else {})}
    signature = {name: "constexpr" if name in constexprs else
                 ("*i64" if name == "perm_ptr" else "*fp32" if name in FP32_ONLY else f"*{dtype}")
                 if name.endswith("_ptr") else "i32" for name in fn.arg_names}
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages} if config else {"num_warps": 4}
    triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                   options=options)
    print(f"{fn.__module__}.{fn.__name__} ({dtype}): compiled")


def main() -> None:
    for dtype, fp32 in (("fp32", True), ("bf16", False)):
        dots = {"DOT_FP32": fp32, "PRECISION": "tf32x3"}
        compile_for_sm90(combined_linear._forward_kernel, {"K": 3, "HAS_BIAS": True, **dots}, dtype)
        compile_for_sm90(combined_linear._grad_params_kernel, {
            "NEED_WEIGHT": True, "NEED_COEFFS": True, "K_BLOCK": 4, "BLOCK_N": 64, "BLOCK_O": 32, "BLOCK_I": 32,
            **dots}, dtype)
        compile_for_sm90(combined_conv._forward_kernel, {"K": 3, "HAS_BIAS": True, **dots}, dtype)
        compile_for_sm90(permutation_cost._cost_kernel, {"HAS_PERM": True, **dots}, dtype)


if __name__ == "__main__":
    main()
