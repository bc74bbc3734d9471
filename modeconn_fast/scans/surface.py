"""A plane's scan as a surface: heights z = metric (or log10 of it) over the grid, and the legacy VTK file that
ParaView (File ▸ Open) and Blender's VTK importers read.

The file is a legacy-VTK ASCII structured grid (VTK User's Guide, "VTK File Formats"):

    # vtk DataFile Version 3.0
    <one line: what the surface is>
    ASCII
    DATASET STRUCTURED_GRID
    DIMENSIONS nx ny 1
    POINTS nx·ny double                 point n = j·nx + i (x fastest) at (x[i], y[j], z[j, i])
    POINT_DATA nx·ny
    SCALARS <metric> double 1           every metric's values in the same order (one block each), then
    SCALARS finite double 1             1 where every metric is finite, 0 where some is not (a diverged point)

Non-finite values (NaN, ±inf, which VTK's readers do not parse) are written as the largest finite value of their
array and flagged 0 in `finite`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .result import GridResult


def surface_heights(values: np.ndarray, *, log: bool) -> tuple[np.ndarray, float | None]:
    """(z, floor): the values (non-finite kept as NaN) or, with log, log10 of the values clipped below at
    floor = max(smallest positive value, 1e-4 · largest) so that zeros (an error of 0) stay on the surface."""
    values = np.where(np.isfinite(values), values, np.nan)
    if not log:
        return values, None
    finite = values[np.isfinite(values)]
    positive = finite[finite > 0]
    if positive.size == 0:
        raise ValueError("a logarithmic height needs positive values; this metric has none (pass log=False)")
    floor = max(float(positive.min()), 1e-4 * float(positive.max()))
    return np.log10(np.clip(values, floor, None)), floor


def write_vtk(result: "GridResult", path: str | os.PathLike, *, metric: str | None = None, log: bool = False) -> Path:
    """Write `result` (a plane's scan) as a legacy-VTK structured grid with heights from `metric` (default: the
    first; log10 of it with log=True), every metric as point data. Written atomically; returns the path."""
    if result.y is None:
        raise ValueError("to_vtk writes the surface of a plane's scan; this is a line's (its profile is "
                         "result.x against result[metric])")
    metric = metric or result.metrics[0]
    heights, _ = surface_heights(result[metric], log=log)
    nx, ny = result.x.size, result.y.size
    grid_x, grid_y = np.meshgrid(result.x, result.y)  # [ny, nx]: row j is y[j], as the values
    points = np.stack([grid_x.ravel(), grid_y.ravel(), _filled(heights).ravel()], axis=1)
    finite = np.all([np.isfinite(result[m]).ravel() for m in result.metrics], axis=0)
    height = f"log10({metric})" if log else metric
    title = f"modeconn_fast GridResult: z = {height} on a {result.subspace.get('kind', 'plane')} " \
            f"({result.subspace.get('variant', '')}), x fastest"
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "w", encoding="ascii") as file:
        file.write(f"# vtk DataFile Version 3.0\n{title[:255]}\nASCII\nDATASET STRUCTURED_GRID\n"
                   f"DIMENSIONS {nx} {ny} 1\nPOINTS {nx * ny} double\n")
        np.savetxt(file, points, fmt="%.17g")
        file.write(f"POINT_DATA {nx * ny}\n")
        arrays = {_vtk_name(m): _filled(result[m]) for m in result.metrics} | {"finite": finite.astype(np.float64)}
        for name, array in arrays.items():
            file.write(f"SCALARS {name} double 1\nLOOKUP_TABLE default\n")
            np.savetxt(file, array.reshape(-1, 1), fmt="%.17g")
    os.replace(temporary, path)
    return path


def _filled(values: np.ndarray) -> np.ndarray:
    """Non-finite entries replaced by the largest finite value (0 if there is none)."""
    finite = np.isfinite(values)
    return np.where(finite, values, values[finite].max() if finite.any() else 0.0).astype(np.float64)


def _vtk_name(metric: str) -> str:
    """Array names in VTK's legacy files cannot hold spaces."""
    return "".join(c if c.isalnum() or c in "_-." else "_" for c in metric)
