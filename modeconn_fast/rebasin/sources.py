"""Models given to weight matching and merging: modules, state dicts, or state-dict files left on disk.

A file, `torch.save(model.state_dict(), path)` or a `.safetensors` file (`safetensors.torch.save_file`), is
opened memory-mapped (`torch.load(mmap=True)`, `safetensors.safe_open`): its tensors are read from disk where
the matcher uses them, one group's terms at a time, and only the slices the matcher rearranges are copied into
memory. Without a module, the tensors of the objective are the floating-point
tensors of the state dict except BatchNorm's running statistics (names ending in `.running_mean`,
`.running_var`), which are the buffers a module would exclude; a spec must be given.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Union

from torch import Tensor, nn

from ..checkpoints import read_state

ModelSource = Union[nn.Module, Mapping[str, Tensor], str, os.PathLike]
RUNNING_STATISTICS = (".running_mean", ".running_var")


def read_source(source: ModelSource, label: str) -> Mapping[str, Tensor]:
    """The state dict of a module, a state dict as given, or a file's state dict memory-mapped."""
    if isinstance(source, nn.Module):
        return source.state_dict()
    if isinstance(source, Mapping):
        return source
    if isinstance(source, (str, os.PathLike)):
        if str(source).endswith(".safetensors"):
            return read_safetensors(source)
        return read_state(source, mmap=True)
    raise TypeError(f"{label} must be an nn.Module, a state dict or the path of a saved state dict, not {type(source).__name__}")


def read_safetensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of a .safetensors file, memory-mapped (no copy: each is a view of the file's mapping)."""
    try:
        from safetensors import safe_open
    except ImportError as error:
        raise ImportError(f"reading {str(path)!r} needs the safetensors package: pip install safetensors "
                          "(or modeconn_fast[safetensors])") from error
    if not Path(path).is_file():
        raise ValueError(f"{str(path)!r} does not exist (a .safetensors file of safetensors.torch.save_file)")
    with safe_open(str(path), framework="pt") as file:
        return {key: file.get_tensor(key) for key in file.keys()}


def objective_tensors(source: ModelSource, state: Mapping[str, Tensor]) -> set[str]:
    """The tensors Σ ⟨W_A, π(W_B)⟩ sums over: a module's parameters, else every floating-point tensor but
    BatchNorm's running statistics."""
    if isinstance(source, nn.Module):
        return {name for name, _ in source.named_parameters()}
    return {k for k, v in state.items() if v.is_floating_point() and not k.endswith(RUNNING_STATISTICS)}
