"""`GridResult`: the metrics of a scan on its grid, with everything needed to read them later.

Saved as one `.npz` file that `numpy.load` opens without this package (no pickles):

    x               float64 [nx]          the grid's x coordinates
    y               float64 [ny]          its y coordinates (absent for a line)
    <metric>        float64 [ny, nx]      one array per metric ("loss", "error", "train_loss", ...): value[j, i]
                                          is the metric at (x[i], y[j]); [nx] for a line
    curve_<i>       float64 [n, 2]        curves projected onto the plane (names in meta["curves"])
    trajectory      float64 [n, 2]        a training trajectory's checkpoints on the plane (Plane.pca), if any
    meta            str (JSON)            {"format", "metrics", "bn_mode", "subspace", "data", "timings",
                                          "version", "curves"}
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import write_atomically
from .surface import write_vtk

FORMAT = "modeconn_fast.GridResult/1"


@dataclass
class GridResult:
    """Metrics on a grid. `values[metric]` is [len(y), len(x)] for a plane (row j is y[j]), [len(x)] for a line;
    `result["loss"]` and `result.loss` read it too.

    bn_mode: how BatchNorm ran ("recompute", "eval" or "none"). subspace: kind, variant, normalisation, seed,
    the models' coordinates ("marks"), the span of each axis and the hash of the basis tensors. data: shapes and
    hash of the evaluation data. timings: seconds and points per second. curves: name → [n, 2] coordinates drawn on plots (add your own, e.g. from
    `plane.project(basis, rows)`). trajectory: [n, 2] coordinates of a training trajectory's checkpoints in order
    (set by `scan` on a `Plane.pca`), drawn as a path with its checkpoints; None otherwise. The file format is in
    docs/FILE_FORMAT.md."""

    x: np.ndarray
    y: np.ndarray | None
    values: dict[str, np.ndarray]
    bn_mode: str
    subspace: dict[str, Any]
    data: dict[str, Any] | None
    timings: dict[str, float]
    version: str
    curves: dict[str, np.ndarray] = field(default_factory=dict)
    trajectory: np.ndarray | None = None

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(self.values)

    def __getitem__(self, metric: str) -> np.ndarray:
        if metric not in self.values:
            raise KeyError(f"no metric {metric!r} in this scan; it has {self.metrics}")
        return self.values[metric]

    def __getattr__(self, name: str) -> np.ndarray:
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        raise AttributeError(f"GridResult has no attribute or metric {name!r}")

    def save(self, path: str | Path) -> Path:
        """Write one .npz file (atomically: a temporary file, then renamed). Returns its path."""
        path = Path(path)
        if path.suffix != ".npz":
            raise ValueError(f"GridResult.save writes a .npz file, got path {str(path)!r}")
        names = list(self.curves)
        meta = {"format": FORMAT, "metrics": list(self.values), "bn_mode": self.bn_mode, "subspace": self.subspace,
                "data": self.data, "timings": self.timings, "version": self.version, "curves": names}
        arrays = {"x": self.x, **({"y": self.y} if self.y is not None else {}), **self.values,
                  **{f"curve_{i}": self.curves[name] for i, name in enumerate(names)},
                  **({"trajectory": self.trajectory} if self.trajectory is not None else {})}
        return write_atomically(path, lambda file: np.savez(file, meta=np.array(json.dumps(meta)), **arrays))

    def to_vtk(self, path: str | Path, *, metric: str | None = None, log: bool = False) -> Path:
        """Write the plane's surface as a legacy-VTK ASCII structured grid for ParaView or Blender: points
        (x[i], y[j], z[j, i]) with z = `metric` (default: the first; log10 of it with log=True), every metric as
        point data, and a `finite` flag (see `surface.py`). Returns the path."""
        return write_vtk(self, path, metric=metric, log=log)

    @classmethod
    def load(cls, path: str | Path) -> "GridResult":
        with np.load(path, allow_pickle=False) as stored:
            meta = json.loads(str(stored["meta"]))
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not a saved GridResult (format {meta.get('format')!r}, expected {FORMAT!r})")
            return cls(x=stored["x"], y=stored["y"] if "y" in stored.files else None,
                       values={m: stored[m] for m in meta["metrics"]}, bn_mode=meta["bn_mode"],
                       subspace=meta["subspace"], data=meta["data"], timings=meta["timings"], version=meta["version"],
                       curves={name: stored[f"curve_{i}"] for i, name in enumerate(meta["curves"])},
                       trajectory=stored["trajectory"] if "trajectory" in stored.files else None)

    def __repr__(self) -> str:
        shape = next(iter(self.values.values())).shape if self.values else ()
        return (f"GridResult({self.subspace.get('kind')} {self.subspace.get('variant')}, shape {shape}, "
                f"metrics {self.metrics}, bn_mode={self.bn_mode!r})")
