"""Models and data named on the command line: factories given as `module:attribute` and checkpoints saved as
state dicts (`torch.save(model.state_dict(), path)`), read with `torch.load(..., weights_only=True)`."""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn


def load_factory(spec: str, option: str) -> Callable[[], Any]:
    """The callable named `module:attribute` (attribute may be dotted, e.g. `pkg.models:Net.small`)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"{option} must be module:factory (e.g. modeconn_fast.digits:mlp), got {spec!r}")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"{option} {spec!r}: cannot import module {module_name!r} ({error})") from error
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"{option} {spec!r}: {module_name} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"{option} {spec!r} is not callable: it must build the object when called without arguments")
    return target


def read_state(path: str | os.PathLike, *, mmap: bool = False) -> dict[str, Tensor]:
    """A state dict saved with torch.save(model.state_dict(), path), read with torch.load(weights_only=True) onto
    the CPU; with `mmap`, its tensors stay in the file (memory-mapped) and are read where used."""
    if not Path(path).is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist (a .pt file of torch.save(model.state_dict()))")
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    if not (isinstance(state, Mapping) and all(isinstance(v, Tensor) for v in state.values())):
        raise ValueError(f"checkpoint {str(path)!r} is not a state dict of tensors: save it with "
                         "torch.save(model.state_dict(), path)")
    return dict(state)


def load_checkpoint(factory: Callable[[], nn.Module], path: str | Path, factory_name: str) -> nn.Module:
    """A fresh model from `factory` holding the state dict saved at `path`; names the entry and both shapes
    where the checkpoint is of another architecture."""
    model = factory()
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model {factory_name} returned a {type(model).__name__}, not an nn.Module")
    state = read_state(path)
    expected = model.state_dict()
    for name, tensor in expected.items():
        if name not in state:
            raise ValueError(f"checkpoint {path} has no entry '{name}' that the model from {factory_name} has: "
                             "is it of another architecture?")
        if state[name].shape != tensor.shape:
            raise ValueError(f"checkpoint {path}: parameter '{name}' has shape {tuple(state[name].shape)} there but "
                             f"{tuple(tensor.shape)} in the model from {factory_name}: is it of another architecture?")
    extra = [name for name in state if name not in expected]
    if extra:
        raise ValueError(f"checkpoint {path} has an entry '{extra[0]}' that the model from {factory_name} does not "
                         "have: is it of another architecture?")
    model.load_state_dict(state)
    return model.eval()
