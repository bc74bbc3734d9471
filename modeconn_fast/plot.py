"""Pictures: metrics along paths."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

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
