"""A scan killed with SIGKILL while it runs, then started again: only the missing chunks are computed and the
numbers equal an uninterrupted scan's."""
from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from modeconn_fast import scan
from scan_job import CHUNK_POINTS, XS, YS, job

JOB = Path(__file__).resolve().parent / "scan_job.py"
CHUNKS = len(XS) * len(YS) // CHUNK_POINTS


def test_a_scan_killed_mid_way_resumes_to_the_uninterrupted_numbers(tmp_path, monkeypatch):
    out = tmp_path / "scan"
    process = subprocess.Popen([sys.executable, str(JOB), str(out), "--pause", "0.3"], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while len(list(out.glob("chunks/chunk_*.npz"))) < 3:
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "the scan wrote no chunks within 120 s"
            time.sleep(0.05)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        process.stderr.close()
    finished = len(list(out.glob("chunks/chunk_*.npz")))
    assert 3 <= finished < CHUNKS and not (out / "result.npz").exists()

    module = importlib.import_module("modeconn_fast.scans.scan")
    calls = []
    evaluate = module.evaluate
    monkeypatch.setattr(module, "evaluate", lambda *a, **k: calls.append(1) or evaluate(*a, **k))
    plane, model, data = job()
    resumed = scan(plane, model, data, xs=XS, ys=YS, chunk_points=CHUNK_POINTS, out=out, progress=False)
    assert len(calls) == CHUNKS - finished == resumed.timings["chunks_computed"]
    assert not list(out.glob("chunks/.chunk_*"))  # the killed process's temporary file is gone

    uninterrupted = scan(plane, model, data, xs=XS, ys=YS, chunk_points=CHUNK_POINTS, progress=False)
    for name in uninterrupted.metrics:
        np.testing.assert_array_equal(resumed[name], uninterrupted[name])
