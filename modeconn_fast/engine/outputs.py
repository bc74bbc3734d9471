"""Which part of a model's output the engine scores: `output=` of `evaluate` (and of everything built on it).

    output=None      the model returns one tensor (logits [N, ...])
    output=0         out[0] of a tuple or list
    output="logits"  out["logits"] of a dict, or out.logits of a dataclass (e.g. a Hugging Face ModelOutput)
    output=callable  output(out), any tensor the callable picks
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Union

from torch import Tensor

OutputSelector = Union[int, str, Callable[[Any], Tensor], None]


class ModelOutputError(TypeError):
    """The model's output is not one tensor with the batch axis first."""


class OutputSelectionError(ModelOutputError):
    """The model's output holds no tensor where `output=` says (or several parts and no `output=`)."""


def pick_output(out: Any, output: OutputSelector) -> Tensor:
    """The tensor of `out` that `output` names (see the module docstring)."""
    if output is None:
        if isinstance(out, Tensor):
            return out
        raise OutputSelectionError(f"the model returned {_describe(out)}, not one tensor: pass output= to say which "
                                   f"part holds the logits (an index, a key, or a callable), e.g. "
                                   f"output={_example(out)!r}")
    try:
        if callable(output):
            picked = output(out)
        elif isinstance(output, str):
            picked = out[output] if isinstance(out, Mapping) else getattr(out, output)
        elif isinstance(output, int) and not isinstance(output, bool):
            picked = out[output]
        else:
            raise OutputSelectionError(f"output= must be an index, a key or a callable, got {type(output).__name__}")
    except (KeyError, IndexError, AttributeError, TypeError) as error:
        if isinstance(error, OutputSelectionError):
            raise
        raise OutputSelectionError(f"output={output!r} does not pick a part of the model's output, "
                                   f"{_describe(out)} ({type(error).__name__}: {error})") from error
    if not isinstance(picked, Tensor):
        raise OutputSelectionError(f"output={output!r} picked {type(picked).__name__} from the model's output, "
                                   f"{_describe(out)}; it must pick a tensor")
    return picked


def _describe(out: Any) -> str:
    if isinstance(out, Mapping):
        return f"a {type(out).__name__} with keys {list(out)}"
    if dataclasses.is_dataclass(out):
        return f"a {type(out).__name__} with fields {[f.name for f in dataclasses.fields(out)]}"
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)} items"
    return f"a {type(out).__name__}"


def _example(out: Any) -> int | str:
    names = list(out) if isinstance(out, Mapping) else (
        [f.name for f in dataclasses.fields(out)] if dataclasses.is_dataclass(out) else [])
    if not names:
        return 0
    return "logits" if "logits" in names else names[0]
