"""3-D views of a plane's scan: the surface z = metric (log10 by default) as a static matplotlib figure and as a
self-contained interactive HTML page (plotly, with plotly.js embedded: it opens offline in any browser), with the
models, the stored curves and a training trajectory drawn on the surface."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.interpolate import RegularGridInterpolator  # noqa: E402

from .plot import axis_label, subspace_phrase  # noqa: E402
from .scans import GridResult  # noqa: E402
from .scans.surface import surface_heights  # noqa: E402

COLORS = ("orange", "red", "magenta", "cyan", "white")


def plot_surface(result: GridResult, file: str | Path, *, metric: str | None = None, log: bool = True,
                 title: str = "") -> Path:
    """The surface of `metric` (default: the first) over the plane, seen from above at an angle, written to `file`
    (the suffix picks PNG, PDF or SVG). log: heights are log10 of the values (zeros clipped, see
    `surface_heights`)."""
    metric, z, label = _heights(result, metric, log)
    figure = plt.figure(figsize=(8, 6.4))
    axis = figure.add_subplot(projection="3d")
    grid_x, grid_y = np.meshgrid(result.x, result.y)
    axis.plot_surface(grid_x, grid_y, np.ma.masked_invalid(z), cmap="viridis", linewidth=0, antialiased=True,
                      alpha=0.85, rcount=min(z.shape[0], 120), ccount=min(z.shape[1], 120))
    for (name, points, lifted), color in zip(_paths(result, z), COLORS):
        axis.plot(points[:, 0], points[:, 1], lifted, color=color, linewidth=2.5, label=name, zorder=10)
    for name, (x, y, height) in _marks(result, z).items():
        axis.scatter([x], [y], [height], color="white", edgecolor="black", s=40, depthshade=False, zorder=11)
        axis.text(x, y, height, f"  {name}", color="black", fontweight="bold", zorder=12)
    if result.curves or result.trajectory is not None:
        axis.legend(loc="upper left")
    axis.set(xlabel=axis_label(result.subspace, 0), ylabel=axis_label(result.subspace, 1), zlabel=label,
             title=title or f"{metric} on {subspace_phrase(result.subspace)}")
    axis.view_init(elev=35, azim=-60)
    figure.tight_layout()
    file = Path(file)
    figure.savefig(file, dpi=120)
    plt.close(figure)
    return file


def surface_html(result: GridResult, file: str | Path, *, metric: str | None = None, log: bool = True,
                 title: str = "") -> Path:
    """The same surface as an interactive page (turn, zoom, hover for values) written to `file` (.html), with
    plotly.js inside it: no network is needed to view it."""
    import plotly.graph_objects as go

    metric, z, label = _heights(result, metric, log)
    raw = np.where(np.isfinite(result[metric]), result[metric], np.nan)
    figure = go.Figure(go.Surface(
        x=result.x, y=result.y, z=z, customdata=raw, colorscale="Viridis", colorbar={"title": {"text": label}},
        hovertemplate=f"x %{{x:.4g}}<br>y %{{y:.4g}}<br>{metric} %{{customdata:.5g}}<extra></extra>",
        contours={"z": {"show": True, "usecolormap": True, "project": {"z": True}}}, name=metric))
    for (name, points, lifted), color in zip(_paths(result, z), COLORS):
        figure.add_trace(go.Scatter3d(x=points[:, 0], y=points[:, 1], z=lifted, name=name,
                                      mode="lines+markers" if name == "training trajectory" else "lines",
                                      line={"width": 6, "color": color}, marker={"size": 3, "color": color}))
    marks = _marks(result, z)
    if marks:
        coords = np.array(list(marks.values()))
        figure.add_trace(go.Scatter3d(x=coords[:, 0], y=coords[:, 1], z=coords[:, 2], text=list(marks),
                                      mode="markers+text", name="models", textposition="top center",
                                      marker={"size": 6, "color": "white", "line": {"width": 2, "color": "black"}}))
    span_x, span_y = np.ptp(result.x), np.ptp(result.y)
    equal = result.subspace.get("variant") == "through" and span_x > 0 and span_y > 0
    ratio = {"x": 1.0, "y": span_y / span_x, "z": 0.6} if equal else {"x": 1.0, "y": 1.0, "z": 0.6}
    figure.update_layout(
        title={"text": title or f"{metric} on {subspace_phrase(result.subspace)} (BatchNorm: {result.bn_mode})"},
        scene={"xaxis": {"title": {"text": axis_label(result.subspace, 0)}},
               "yaxis": {"title": {"text": axis_label(result.subspace, 1)}},
               "zaxis": {"title": {"text": label}}, "aspectmode": "manual", "aspectratio": ratio,
               "camera": {"eye": {"x": 0.4, "y": 1.1, "z": 1.9}}},  # from the side of positive y (θ_1, the curve)
        margin={"l": 0, "r": 0, "t": 50, "b": 0}, legend={"x": 0.01, "y": 0.99})
    file = Path(file)
    figure.write_html(file, include_plotlyjs=True, full_html=True, config={"displaylogo": False})
    return file


def _heights(result: GridResult, metric: str | None, log: bool) -> tuple[str, np.ndarray, str]:
    if result.y is None:
        raise ValueError("a surface needs a plane's scan; this is a line's (draw it with plot_scan)")
    metric = metric or result.metrics[0]
    z, _ = surface_heights(result[metric], log=log)
    return metric, z, f"log10 {metric}" if log else metric


def _lift(result: GridResult, z: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Heights of the surface at points [n, 2] (bilinear between grid points; NaN outside the grid)."""
    surface = RegularGridInterpolator((result.y, result.x), z, bounds_error=False, fill_value=np.nan)
    return surface(np.stack([points[:, 1], points[:, 0]], axis=1))


def _paths(result: GridResult, z: np.ndarray) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, points [n, 2], heights [n]) of every stored curve and the training trajectory, lifted onto the
    surface (a little above it, so that they are not hidden)."""
    lift = 0.01 * (np.nanmax(z) - np.nanmin(z))
    paths = dict(result.curves)
    if result.trajectory is not None:
        paths["training trajectory"] = result.trajectory
    return [(name, points, _lift(result, z, points) + lift) for name, points in paths.items()]


def _marks(result: GridResult, z: np.ndarray) -> dict[str, tuple[float, float, float]]:
    marks = result.subspace.get("marks", {})
    if not marks:
        return {}
    points = np.array([coords for coords in marks.values()], dtype=np.float64)
    lift = 0.01 * (np.nanmax(z) - np.nanmin(z))
    return {name: (float(x), float(y), float(h) + lift) for (name, (x, y)), h in zip(marks.items(), _lift(result, z, points))}
