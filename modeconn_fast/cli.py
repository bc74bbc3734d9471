"""The command line (also `python -m modeconn_fast`):

    modeconn demo [--out DIR]                        the demo report
    modeconn scan --model M:F --checkpoint A.pt ...  a loss landscape on a plane or line, stored in --out
    modeconn plot DIR/result.npz                     its contour plot, heatmap, 3-D surface (PNG, HTML) or profile;
                                                     VTK for ParaView
    modeconn curve --model M:F --checkpoint A.pt B.pt --out DIR   train a low-loss curve between two models
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

from .engine.metrics import METRICS

KINDS = {  # kind: (checkpoints it takes, what it is)
    "through": (3, "the plane through three models in Garipov's orthonormal frame (START MIDDLE END)"),
    "affine": (3, "the plane m0 + x (m1 − m0) + y (m2 − m0)"),
    "random": (1, "a plane around one model along two Gaussian, filter-normalised directions (Li et al.)"),
    "line": (2, "the straight line m0 + t (m1 − m0)"),
    "random-line": (1, "a line around one model along one random direction"),
    "pca": (3, "the plane of a training trajectory's two top principal directions, through its last checkpoint "
               "(Li et al.; 3 or more checkpoints in training order, or --trajectory DIR)"),
}


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command (`parser.parse_args(["scan", "--help"])` prints one command's options)."""
    parser = argparse.ArgumentParser(prog="modeconn", description="Fast mode connectivity for PyTorch models.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train MLPs on the bundled digits and write a report with plots")
    demo.add_argument("--out", default="demo_output", help="folder for report.md and its pictures (default: %(default)s)")
    demo.add_argument("--epochs", type=int, default=40, help="training epochs of each model (default: %(default)s)")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    scan_parser = commands.add_parser("scan", help="evaluate loss and error on a grid of a plane or line of weight space",
                                      description=_scan_description(), formatter_class=argparse.RawDescriptionHelpFormatter)
    _scan_arguments(scan_parser)
    scan_parser.set_defaults(command_parser=scan_parser)
    plot_parser = commands.add_parser("plot", help="draw a stored scan: contours, heatmap, 3-D surface (static and "
                                      "interactive HTML), 1-d profile; or write it for ParaView (VTK)")
    _plot_arguments(plot_parser)
    plot_parser.set_defaults(command_parser=plot_parser)
    curve_parser = commands.add_parser("curve", help="train a Bezier curve or polygonal chain between two checkpoints",
                                       description=CURVE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    _curve_arguments(curve_parser)
    curve_parser.set_defaults(command_parser=curve_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    if args.command == "demo":
        from .demo import run_demo

        report = run_demo(args.out, progress=not args.no_progress, epochs=args.epochs)
        print(f"wrote {report}")
    elif args.command == "scan":
        try:
            _run_scan(args)
        except (ValueError, TypeError) as error:
            args.command_parser.error(str(error))
    elif args.command == "plot":
        try:
            _run_plot(args)
        except (ValueError, OSError) as error:
            args.command_parser.error(str(error))
    elif args.command == "curve":
        try:
            _run_curve(args)
        except (ValueError, TypeError) as error:
            args.command_parser.error(str(error))
    return 0


def _scan_description() -> str:
    kinds = "\n".join(f"  {kind:<12} {count} checkpoint{'s' if count > 1 else ''}: {text}"
                      for kind, (count, text) in KINDS.items())
    return ("Evaluate a model at every point of a grid on a plane or line of weight space and store the result as "
            "OUT/result.npz\n(numpy.load opens it; the schema is in the README). Finished chunks are kept in OUT, "
            "so running the same\ncommand again after an interruption resumes it. Kinds:\n" + kinds)


def _scan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="MODULE:FACTORY",
                        help="a callable that builds the architecture without arguments, e.g. modeconn_fast.digits:mlp")
    parser.add_argument("--checkpoint", nargs="+", metavar="FILE.pt",
                        help="state dicts saved with torch.save(model.state_dict(), FILE.pt), read with "
                             "torch.load(weights_only=True); as many as --kind takes (through: START MIDDLE END; "
                             "pca: 3 or more)")
    parser.add_argument("--trajectory", metavar="DIR",
                        help="with --kind pca, instead of --checkpoint: every DIR/*.pt in name order (the files of a "
                             "TrajectoryRecorder)")
    parser.add_argument("--data", default="digits", metavar="digits|MODULE:FACTORY",
                        help="evaluation data: 'digits' (scikit-learn's bundled digits, 8×8 images flattened to 64 "
                             "inputs in [0, 1]) or a callable returning (inputs, targets) tensors (default: %(default)s)")
    parser.add_argument("--split", choices=("train", "test"), default="train",
                        help="with --data digits: which split to evaluate on (default: %(default)s)")
    parser.add_argument("--bn-data", metavar="MODULE:FACTORY",
                        help="a callable returning the inputs (or (inputs, targets)) from which BatchNorm statistics are "
                             "recomputed at every point; with --data digits the training split is used")
    parser.add_argument("--kind", choices=tuple(KINDS), default="through", help="the plane or line (default: %(default)s)")
    parser.add_argument("--resolution", type=int, nargs="+", default=[21], metavar="N",
                        help="grid points along x, and along y if given again (default: 21, i.e. 21×21)")
    parser.add_argument("--x-span", type=float, nargs=2, metavar=("LOW", "HIGH"),
                        help="x range; default: the models' coordinates widened by --margin (random kinds: -1 1)")
    parser.add_argument("--y-span", type=float, nargs=2, metavar=("LOW", "HIGH"), help="y range, as --x-span")
    parser.add_argument("--margin", type=float, default=0.2,
                        help="default spans reach this fraction of the models' spread beyond them (default: %(default)s)")
    parser.add_argument("--normalization", choices=("filter", "layer", "none"), default="filter",
                        help="random kinds: scale each direction per output filter or per tensor to the model's weights, "
                             "or not at all (default: %(default)s)")
    parser.add_argument("--ignore", choices=("biasbn", "none"), default="biasbn",
                        help="random kinds: 'biasbn' gives biases and norm parameters (1-d tensors) a zero direction "
                             "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random kinds: seed of the directions (default: %(default)s)")
    parser.add_argument("--metrics", nargs="+", choices=METRICS, default=["loss", "error"],
                        help="what to compute at every point (default: loss error)")
    parser.add_argument("--bn", choices=("auto", "recompute", "eval"), default="auto",
                        help="BatchNorm: recompute statistics per point from the BN data, mix the stored ones (eval), or "
                             "auto: recompute where there is BatchNorm and BN data (default: %(default)s)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="folder for the chunks, manifest.json and result.npz")
    parser.add_argument("--no-resume", action="store_true",
                        help="discard chunks already in --out instead of resuming them")
    parser.add_argument("--memory-budget", type=int, metavar="BYTES", help="bytes for one chunk of points "
                        "(default: 1 GiB on CPU, a quarter of the free memory on GPU)")
    parser.add_argument("--chunk-points", type=int, metavar="N",
                        help="points per stored chunk (default: 4096, fewer where the budget needs it)")
    parser.add_argument("--device", default="cpu", help="torch device to evaluate on, e.g. cuda (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _plot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("result", help="a scan's result.npz (from modeconn scan or GridResult.save)")
    parser.add_argument("--metric", help="planes: which metric to draw, e.g. loss, error (default: the first stored)")
    parser.add_argument("--style", choices=("contour", "heatmap", "surface"), default="contour",
                        help="planes: filled contours on log-spaced levels, a heatmap on the same log colour scale, or "
                             "a 3-D surface (a static figure and an interactive HTML page); lines are always drawn as "
                             "profiles (default: %(default)s)")
    parser.add_argument("--levels", type=int, default=24, help="number of contour levels (default: %(default)s)")
    parser.add_argument("--formats", nargs="+", choices=("png", "pdf", "svg", "html", "vtk"),
                        help="files to write: pictures (png, pdf, svg), the interactive page (html, surface only) and "
                             "the legacy-VTK surface for ParaView or Blender (vtk, planes) (default: png, and html "
                             "for a surface)")
    parser.add_argument("--z-scale", choices=("log", "linear"), default="log",
                        help="heights of a surface and of the vtk file: log10 of the metric or the metric itself "
                             "(default: %(default)s)")
    parser.add_argument("--out", metavar="PATH", help="file name without suffix (default: beside the result, "
                        "<result>_<metric>_<style>)")
    parser.add_argument("--title", default="", help="title of the picture (default: metric, plane and BatchNorm mode)")


def _run_scan(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from .checkpoints import load_checkpoint, load_factory
    from .digits import load_digits_split
    from .paths import linear_coeffs
    from .scans import Line, Plane, scan

    _checkpoint_arguments(args)
    factory = load_factory(args.model, "--model")
    models = [load_checkpoint(factory, path, args.model).to(args.device) for path in args.checkpoint]
    names = [Path(path).stem for path in args.checkpoint]
    normalization = None if args.normalization == "none" else args.normalization
    ignore = None if args.ignore == "none" else args.ignore
    subspace = {
        "through": lambda: Plane.through(*models, names=names),
        "affine": lambda: Plane.affine(*models, names=names),
        "random": lambda: Plane.random(models[0], normalization=normalization, ignore=ignore, seed=args.seed, name=names[0]),
        "line": lambda: Line.through(*models, names=names),
        "random-line": lambda: Line.random(models[0], normalization=normalization, ignore=ignore, seed=args.seed,
                                           name=names[0]),
        "pca": lambda: Plane.pca(models, names=names),
    }[args.kind]()
    data, bn_data = _data(args, load_digits_split, load_factory)
    spans = subspace.extent(args.margin)
    if args.x_span:
        spans[0] = tuple(args.x_span)
    if args.y_span and subspace.dims == 2:
        spans[1] = tuple(args.y_span)
    if len(args.resolution) > subspace.dims or min(args.resolution) < 1:
        raise ValueError(f"--resolution takes {subspace.dims} positive number{'s' if subspace.dims > 1 else ''} here, "
                         f"got {args.resolution}")
    counts = (args.resolution * 2)[: subspace.dims] if len(args.resolution) == 1 else args.resolution
    axes = [np.linspace(low, high, count) for (low, high), count in zip(spans, counts)]
    result = scan(subspace, models[0], data, xs=axes[0], ys=axes[1] if subspace.dims == 2 else None,
                  metrics=args.metrics, bn=args.bn, bn_data=bn_data, out=args.out, resume=not args.no_resume,
                  progress=not args.no_progress, memory_budget=args.memory_budget, chunk_points=args.chunk_points)
    if args.kind in ("through", "affine"):  # the straight line between the first and last model, for the plot
        t = torch.linspace(0, 1, 101, dtype=torch.float64)
        line = subspace.project([models[0], models[-1]], linear_coeffs(t))
        result.curves[f"straight line {names[0]} → {names[-1]}"] = line.numpy()
        result.save(Path(args.out) / "result.npz")
    first = result.metrics[0]
    best = np.unravel_index(np.nanargmin(result[first]), result[first].shape)
    print(f"{result}: min {first} {np.nanmin(result[first]):.4g} at index {tuple(int(i) for i in best)}, "
          f"{result.timings['points_per_second']:.0f} points/s; wrote {Path(args.out) / 'result.npz'}")


def _checkpoint_arguments(args: argparse.Namespace) -> None:
    """Check --checkpoint against --kind; fill it from --trajectory (pca only)."""
    if args.trajectory is not None:
        if args.kind != "pca" or args.checkpoint:
            raise ValueError("--trajectory DIR goes with --kind pca, instead of --checkpoint")
        folder = Path(args.trajectory)
        if not folder.is_dir():
            raise ValueError(f"--trajectory {args.trajectory!r} is not a folder")
        args.checkpoint = [str(path) for path in sorted(folder.glob("*.pt"))]
        if len(args.checkpoint) < 3:
            raise ValueError(f"--trajectory {args.trajectory!r} holds {len(args.checkpoint)} .pt files: a PCA plane "
                             "needs at least 3 checkpoints")
    if not args.checkpoint:
        raise ValueError("--checkpoint is required (or --trajectory DIR with --kind pca)")
    needed, _ = KINDS[args.kind]
    if args.kind == "pca" and len(args.checkpoint) < needed:
        raise ValueError(f"--kind pca takes at least 3 checkpoints in training order (--checkpoint), got "
                         f"{len(args.checkpoint)}")
    if args.kind != "pca" and len(args.checkpoint) != needed:
        raise ValueError(f"--kind {args.kind} takes {needed} checkpoint{'s' if needed > 1 else ''} "
                         f"(--checkpoint), got {len(args.checkpoint)}")


def _data(args: argparse.Namespace, load_digits_split: Any, load_factory: Any) -> tuple[Any, Any]:
    """(evaluation data, BatchNorm data) from --data, --split and --bn-data, on --device."""
    if args.data == "digits":
        digits = load_digits_split()
        data, bn_data = getattr(digits, args.split), digits.train[0]
    else:
        data, bn_data = load_factory(args.data, "--data")(), None
    if args.bn_data:
        bn_data = load_factory(args.bn_data, "--bn-data")()
    return _to(data, args.device), _to(bn_data, args.device)


def _to(value: Any, device: str) -> Any:
    """Tensors in tuples, lists and dicts moved to `device`; anything else (a DataLoader) as it is."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _run_plot(args: argparse.Namespace) -> None:
    from .plot import plot_scan
    from .scans import GridResult
    from .views import plot_surface, surface_html

    result = GridResult.load(args.result)
    metric = args.metric or result.metrics[0]
    if metric not in result.metrics:
        raise ValueError(f"--metric {metric!r} is not in {args.result}; it has {', '.join(result.metrics)}")
    if args.style == "surface" and result.y is None:
        raise ValueError(f"--style surface needs a plane's scan; {args.result} is a line's (drop --style)")
    style = args.style if result.y is not None else "profile"
    formats = args.formats or (["png", "html"] if style == "surface" else ["png"])
    if "html" in formats and style != "surface":
        raise ValueError("--formats html is the interactive page of a plane's surface: add --style surface")
    stem = Path(args.out) if args.out else Path(args.result).with_name(f"{Path(args.result).stem}_{metric}_{style}")
    log = args.z_scale == "log"
    for fmt in formats:
        file = stem.with_name(f"{stem.name}.{fmt}")
        if fmt == "vtk":
            result.to_vtk(file, metric=metric, log=log)
        elif fmt == "html":
            surface_html(result, file, metric=metric, log=log, title=args.title)
        elif style == "surface":
            plot_surface(result, file, metric=metric, log=log, title=args.title)
        else:
            plot_scan(result, file, metric=metric, style=args.style, levels=args.levels, title=args.title)
        print(f"wrote {file}")


CURVE_DESCRIPTION = """Train a curve between two checkpoints of one architecture (Garipov et al. 2018): its free control
points minimise the mean over t ~ U[0, 1] of the loss at θ(t), through your unchanged model. Writes to OUT:
  curve.pt               the curve's state dict (control_points.K.<entry>), for BezierCurve(a, b, bends=...)
  control_point_K.pt     each free control point as a plain state dict of the model (e.g. a --checkpoint of
                         `modeconn scan --kind through A.pt OUT/control_point_1.pt B.pt`)
  profile.npz            t and the loss and error along the curve and along the straight line (numpy.load)
  profile.png            both profiles on one plot
and prints the curve's summary (max, mean and length-weighted mean of each column) and both loss barriers."""


def _curve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="MODULE:FACTORY",
                        help="a callable that builds the architecture without arguments, e.g. modeconn_fast.digits:mlp")
    parser.add_argument("--checkpoint", nargs=2, required=True, metavar=("START.pt", "END.pt"),
                        help="the two end models' state dicts, read with torch.load(weights_only=True)")
    parser.add_argument("--data", default="digits", metavar="digits|MODULE:FACTORY",
                        help="training data: 'digits' (the bundled digits' training split; the test split is evaluated "
                             "too) or a callable returning (inputs, targets) tensors (default: %(default)s)")
    parser.add_argument("--test-data", metavar="MODULE:FACTORY",
                        help="with a --data callable: a callable returning the test (inputs, targets), evaluated too")
    parser.add_argument("--kind", choices=("bezier", "polychain"), default="bezier",
                        help="Bezier curve (Bernstein coefficients) or polygonal chain (default: %(default)s)")
    parser.add_argument("--bends", type=int, default=1, help="free control points between the ends (default: 1, a "
                        "quadratic Bezier curve)")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (default: %(default)s)")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: %(default)s)")
    parser.add_argument("--weight-decay", type=float, default=1e-4,
                        help="½·wd·‖θ(t)‖² added to the loss at the sampled t (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="minibatch size (default: %(default)s)")
    parser.add_argument("--t-per-step", type=int, default=1,
                        help="values of t per minibatch, run in one pass of the model (default: %(default)s)")
    parser.add_argument("--schedule", choices=("garipov", "constant"), default="garipov",
                        help="learning rate: Garipov et al.'s (lr, linear decay to 0.01·lr from 50 %% to 90 %% of the "
                             "epochs) or constant (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the minibatch order and the t values (default: %(default)s)")
    parser.add_argument("--points", type=int, default=61, help="values of t evaluated after training (default: %(default)s)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for curve.pt, the control points and the profile")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _run_curve(args: argparse.Namespace) -> None:
    import json

    import numpy as np
    import torch

    from .checkpoints import load_checkpoint, load_factory
    from .curves import BezierCurve, PolyChain, evaluate_curve, train_curve
    from .digits import load_digits_split
    from .paths import PathResult, interpolate
    from .plot import plot_paths

    factory = load_factory(args.model, "--model")
    model_a, model_b = (load_checkpoint(factory, path, args.model).to(args.device) for path in args.checkpoint)
    if args.data == "digits":
        digits = load_digits_split()
        splits = {"train": digits.train, "test": digits.test}
    else:
        splits = {"train": load_factory(args.data, "--data")()}
        if args.test_data:
            splits["test"] = load_factory(args.test_data, "--test-data")()
    splits = _to(splits, args.device)
    bn_data = splits["train"]  # its inputs: tensors or a DataLoader's batches
    kind = {"bezier": BezierCurve, "polychain": PolyChain}[args.kind]
    curve = kind(model_a, model_b, bends=args.bends)
    progress = not args.no_progress
    history = train_curve(curve, splits["train"], epochs=args.epochs, lr=args.lr, momentum=args.momentum,
                          weight_decay=args.weight_decay, batch_size=args.batch_size, t_per_step=args.t_per_step,
                          schedule=args.schedule, seed=args.seed, progress=progress)
    result = evaluate_curve(curve, splits, points=args.points, bn_data=bn_data, progress=progress)
    lines = {split: interpolate(model_a, model_b, data, points=args.points, bn_data=bn_data, progress=progress)
             for split, data in splits.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(curve.state_dict(), out / "curve.pt")
    for k, point in enumerate(curve.control_points):
        if any(p.requires_grad for p in point.parameters()):
            torch.save(point.state_dict(), out / f"control_point_{k}.pt")
    arrays = {"t": result.t.numpy()} | {f"curve_{name}": v.numpy() for name, v in result.columns.items()}
    arrays |= {f"line_{split}_{m}": getattr(line, m).numpy() for split, line in lines.items() for m in ("loss", "error")}
    meta = {"kind": args.kind, "bends": args.bends, "bn_mode": result.bn_mode, "length": result.length,
            "summary": result.summary(), "epoch_loss": history.loss, "lr": history.lr,
            "checkpoints": list(args.checkpoint)}
    np.savez(out / "profile.npz", meta=np.array(json.dumps(meta)), **arrays)
    paths = {f"{split}, straight line": line for split, line in lines.items()}
    paths |= {f"{split}, {args.kind}": PathResult(result.t, result[f"{split}_loss"], result[f"{split}_error"],
                                                  result.bn_mode) for split in splits}
    plot_paths(paths, out / "profile.png", title=f"straight line and trained {args.kind} curve")
    for name, stats in result.summary().items():
        print(f"{name:>12}: curve max {stats['max']:.4f}, mean {stats['mean']:.4f}, length-weighted {stats['int']:.4f}")
    print(f"train loss barrier: straight line {lines['train'].barrier('loss'):.4f}, curve "
          f"{result.barrier('loss', dataset='train'):.4f}; curve length {result.length:.2f}; wrote {out}")
