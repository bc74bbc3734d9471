"""What a process's first `weight_matching` call costs above a warm one (Re-Basin item "fast from the first call").

Each repeat starts a fresh interpreter (the package installed, numba's cache filled by `make`), which imports
modeconn_fast.rebasin, builds two seeded MLPs 64-512-512-512-10, then times `weight_matching` twice with the spec
derived from an example input each time: the first call, a second right after it (which shares the CPU with the
compiled LAP's loading that the first starts as it returns, see `lap_loading.py`), and, once that load is done,
a warm one. Prints per repeat the import time, the three calls, first − warm (`extra_s`), and the medians.

    python -m benchmarks.rebasin_first_call [--repeats 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = """
import json, sys, time
start = time.perf_counter()
import torch
from torch import nn
from modeconn_fast.rebasin import lap_loading, weight_matching
imported = time.perf_counter()

def mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512),
                         nn.ReLU(), nn.Linear(512, 10))

model_a, model_b, x = mlp(0), mlp(1), torch.randn(2, 64)
calls, cpu = [], []
for call in range(3):
    if call == 2:
        lap_loading.wait()
    begin, begin_cpu = time.perf_counter(), time.process_time()
    weight_matching(model_a, model_b, example_input=x)
    calls.append(time.perf_counter() - begin)
    cpu.append(time.process_time() - begin_cpu)
print(json.dumps({"import_s": imported - start, "first_s": calls[0], "second_s": calls[1], "warm_s": calls[2],
                  "first_cpu_s": cpu[0], "warm_cpu_s": cpu[2], "sympy_loaded": "sympy" in sys.modules}))
"""


def measure_once(threads: int | None = None) -> dict[str, float]:
    """One fresh interpreter's import time, first and warm call (seconds of wall time, and of the process's CPU
    time: all its threads), and whether sympy got imported."""
    setup = f"import torch; torch.set_num_threads({threads})\n" if threads else ""
    out = subprocess.run([sys.executable, "-c", setup + CHILD], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="fresh processes to start")
    parser.add_argument("--threads", type=int, help="torch threads in the child (default: torch's)")
    args = parser.parse_args()
    runs = []
    for _ in range(args.repeats):
        run = measure_once(args.threads)
        run["extra_s"] = run["first_s"] - run["warm_s"]
        runs.append(run)
        print(" | ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in run.items()))
    keys = ("import_s", "first_s", "second_s", "warm_s", "extra_s", "first_cpu_s", "warm_cpu_s")
    medians = {k: statistics.median(r[k] for r in runs) for k in keys}
    print("median " + " | ".join(f"{k} {v:.3f}" for k, v in medians.items()))


if __name__ == "__main__":
    main()
