"""Peak memory of a 3-model merge of wide MLPs left on disk as .safetensors files (Re-Basin, out of core).

Three freshly initialised MLPs 64-h-h-h-10 (seeds 0, 1, 2; h = 8192 by default: 134 M parameters, 0.54 GB each)
are written to .safetensors files by one child process; a second child merges the three files
(`merge(paths, spec=spec)`, tensors memory-mapped) and reports its wall time and peak resident memory
(ru_maxrss: the interpreter, torch, the mapped pages of the files it read, one n×n float64 cost matrix per group,
the aligned means). The cost matrices and the largest temporaries are all allocated in an alignment's first
sweep, so `--max-iter` (sweeps per alignment) bounds the time, not the peak.

    python -m benchmarks.rebasin_merge_disk [--width 8192] [--rounds 1] [--max-iter 2]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

WRITE = """
import sys, torch
from torch import nn
from safetensors.torch import save_file
width, folder = int(sys.argv[1]), sys.argv[2]
for seed in range(3):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                          nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))
    save_file(model.state_dict(), f"{folder}/{seed}.safetensors")
"""

MERGE = """
import json, resource, sys, time
import torch
from modeconn_fast.rebasin import PermutationSpec, merge
width, folder, rounds, max_iter = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
groups = {str(i): [(f"{i}.weight", 0), (f"{i}.bias", 0), (f"{i + 2}.weight", 1)] for i in (0, 2, 4)}
spec = PermutationSpec(groups)
start = time.perf_counter()
merged = merge([f"{folder}/{seed}.safetensors" for seed in range(3)], spec=spec, rounds=rounds, max_iter=max_iter)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "merged_tensors": len(merged)}))
"""


def measure(width: int, rounds: int, max_iter: int) -> dict[str, float]:
    """Write the three models, merge them from disk in a fresh process: its seconds and peak RSS (GB)."""
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([sys.executable, "-c", WRITE, str(width), folder], check=True)
        out = subprocess.run([sys.executable, "-c", MERGE, str(width), folder, str(rounds), str(max_iter)],
                             capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=1, help="merge's re-alignment rounds")
    parser.add_argument("--max-iter", type=int, default=2, help="sweeps per alignment")
    args = parser.parse_args()
    result = measure(args.width, args.rounds, args.max_iter)
    print(f"3-model merge from .safetensors, MLP 64-{args.width}-{args.width}-{args.width}-10, rounds {args.rounds}, "
          f"max_iter {args.max_iter}: {result['seconds']:.1f} s, peak RSS {result['peak_rss_gb']:.2f} GB")


if __name__ == "__main__":
    main()
