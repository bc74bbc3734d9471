"""The command line: `modeconn demo [--out DIR]` (also `python -m modeconn_fast`)."""
from __future__ import annotations

import argparse
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="modeconn", description="Fast mode connectivity for PyTorch models.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train two MLPs on the bundled digits and write a report with plots")
    demo.add_argument("--out", default="demo_output", help="folder for report.md and its pictures (default: %(default)s)")
    demo.add_argument("--epochs", type=int, default=40, help="training epochs of each model (default: %(default)s)")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from .demo import run_demo

        report = run_demo(args.out, progress=not args.no_progress, epochs=args.epochs)
        print(f"wrote {report}")
    return 0
