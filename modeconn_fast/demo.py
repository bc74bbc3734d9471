"""The main job of `make demo`: two MLPs trained on the bundled digits, the path between them, the plane through
them and a third model, a report.

The report is a list of sections; each is a function of the shared `DemoContext` (data, trained models,
output folder). A capability adds its part of the demo by appending its function to `SECTIONS`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .digits import Digits, load_digits_split, mlp, train_classifier
from .paths import PathResult, interpolate, linear_coeffs
from .plot import plot_paths, plot_scan
from .rebasin import weight_matching
from .report import Report, Section, table
from .scans import Plane, scan

WIDTHS = (64, 128, 128, 128, 10)
SEEDS = (0, 1)
THIRD_SEED = 2  # the plane's third model, until the curve's middle control point takes its place
PLANE_RESOLUTION = 31  # points per axis: the whole demo stays under 3 minutes on 2 cores


@dataclass
class DemoContext:
    out: Path
    digits: Digits
    models: list[nn.Module]  # trained from SEEDS, same architecture
    progress: bool = True
    epochs: int = 40
    straight_paths: dict[str, PathResult] = field(default_factory=dict)  # by split, once a section computed them

    def straight_path(self, split: str) -> PathResult:
        """The straight line between the two models on one split (computed once)."""
        if split not in self.straight_paths:
            self.straight_paths[split] = interpolate(*self.models, getattr(self.digits, split), points=25,
                                                     progress=self.progress)
        return self.straight_paths[split]


def linear_path_section(ctx: DemoContext) -> Section:
    """Loss and error along the straight line between the two models, on both splits, and their barriers."""
    started = time.perf_counter()
    paths = {split: ctx.straight_path(split) for split in ("train", "test")}
    elapsed = time.perf_counter() - started
    rows = [[split, float(p.loss[0]), float(p.loss[-1]), p.barrier("loss"),
             float(p.error[0]), float(p.error[-1]), p.barrier("error")] for split, p in paths.items()]
    figure = plot_paths(paths, ctx.out / "linear_path.png", title="straight line between two digits MLPs")
    body = (
        "The straight line θ(t) = (1 − t) θ_A + t θ_B between the two models, 25 points of t ∈ [0, 1].\n"
        "Loss barrier: max_t of the loss above the line joining the endpoints' losses (Entezari et al. 2021); "
        "error barrier: the maximum error minus the mean of the endpoints' errors (Frankle et al. 2020).\n\n"
        + table(["split", "loss A", "loss B", "loss barrier", "error A", "error B", "error barrier"], rows)
        + f"\n\nBatchNorm: {paths['train'].bn_mode}. Both splits, 50 points in all, took {elapsed:.2f} s."
    )
    return Section("Linear interpolation", body, [figure.name])


def rebasin_section(ctx: DemoContext) -> Section:
    """Weight matching (Git Re-Basin) aligns model B's hidden units to model A's; the line before and after."""
    model_a, model_b = ctx.models
    started = time.perf_counter()
    permutation = weight_matching(model_a, model_b, example_input=ctx.digits.train[0][:8])
    aligned = permutation.apply(model_b)
    matching_s = time.perf_counter() - started
    paths: dict[str, PathResult] = {}
    for split in ("train", "test"):
        data = getattr(ctx.digits, split)
        paths[f"{split}, original"] = ctx.straight_path(split)
        paths[f"{split}, aligned"] = interpolate(model_a, aligned, data, points=25, progress=ctx.progress)
    rows = [[split, paths[f"{split}, original"].barrier("loss"), paths[f"{split}, aligned"].barrier("loss"),
             paths[f"{split}, original"].barrier("error"), paths[f"{split}, aligned"].barrier("error")]
            for split in ("train", "test")]
    figure = plot_paths(paths, ctx.out / "rebasin_path.png", title="straight line before and after weight matching")
    body = (
        "Weight matching (Ainsworth et al. 2023) permutes model B's hidden units to maximise Σ ⟨W_A, π(W_B)⟩; "
        "the permuted model computes the same function (checked on a probe batch), but the straight line to it "
        "stays in one basin.\n\n"
        + table(["split", "loss barrier before", "loss barrier after", "error barrier before", "error barrier after"], rows)
        + f"\n\nPermutation spec derived with torch.fx ({len(permutation.spec.groups)} groups); weight matching ran "
        f"{permutation.iterations} sweeps, objective {permutation.objective_history[0]:.2f} → {permutation.objective:.2f}, "
        f"in {matching_s:.2f} s."
    )
    return Section("Re-Basin: aligning the two models", body, [figure.name])


def plane_section(ctx: DemoContext) -> Section:
    """The loss landscape on the plane through model A, a third model C and model B (Garipov et al. 2018), with
    the straight line A → B drawn on it."""
    model_a, model_b = ctx.models
    started = time.perf_counter()
    model_c = train_classifier(mlp(WIDTHS, seed=THIRD_SEED), ctx.digits.train, epochs=ctx.epochs, seed=THIRD_SEED,
                               progress=ctx.progress)
    training_s = time.perf_counter() - started
    plane = Plane.through(model_a, model_c, model_b, names=("A", "C", "B"))
    (x_low, x_high), (y_low, y_high) = plane.extent(margin=0.2)
    xs, ys = np.linspace(x_low, x_high, PLANE_RESOLUTION), np.linspace(y_low, y_high, PLANE_RESOLUTION)
    result = scan(plane, model_a, ctx.digits.train, xs=xs, ys=ys, progress=ctx.progress)
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    result.curves["straight line A → B"] = plane.project([model_a, model_b], linear_coeffs(t)).numpy()
    result.save(ctx.out / "plane_scan.npz")
    figure = plot_scan(result, ctx.out / "plane_loss.png", title="train loss on the plane through A, C and B")
    line = ctx.straight_path("train")
    rows = [[name, f"({x:.2f}, {y:.2f})"] for name, (x, y) in plane.marks.items()]
    body = (
        "The plane through the two models A and B and a third model C (seed "
        f"{THIRD_SEED}) in Garipov et al.'s orthonormal frame: u = (θ_B − θ_A)/‖θ_B − θ_A‖, v the part of "
        "θ_C − θ_A orthogonal to u, and θ(x, y) = θ_A + x u + y v (coordinates are distances in weight space). "
        "The contours are on log-spaced levels of the training loss; the straight line A → B is drawn on it "
        "(its loss barrier on the training split: "
        f"{line.barrier('loss'):.4f}).\n\n"
        + table(["model", "(x, y) on the plane"], rows)
        + f"\n\n{PLANE_RESOLUTION}×{PLANE_RESOLUTION} = {xs.size * ys.size} points on the {len(ctx.digits.train[1])} "
        f"training images; lowest loss on the grid {np.nanmin(result.loss):.4f}, highest {np.nanmax(result.loss):.4f}. "
        f"BatchNorm: {result.bn_mode}. The scan took {result.timings['seconds']:.2f} s "
        f"({result.timings['points_per_second']:.0f} points/s; training C took {training_s:.1f} s). The grid is stored "
        "in plane_scan.npz (numpy.load opens it)."
    )
    return Section("The plane through three models", body, [figure.name])


SECTIONS: list[Callable[[DemoContext], Section]] = [linear_path_section, rebasin_section, plane_section]


def prepare(out: Path, progress: bool = True, epochs: int = 40) -> DemoContext:
    digits = load_digits_split()
    models = [train_classifier(mlp(WIDTHS, seed=seed), digits.train, epochs=epochs, seed=seed, progress=progress)
              for seed in SEEDS]
    return DemoContext(out=out, digits=digits, models=models, progress=progress, epochs=epochs)


def run_demo(out: str | Path = "demo_output", progress: bool = True, epochs: int = 40) -> Path:
    """Train the models, run every section, write `out/report.md` with its pictures; return the report's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    ctx = prepare(out, progress, epochs)
    train_x, _ = ctx.digits.train
    report = Report(
        "modeconn_fast demo",
        f"Two MLPs {'-'.join(map(str, WIDTHS))} trained for {epochs} epochs with Adam from seeds {SEEDS} on scikit-learn's bundled "
        f"digits ({len(train_x)} train / {len(ctx.digits.test[1])} test images of 8×8).",
    )
    for section in SECTIONS:
        report.add(section(ctx))
    report.intro += f"\n\nThe whole demo took {time.perf_counter() - started:.1f} s."
    return report.write(out / "report.md")
