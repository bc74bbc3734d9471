"""The same scan as a 2-process torchrun job: each rank writes only its own chunks, every rank returns the whole
grid, equal to the one-process scan."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from modeconn_fast import GridResult, scan
from scan_job import CHUNK_POINTS, XS, YS, job

JOB = Path(__file__).resolve().parent / "scan_job.py"


def test_a_torchrun_job_shards_the_chunks_and_equals_one_process(tmp_path):
    out, save = tmp_path / "scan", tmp_path / "returned"
    environment = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(JOB), str(out), "--save", str(save)], capture_output=True, text=True, timeout=300,
                          env=environment)
    assert done.returncode == 0, done.stderr[-3000:]

    plane, model, data = job()
    alone = scan(plane, model, data, xs=XS, ys=YS, chunk_points=CHUNK_POINTS, progress=False)
    for rank in (0, 1):
        returned = GridResult.load(f"{save}.rank{rank}.npz")
        assert returned.timings["ranks"] == 2 and returned.timings["chunks_computed"] == 15
        for name in alone.metrics:
            np.testing.assert_allclose(returned[name], alone[name], rtol=1e-6, atol=1e-9)
    written_by = {int(np.load(path)["index"]): int(np.load(path)["rank"]) for path in out.glob("chunks/chunk_*.npz")}
    assert written_by == {c: c % 2 for c in range(15)}
    np.testing.assert_array_equal(GridResult.load(out / "result.npz").loss, GridResult.load(f"{save}.rank0.npz").loss)
