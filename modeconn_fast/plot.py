"""Pictures: metrics along paths; calibration of ensembles."""
from __future__ import annotations

from pathlib import Path

import matplotlib
import torch
from torch import Tensor

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .engine.calibration import ReliabilityBins  # noqa: E402
from .paths import PathResult  # noqa: E402


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
    for axis in (loss_axis, error_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    file = Path(file)
    figure.savefig(file, dpi=120)
    plt.close(figure)
    return file


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
    for axis in (diagram, histogram):
        axis.grid(alpha=0.3)
        axis.legend()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    file = Path(file)
    figure.savefig(file, dpi=120)
    plt.close(figure)
    return file
