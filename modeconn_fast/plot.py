"""Pictures: metrics and sharpness along paths; calibration of ensembles; scans of planes (log-spaced contours or a heatmap, the
models and curves drawn on them) and of lines."""
from __future__ import annotations

from pathlib import Path

import matplotlib
import torch
from torch import Tensor

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from .analysis import CurvatureResult  # noqa: E402
from .engine.calibration import ReliabilityBins  # noqa: E402
from .paths import PathResult  # noqa: E402
from .scans import GridResult  # noqa: E402


def plot_paths(paths: dict[str, PathResult], file: str | Path, *, title: str = "") -> Path:
    """Loss (left) and error (right) against t, one line per labelled path; written to `file` (PNG)."""
    figure, (loss_axis, error_axis) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, path in paths.items():
        style = "--" if "test" in label else "-"
        loss_axis.plot(path.t, path.loss, style, marker=".", label=label)
        if path.error is not None:
            error_axis.plot(path.t, 100 * path.error, style, marker=".", label=label)
    loss_axis.set(xlabel="t", ylabel="loss", title="loss along the path")
    error_axis.set(xlabel="t", ylabel="error (%)", title="error along the path")
    return _finish(figure, (loss_axis, error_axis), Path(file), title)


def plot_sharpness(results: dict[str, CurvatureResult], file: str | Path, *, title: str = "") -> Path:
    """The top Hessian eigenvalue λ_max against t, one line per labelled path (from `curvature_along`); points where
    Lanczos did not reach its tolerance are drawn hollow. Written to `file` (PNG)."""
    figure, axis = plt.subplots(figsize=(6.5, 3.8))
    for label, result in results.items():
        top = result.eigenvalues[:, 0].numpy()
        line, = axis.plot(result.t.numpy(), top, marker="o", markersize=4, label=label)
        loose = ~result.converged.numpy()
        axis.scatter(result.t.numpy()[loose], top[loose], facecolor="white", edgecolor=line.get_color(), zorder=3)
    axis.set(xlabel="t", ylabel="top Hessian eigenvalue λ_max", title=title or "sharpness along the path")
    axis.grid(alpha=0.3)
    axis.legend()
    return _save(figure, Path(file))


def plot_calibration(reliability: dict[str, ReliabilityBins], entropy: Tensor, wrong: Tensor, file: str | Path, *,
                     title: str = "") -> Path:
    """Left: reliability diagram (accuracy against mean confidence per bin, one line per labelled classifier,
    marker area proportional to the bin's number of predictions; the diagonal is perfect calibration). Right: histograms of the predictive entropy on right and on wrong
    predictions (each normalised to its own count). Written to `file` (PNG)."""
    figure, (diagram, histogram) = plt.subplots(1, 2, figsize=(10, 3.8))
    diagram.plot([0, 1], [0, 1], color="0.6", linestyle=":", label="perfect calibration")
    for label, bins in reliability.items():
        filled = bins.count > 0
        line, = diagram.plot(bins.confidence()[filled], bins.accuracy()[filled], alpha=0.7, label=label)
        diagram.scatter(bins.confidence()[filled], bins.accuracy()[filled], s=8 * bins.count[filled].sqrt(),
                        color=line.get_color(), alpha=0.7)
    diagram.set(xlabel="confidence (largest probability)", ylabel="accuracy",
                title="reliability diagram", xlim=(0, 1), ylim=(0, 1.02))
    edges = torch.linspace(0, float(entropy.max()) * 1.01 + 1e-9, 26)
    for subset, label in ((~wrong, f"right ({int((~wrong).sum())})"), (wrong, f"wrong ({int(wrong.sum())})")):
        if subset.any():
            histogram.hist(entropy[subset].numpy(), bins=edges.numpy(), density=True, alpha=0.6, label=label)
    histogram.set(xlabel="predictive entropy (nats)", ylabel="density", title="entropy of the mean prediction")
    return _finish(figure, (diagram, histogram), Path(file), title)


def plot_scan(result: GridResult, file: str | Path, *, metric: str | None = None, style: str = "contour",
              levels: int = 24, title: str = "") -> Path:
    """A picture of a scan, written to `file` (the suffix picks the format: .png, .pdf, .svg).

    Planes: filled contours on `levels` log-spaced levels of `metric` (default: the first), or a heatmap
    (style="heatmap") on the same logarithmic colour scale; the models ("marks") and any curves stored with the
    result and a training trajectory (`result.trajectory`, from `Plane.pca`) are drawn on it. Lines: every metric
    against x (style is ignored), with the models marked."""
    if style not in ("contour", "heatmap"):
        raise ValueError(f"style must be 'contour' or 'heatmap', got {style!r}")
    if result.y is None:
        return _plot_profile(result, Path(file), title)
    metric = metric or result.metrics[0]
    values = np.ma.masked_invalid(result[metric])
    low, high = _log_range(values)
    norm = LogNorm(vmin=low, vmax=high)
    figure, axis = plt.subplots(figsize=(7, 5.6))
    clipped = np.ma.clip(values, low, high)
    if style == "contour":
        steps = np.geomspace(low, high, levels)
        filled = axis.contourf(result.x, result.y, clipped, levels=steps, norm=norm, cmap="viridis", extend="neither")
        axis.contour(result.x, result.y, clipped, levels=steps, norm=norm, colors="white", linewidths=0.4, alpha=0.5)
    else:
        filled = axis.pcolormesh(result.x, result.y, clipped, norm=norm, cmap="viridis", shading="nearest")
    bar = figure.colorbar(filled, ax=axis, label=f"{metric} (log scale)")
    ticks = np.geomspace(low, high, 7)
    bar.ax.yaxis.set_minor_formatter(NullFormatter())
    bar.set_ticks(ticks, labels=[f"{t:.3g}" for t in ticks])
    for (name, curve), color in zip(result.curves.items(), ("tab:orange", "tab:red", "tab:pink", "tab:cyan", "white")):
        axis.plot(curve[:, 0], curve[:, 1], color=color, linewidth=2, label=name)
    if result.trajectory is not None:
        axis.plot(result.trajectory[:, 0], result.trajectory[:, 1], color="tab:red", marker=".", linewidth=1.5,
                  label="training trajectory")
    for name, (x, y) in result.subspace.get("marks", {}).items():
        axis.plot(x, y, marker="o", color="white", markeredgecolor="black", markersize=8)
        axis.annotate(name, (x, y), textcoords="offset points", xytext=(6, 6), color="white", fontweight="bold")
    if result.curves or result.trajectory is not None:
        axis.legend(loc="upper right")
    axis.set(xlabel=axis_label(result.subspace, 0), ylabel=axis_label(result.subspace, 1),
             title=title or f"{metric} on {subspace_phrase(result.subspace)} (BatchNorm: {result.bn_mode})")
    axis.set_aspect("equal" if result.subspace.get("variant") == "through" else "auto")
    return _save(figure, Path(file))


def _plot_profile(result: GridResult, file: Path, title: str) -> Path:
    metrics = result.metrics
    figure, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.8), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        axis.plot(result.x, result[metric], marker=".")
        for name, (x,) in result.subspace.get("marks", {}).items():
            axis.axvline(x, color="grey", linestyle=":")
            axis.annotate(name, (x, 1), xycoords=("data", "axes fraction"), textcoords="offset points",
                          xytext=(3, -12), color="grey")
        axis.set(xlabel="x", ylabel=metric, title=metric)
        axis.grid(alpha=0.3)
    figure.suptitle(title or f"{subspace_phrase(result.subspace)} (BatchNorm: {result.bn_mode})")
    return _save(figure, file)


def axis_label(subspace: dict, axis: int) -> str:
    """'x', or on a PCA plane 'x: 1st principal direction (83.2 % of the variance)'."""
    name = "xy"[axis]
    shares = subspace.get("explained_variance")
    return f"{name}: {('1st', '2nd')[axis]} principal direction ({100 * shares[axis]:.1f} % of the variance)" if shares \
        else name


def subspace_phrase(subspace: dict) -> str:
    """'the plane through A, C and B', 'a random line around A (filter-normalised)', ..."""
    names = list(subspace.get("marks", {}))
    kind = subspace.get("kind", "subspace")
    listed = ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else "".join(names)
    if subspace.get("variant") == "random":
        normalization = subspace.get("normalization")
        return f"a random {kind} around {listed} ({f'{normalization}-normalised' if normalization else 'raw'} directions)"
    if subspace.get("variant") == "pca":
        return f"a trajectory's PCA plane ({subspace.get('checkpoints')} checkpoints)"
    if subspace.get("variant") == "affine":
        return f"the affine {kind} of {listed}"
    return f"the {kind} through {listed}"


def _log_range(values: np.ma.MaskedArray) -> tuple[float, float]:
    """The colour range: the smallest positive and the largest finite value (a floor of 1e-4 of the largest
    where values reach 0, e.g. an error of 0)."""
    finite = values.compressed()
    if finite.size == 0:
        raise ValueError("the scan has no finite values to draw")
    high = float(finite.max())
    positive = finite[finite > 0]
    if high <= 0 or positive.size == 0:
        raise ValueError("a logarithmic colour scale needs positive values; this metric has none")
    low = max(float(positive.min()), high * 1e-4)
    return (low, high) if high > low else (low * 0.9, high * 1.1)


def _finish(figure: plt.Figure, axes: tuple[plt.Axes, ...], file: Path, title: str) -> Path:
    """Grid and legend on every axis, the title above, then `_save`."""
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend()
    if title:
        figure.suptitle(title)
    return _save(figure, file)


def _save(figure: plt.Figure, file: Path) -> Path:
    figure.tight_layout()
    figure.savefig(file, dpi=120)
    plt.close(figure)
    return file
