"""Training trajectories kept on disk: `TrajectoryRecorder` saves a model's state dict every few steps of your own
training loop, one file per checkpoint, for `Plane.pca` (Li et al. 2018, "Visualizing the Loss Landscape of
Neural Nets", §7: "what do I save during training?" — the parameters at regular steps, nothing else).

    out/step_000000.pt, out/step_000100.pt, ...   torch.save(model.state_dict()), written atomically
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .atomic import write_atomically

PATTERN = "step_*.pt"


class TrajectoryRecorder:
    """Call `step()` once per optimizer step (or epoch): every `every`-th call writes `out/step_<count>.pt`.
    `save()` writes one now (e.g. the initial model before training). Nothing is kept in memory but the file
    names: `files` lists them in the order written, ready for `Plane.pca(recorder.files, like=model)`.

    Each file is written to a temporary name in `out` and renamed, so a killed run leaves whole files only.
    `out` must not hold the checkpoints of another run (pass a fresh folder)."""

    def __init__(self, model: nn.Module, *, every: int = 1, out: str | os.PathLike):
        if not isinstance(model, nn.Module):
            raise TypeError(f"TrajectoryRecorder records an nn.Module, got {type(model).__name__}")
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be a positive integer (save at every every-th step()), got {every!r}")
        self.model = model
        self.every = every
        self.out = Path(out)
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"out={str(out)!r} is a file, not a folder")
        if self.out.is_dir() and any(self.out.glob(PATTERN)):
            raise ValueError(f"out={str(out)!r} already holds checkpoints ({PATTERN}) of another run: pass a new "
                             "folder, or remove them first")
        self.out.mkdir(parents=True, exist_ok=True)
        self.steps = 0
        self.files: list[Path] = []

    def step(self) -> Path | None:
        """Count one step; write a checkpoint if the count is a multiple of `every`. Returns its path, or None."""
        self.steps += 1
        return self.save() if self.steps % self.every == 0 else None

    def save(self) -> Path:
        """Write the model's state dict now, named by the current step count; returns its path."""
        path = self.out / f"step_{self.steps:06d}.pt"
        if path in self.files:
            return path
        write_atomically(path, lambda file: torch.save(self.model.state_dict(), file))
        self.files.append(path)
        return path

    def __repr__(self) -> str:
        return f"TrajectoryRecorder(every={self.every}, out={str(self.out)!r}, steps={self.steps}, files={len(self.files)})"
