"""Shared checks of the ops against the float64 references of `modeconn_fast.reference`, for either backend.

Every check draws fresh random inputs (the seed is in the failure message), runs with PyTorch's
`fill_uninitialized_memory` so that any output buffer an implementation forgets to write is NaN, and
compares the output and the gradient of every input that takes one.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import Tensor

from modeconn_fast import ops, reference


def fresh_generator() -> tuple[torch.Generator, int]:
    seed = int.from_bytes(os.urandom(4), "little")
    return torch.Generator().manual_seed(seed), seed


@contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Fill every uninitialised allocation (torch.empty and friends) with NaN while inside."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_filling = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.utils.deterministic.fill_uninitialized_memory = was_filling


def _compare(run: Callable[..., Tensor], reference_run: Callable[..., Tensor], inputs: dict[str, Tensor | None],
             seed: int, generator: torch.Generator, device: str, atol: float = 1e-4) -> None:
    """Output and gradients of `run` (fp32, on device) against `reference_run` (float64, CPU, autograd)."""
    differentiable = {name: t for name, t in inputs.items() if t is not None and t.is_floating_point()}
    ours = {name: (t.to(device).requires_grad_() if name in differentiable else (None if t is None else t.to(device)))
            for name, t in inputs.items()}
    theirs = {name: (t.double().requires_grad_() if name in differentiable else t) for name, t in inputs.items()}
    with poisoned_outputs():
        y = run(**ours)
    y_ref = reference_run(**theirs)
    where = f"(seed {seed})"
    torch.testing.assert_close(y.detach().cpu().double(), y_ref.detach(), rtol=1e-4, atol=atol, msg=lambda m: f"output {where}: {m}")
    upstream = torch.randn(y_ref.shape, generator=generator, dtype=torch.float64)
    with poisoned_outputs():
        grads = torch.autograd.grad(y, [ours[name] for name in differentiable], upstream.to(device, y.dtype))
    grads_ref = torch.autograd.grad(y_ref, [theirs[name] for name in differentiable], upstream)
    for name, grad, grad_ref in zip(differentiable, grads, grads_ref):
        torch.testing.assert_close(grad.cpu().double(), grad_ref, rtol=1e-4, atol=atol,
                                   msg=lambda m, name=name: f"gradient of {name} {where}: {m}")


def check_linear(points: int, bases: int, shared: bool, with_bias: bool, backend: str, device: str = "cpu",
                 n: int = 37, din: int = 19, dout: int = 23) -> None:
    g, seed = fresh_generator()
    inputs = {
        "x": torch.randn(*([] if shared else [points]), n, din, generator=g),
        "weight": torch.randn(bases, dout, din, generator=g) / din ** 0.5,
        "bias": torch.randn(bases, dout, generator=g) if with_bias else None,
        "coeffs": torch.randn(points, bases, generator=g),
    }
    _compare(lambda **t: ops.combined_linear(**t, backend=backend), reference.combined_linear, inputs, seed, g, device)


def check_conv(points: int, bases: int, shared: bool, with_bias: bool, backend: str, *, spatial: int = 2,
               groups: int = 1, stride: int = 1, padding: int | str = 0, dilation: int = 1, device: str = "cpu",
               n: int = 3, channels: int = 4, out_channels: int = 6, size: int = 9) -> None:
    g, seed = fresh_generator()
    kernel = (3, 2)[:spatial]
    sizes = (size, size - 2)[:spatial]
    inputs = {
        "x": torch.randn(*([] if shared else [points]), n, channels, *sizes, generator=g),
        "weight": torch.randn(bases, out_channels, channels // groups, *kernel, generator=g) / channels ** 0.5,
        "bias": torch.randn(bases, out_channels, generator=g) if with_bias else None,
        "coeffs": torch.randn(points, bases, generator=g),
    }
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    _compare(lambda **t: ops.combined_conv(**t, **options, backend=backend),
             lambda **t: reference.combined_conv(**t, **options), inputs, seed, g, device)


def check_permutation_cost(widths: tuple[int, ...], permuted: tuple[bool, ...], backend: str, device: str = "cpu",
                           n: int = 23) -> None:
    g, seed = fresh_generator()
    inputs: dict[str, Tensor | None] = {}
    for j, (m, has_perm) in enumerate(zip(widths, permuted)):
        inputs[f"a{j}"] = torch.randn(n, m, generator=g)
        inputs[f"b{j}"] = torch.randn(n, m, generator=g)
        inputs[f"perm{j}"] = torch.randperm(m, generator=g) if has_perm else None

    def split(fn):
        def run(**t):
            count = len(widths)
            return fn([t[f"a{j}"] for j in range(count)], [t[f"b{j}"] for j in range(count)],
                      [t[f"perm{j}"] for j in range(count)])
        return run

    _compare(split(lambda a, b, perms: ops.permutation_cost(a, b, perms, backend=backend)),
             split(reference.permutation_cost), inputs, seed, g, device)
