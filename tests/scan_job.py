"""A scan run in its own process by the tests: killed mid-way (test_scans_resume.py) or as a torchrun job
(test_scans_distributed.py).

    python scan_job.py OUT [--save FILE] [--pause SECONDS]

--save writes the returned GridResult to FILE with the rank in its name (FILE.rank0.npz, ...); --pause sleeps
after every chunk, so that a test can kill the process while chunks are still to come.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from helpers import mlp, seeded  # noqa: E402
from modeconn_fast import Plane, scan  # noqa: E402

XS = np.linspace(-1, 7, 12)
YS = np.linspace(-2, 5, 10)
CHUNK_POINTS = 8  # 120 points: 15 chunks


def job() -> tuple[Plane, nn.Module, tuple[Tensor, Tensor]]:
    """The plane, the architecture and the data of every run of this job (seeded)."""
    models = [seeded(mlp, s) for s in range(3)]
    generator = torch.Generator().manual_seed(0)
    data = (torch.randn(30, 19, generator=generator), torch.randint(0, 5, (30,), generator=generator))
    return Plane.through(*models), models[0], data


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--save")
    parser.add_argument("--pause", type=float, default=0.0)
    args = parser.parse_args()
    plane, model, data = job()
    if args.pause:
        module = importlib.import_module("modeconn_fast.scans.scan")
        evaluate = module.evaluate

        def slow_evaluate(*positional, **keywords):
            result = evaluate(*positional, **keywords)
            time.sleep(args.pause)
            return result

        module.evaluate = slow_evaluate
    result = scan(plane, model, data, xs=XS, ys=YS, chunk_points=CHUNK_POINTS, out=args.out, progress=False)
    if args.save:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        result.save(f"{args.save}.rank{rank}.npz")


if __name__ == "__main__":
    main()
