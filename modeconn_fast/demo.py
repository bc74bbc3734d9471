"""The main job of `make demo`: two MLPs trained on the bundled digits, the path between them, a report.

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

from .analysis import curvature_along
from .curves import BezierCurve, Ensemble, evaluate_curve, fge, train_curve
from .digits import Digits, load_digits_split, mlp, one_thread, train_classifier
from .paths import PathResult, interpolate, linear_coeffs
from .plot import plot_calibration, plot_paths, plot_scan, plot_sharpness
from .rebasin import weight_matching
from .report import Report, Section, table
from .scans import GridResult, Plane, scan
from .views import plot_surface, surface_html

WIDTHS = (64, 128, 128, 128, 10)
SEEDS = (0, 1)
PLANE_RESOLUTION = 31  # points per axis: the whole demo stays under 3 minutes on 2 cores
SHARPNESS = dict(points=13, iterations=30, tol=1e-2)  # per path: ~1 s on 2 cores


@dataclass
class DemoContext:
    out: Path
    digits: Digits
    models: list[nn.Module]  # trained from SEEDS, same architecture
    progress: bool = True
    epochs: int = 40  # of each model's training; the curve trains for ¾ of that
    straight_paths: dict[str, PathResult] = field(default_factory=dict)  # by split, once a section computed them
    curve: BezierCurve | None = None  # the trained curve between the two models, once its section ran

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


def curve_section(ctx: DemoContext) -> Section:
    """A quadratic Bezier curve trained between the two models (Garipov et al. 2018), against the straight line."""
    model_a, model_b = ctx.models
    epochs = max(2, ctx.epochs * 3 // 4)
    started = time.perf_counter()
    curve = BezierCurve(model_a, model_b, bends=1)
    with one_thread():  # steps this small only lose time splitting work across threads
        history = train_curve(curve, ctx.digits.train, epochs=epochs, lr=0.1, weight_decay=1e-4, batch_size=64,
                              progress=ctx.progress)
    training_s = time.perf_counter() - started
    result = evaluate_curve(curve, {"train": ctx.digits.train, "test": ctx.digits.test}, points=25,
                            progress=ctx.progress)
    ctx.curve = curve
    line = {split: ctx.straight_path(split) for split in ("train", "test")}
    paths = {f"{split}, straight line": line[split] for split in line}
    paths |= {f"{split}, Bezier curve": PathResult(result.t, result[f"{split}_loss"], result[f"{split}_error"],
                                                   result.bn_mode) for split in line}
    figure = plot_paths(paths, ctx.out / "curve_path.png", title="straight line and trained Bezier curve")
    summary = result.summary()
    rows = [[f"{split} {metric}", summary[f"{split}_{metric}"]["max"], summary[f"{split}_{metric}"]["mean"],
             summary[f"{split}_{metric}"]["int"], float(getattr(line[split], metric).max())]
            for split in line for metric in ("loss", "error")]
    body = (
        "A quadratic Bezier curve θ(t) = (1 − t)² θ_A + 2t(1 − t) θ_1 + t² θ_B with its middle control point θ_1 "
        f"trained for {epochs} epochs (SGD, E_t L(θ(t)) with one t ~ U[0, 1] per minibatch, the learning-rate "
        "schedule of Garipov et al. 2018), through the unchanged MLP.\n\n"
        + table(["column", "max on the curve", "mean", "length-weighted mean", "max on the line"], rows)
        + f"\n\nLoss barrier of the curve on train: {result.barrier('loss', dataset='train'):.4f} (straight line: "
        f"{line['train'].barrier('loss'):.4f}). Curve length in weight space {result.length:.1f}; training took "
        f"{training_s:.1f} s ({len(history.step_loss)} steps), final epoch loss {history.loss[-1]:.4f}."
    )
    return Section("A low-loss curve between the two models", body, [figure.name])


def plane_section(ctx: DemoContext) -> Section:
    """The loss landscape on the plane through model A, the trained curve's middle control point θ_1 and model B
    (Garipov et al. 2018), with the straight line and the curve drawn on it."""
    model_a, model_b = ctx.models
    curve = ctx.curve if ctx.curve is not None else BezierCurve(model_a, model_b)
    plane = Plane.through(model_a, curve.control_points[1], model_b, names=("A", "θ_1", "B"))
    (x_low, x_high), (y_low, y_high) = plane.extent(margin=0.2)
    y_pad = max(0.0, 0.5 * (x_high - x_low) - (y_high - y_low)) / 2  # at least half as tall as wide
    xs = np.linspace(x_low, x_high, PLANE_RESOLUTION)
    ys = np.linspace(y_low - y_pad, y_high + y_pad, PLANE_RESOLUTION)
    result = scan(plane, model_a, ctx.digits.train, xs=xs, ys=ys, progress=ctx.progress)
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    result.curves["straight line A → B"] = plane.project([model_a, model_b], linear_coeffs(t)).numpy()
    result.curves["Bezier curve"] = plane.project(curve.basis(), curve.coefficients(t)).numpy()
    result.save(ctx.out / "plane_scan.npz")
    figure = plot_scan(result, ctx.out / "plane_loss.png", title="train loss on the plane through A, θ_1 and B")
    rows = [[name, f"({x:.2f}, {y:.2f})"] for name, (x, y) in plane.marks.items()]
    body = (
        "The plane through the two models A and B and the trained curve's middle control point θ_1, in Garipov et "
        "al.'s orthonormal frame: u = (θ_B − θ_A)/‖θ_B − θ_A‖, v the part of θ_1 − θ_A orthogonal to u, and "
        "θ(x, y) = θ_A + x u + y v (coordinates are distances in weight space). The contours are on log-spaced "
        "levels of the training loss; the straight line A → B (loss barrier on the training split "
        f"{ctx.straight_path('train').barrier('loss'):.4f}) and the Bezier curve, which lies in this plane, are "
        "drawn on it.\n\n"
        + table(["point", "(x, y) on the plane"], rows)
        + f"\n\n{PLANE_RESOLUTION}×{PLANE_RESOLUTION} = {xs.size * ys.size} points on the {len(ctx.digits.train[1])} "
        f"training images; lowest loss on the grid {np.nanmin(result.loss):.4f}, highest {np.nanmax(result.loss):.4f}. "
        f"BatchNorm: {result.bn_mode}. The scan took {result.timings['seconds']:.2f} s "
        f"({result.timings['points_per_second']:.0f} points/s). The grid is stored in plane_scan.npz (numpy.load "
        "opens it)."
    )
    return Section("The plane through the curve", body, [figure.name])


def sharpness_section(ctx: DemoContext) -> Section:
    """The top Hessian eigenvalue of the training loss along the straight line and along the trained curve."""
    started = time.perf_counter()
    paths = {"straight line": tuple(ctx.models)} | ({"Bezier curve": ctx.curve} if ctx.curve is not None else {})
    results = {name: curvature_along(path, ctx.digits.train, progress=ctx.progress, **SHARPNESS)
               for name, path in paths.items()}
    elapsed = time.perf_counter() - started
    figure = plot_sharpness(results, ctx.out / "sharpness.png",
                            title="top Hessian eigenvalue of the training loss along the paths")
    rows = []
    for name, result in results.items():
        top = result.eigenvalues[:, 0]
        peak = int(top.argmax())
        rows.append([name, float(top[0]), float(top[peak]), f"{float(result.t[peak]):.2f}", float(top[-1]),
                     f"{int(result.converged.sum())} of {len(top)}"])
    body = (
        "Sharpness along the paths: the largest eigenvalue λ_max of the Hessian of the training loss (over all "
        f"{len(ctx.digits.train[1])} training images) at {SHARPNESS['points']} evenly spaced t of the straight line "
        "and of the trained Bezier curve, by Lanczos iteration on Hessian-vector products (at most "
        f"{SHARPNESS['iterations']} steps, stopped when the Ritz residual is within {SHARPNESS['tol']:g} of λ_max; "
        "`modeconn_fast.curvature_along`).\n\n"
        + table(["path", "λ_max at A (t = 0)", "largest λ_max", "at t", "λ_max at B (t = 1)", "converged"], rows)
        + f"\n\nBoth paths took {elapsed:.2f} s."
    )
    return Section("Sharpness along the line and the curve", body, [figure.name])


def surface_section(ctx: DemoContext) -> Section:
    """The plane section's scan (plane_scan.npz) as a 3-D surface: a static picture and an interactive page."""
    started = time.perf_counter()
    result = GridResult.load(ctx.out / "plane_scan.npz")
    figure = plot_surface(result, ctx.out / "plane_surface.png", title="log10 train loss on the plane through A, θ_1 "
                          "and B")
    page = surface_html(result, ctx.out / "plane_surface.html",
                        title="log10 train loss on the plane through A, θ_1 and B")
    body = (
        "The grid of the plane section (plane_scan.npz) as a surface, height log10 of the training loss, with the "
        f"models, the straight line and the curve lifted onto it. **[Open the interactive surface]({page.name})**: "
        "a self-contained page (plotly.js inside, no network needed) to turn, zoom and read values. The same grid "
        "opens in ParaView after `GridResult.load(...).to_vtk('plane.vtk', log=True)` or "
        f"`modeconn plot plane_scan.npz --style surface --formats vtk`. Both views took {time.perf_counter() - started:.2f} s."
    )
    return Section("The plane as a surface", body, [figure.name])


FGE = dict(cycles=12, cycle_epochs=4, lr_1=0.07, lr_2=5e-4, batch_size=32, seed=0)


def fge_section(ctx: DemoContext) -> Section:
    """Fast Geometric Ensembling from model A: test accuracy, NLL and calibration against the single models."""
    model_a = ctx.models[0]
    started = time.perf_counter()
    with one_thread():  # steps this small only lose time splitting work across threads
        ensemble = fge(model_a, ctx.digits.train, **FGE, progress=ctx.progress)
    fge_s = time.perf_counter() - started
    started = time.perf_counter()
    result = ensemble.evaluate(ctx.digits.test)
    singles = Ensemble(ctx.models).evaluate(ctx.digits.test)  # each model alone, and the two together
    evaluate_s = time.perf_counter() - started
    prediction = ensemble.predict(ctx.digits.test[0])
    wrong = prediction.probs.argmax(dim=1) != ctx.digits.test[1]

    def row(name: str, error: float, loss: float, ece: float) -> list[object]:
        return [name, 100 * (1 - float(error)), float(loss), float(ece)]

    best = int(result.member_error.argmin())
    rows = [row(f"model {label}", singles.member_error[i], singles.member_loss[i], singles.member_ece[i])
            for i, label in enumerate("AB")]
    rows += [row(f"FGE members, mean of {len(ensemble)}", result.member_error.mean(), result.member_loss.mean(),
                 result.member_ece.mean()),
             row("FGE member with the lowest test error", result.member_error[best], result.member_loss[best],
                 result.member_ece[best]),
             row(f"**FGE ensemble** ({len(ensemble)} snapshots of one run from A)", result.error, result.loss, result.ece),
             row("ensemble of A and B (two independent runs)", singles.error, singles.loss, singles.ece)]
    reliability = {"model A": singles.member_reliability[0], "FGE ensemble": result.reliability}
    figure = plot_calibration(reliability, prediction.entropy, wrong, ctx.out / "fge_calibration.png",
                              title="FGE ensemble from model A (test split)")
    history = ensemble.history
    body = (
        "Fast Geometric Ensembling (Garipov et al. 2018): from model A, SGD with the cyclic learning rate "
        f"lr_1 = {FGE['lr_1']} → lr_2 = {FGE['lr_2']} → lr_1 over cycles of {FGE['cycle_epochs']} epochs "
        f"(per step: τ = ((epoch mod c) + i/N)/c), a snapshot at every cycle's midpoint where the rate is lr_2; "
        f"{len(ensemble)} snapshots, {len(history.lr)} steps of {FGE['batch_size']} images. The ensemble averages "
        "the members' probabilities; all members run in one pass of the subspace view.\n\n"
        + table(["model", "test accuracy (%)", "test NLL", "ECE (15 bins)"], rows)
        + f"\n\nMean predictive entropy of the FGE ensemble: {float(prediction.entropy[wrong].mean()):.3f} nats on the "
        f"{int(wrong.sum())} test images it gets wrong, {float(prediction.entropy[~wrong].mean()):.3f} on the "
        f"{int((~wrong).sum())} it gets right (mutual information, the members' disagreement: "
        f"{float(prediction.mutual_information[wrong].mean()):.4f} against "
        f"{float(prediction.mutual_information[~wrong].mean()):.4f}). BatchNorm: {result.bn_mode}. FGE took "
        f"{fge_s:.2f} s; evaluating all members and both single models took {evaluate_s:.2f} s."
    )
    return Section("Fast Geometric Ensembling", body, [figure.name])


SECTIONS: list[Callable[[DemoContext], Section]] = [linear_path_section, rebasin_section, curve_section, plane_section,
                                                    sharpness_section, surface_section, fge_section]


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
