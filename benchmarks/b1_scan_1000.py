"""B1 at full scale through `scan`: the 1000×1000 grid of the plane through three digits MLPs (64-32-32-10,
512 evaluation samples), stored chunk by chunk with `out=`, timed and its peak resident memory measured.

    python -m benchmarks.b1_scan_1000 [--side 1000] [--out DIR] [--device cpu|cuda] [--threads N]

The scan runs in a child process (training the three models, then `scan`); the parent reads the child's peak
resident set size from `getrusage(RUSAGE_CHILDREN)` after it exits, so the figure is the whole process's
peak: the interpreter, torch, the training, the basis, the chunks and the result arrays. The physical floor is
the counted FLOPs of one forward per point (2·512·Σ fan_in·fan_out) times the points, at the fp32 GEMM rate of a
2048² torch.matmul measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from modeconn_fast import Plane, scan
from modeconn_fast.digits import load_digits_split

from .harness import gemm_rate
from .plane import flops_per_point, train_models

WIDTHS = (64, 32, 32, 10)
SAMPLES = 512
TARGET_SECONDS, TARGET_RSS_GIB = 30.0, 2.0


def child(side: int, out: str, device: str) -> dict:
    """Train the models, scan the side×side grid spanning the three models (20 % margin), return the figures."""
    digits = load_digits_split()
    inputs, targets = digits.train
    models = [m.to(device) for m in train_models(WIDTHS, digits.train, epochs=40)]
    plane = Plane.through(*models)
    (x_low, x_high), (y_low, y_high) = plane.extent(margin=0.2)
    data = (inputs[:SAMPLES].to(device), targets[:SAMPLES].to(device))
    started = time.perf_counter()
    result = scan(plane, models[0], data, xs=np.linspace(x_low, x_high, side), ys=np.linspace(y_low, y_high, side),
                  metrics=("loss", "error"), out=out, progress=sys.stderr.isatty())
    seconds = time.perf_counter() - started
    finite = np.isfinite(result.loss).mean()
    return {"seconds": seconds, "points": result.timings["points"], "chunks": result.timings["chunks"],
            "chunk_seconds": result.timings["chunk_seconds"], "finite_fraction": float(finite),
            "min_loss": float(np.nanmin(result.loss)), "threads": torch.get_num_threads(), "device": device}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=1000, help="grid points per axis (default: %(default)s)")
    parser.add_argument("--out", help="folder for the scan's chunks and result (default: a temporary folder)")
    parser.add_argument("--device", default="cpu", help="torch device of the scan (default: %(default)s)")
    parser.add_argument("--threads", type=int, help="torch threads of the scan and the GEMM (default: torch's own, one "
                        "per core; on a machine shared with other jobs one thread avoids OpenMP stalls)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.side, args.out, args.device)))
        return

    rate = gemm_rate()
    with tempfile.TemporaryDirectory() as temporary:
        out = args.out or os.path.join(temporary, "scan")
        threads = ["--threads", str(args.threads)] if args.threads else []
        done = subprocess.run([sys.executable, "-m", "benchmarks.b1_scan_1000", "--child", "--side", str(args.side),
                               "--out", out, "--device", args.device, *threads], stdout=subprocess.PIPE, text=True,
                              check=True)
        peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 2**30  # ru_maxrss is in KiB
        stored_mib = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file()) / 2**20
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    points = figures["points"]
    floor = flops_per_point(WIDTHS, SAMPLES) * points / rate
    print(f"B1 scan {args.side}×{args.side} ({points:,} points, {figures['chunks']} chunks, out= on disk "
          f"{stored_mib:.1f} MiB), {figures['device']}, {figures['threads']} torch threads, "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"  time           {figures['seconds']:.2f} s ({points / figures['seconds']:,.0f} points/s; "
          f"{figures['chunk_seconds']:.2f} s inside evaluate)   target ≤ {TARGET_SECONDS:.0f} s")
    print(f"  peak RSS       {peak_gib:.2f} GiB (whole child process)   target < {TARGET_RSS_GIB:.0f} GiB")
    print(f"  GEMM floor     {floor:.2f} s at {rate / 1e9:.1f} GFLOP/s (fp32 2048² matmul, this run): "
          f"{floor / figures['seconds']:.2f} of the floor")
    print(f"  check          {figures['finite_fraction']:.0%} of points finite, min loss {figures['min_loss']:.4g}")


if __name__ == "__main__":
    main()
