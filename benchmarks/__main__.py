"""`python -m benchmarks [--quick] [--only B1,B3] [--threads N] [--out DIR] [--markdown]`: the workloads this installation supports,
the peers beside them, one table; results.json and results.png written next to this file."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from modeconn_fast.engine import compiled_cpu

from .external import b4_rows, b5_rows
from .harness import HERE, gemm_rate, machine, plot, render_markdown, render_table, write_json


def _own_rows(module: Any, quick: bool) -> list[dict[str, Any]]:
    return module.run(quick=quick)


# (id, module, needs CUDA, rows): B4 and B5 are written in their own modules and join when they exist.
WORKLOADS = [
    ("B1", "b1_grid_tiny", False, _own_rows),
    ("B2", "b2_grid_wide", False, _own_rows),
    ("B3", "b3_curve_bn", False, _own_rows),
    ("B4", "b4_rebasin", False, b4_rows),
    ("B5", "gpu_kernels", True, b5_rows),
    ("B6", "b6_curve_train", False, _own_rows),
    ("B7", "b7_sequence", False, _own_rows),
]


def _load(module: str) -> Any | None:
    """The workload module, or None when it is not in this checkout (another engineer's, not landed yet)."""
    if not (HERE / f"{module}.py").exists():
        return None
    return importlib.import_module(f"{__package__}.{module}")


def run_all(quick: bool, only: set[str] | None) -> dict[str, Any]:
    started = time.perf_counter()
    results: dict[str, Any] = {"quick": quick, "machine": machine(), "gemm_flops": gemm_rate(), "rows": [], "skipped": []}
    # Steady state: a process loads the engine's compiled CPU kernels once, in the background, after its first
    # second of evaluations; loaded here first, so that the load does not fall inside one workload's timing.
    loading = time.perf_counter()
    results["compiled_kernels"] = compiled_cpu.wait()
    results["compiled_kernels_load_s"] = round(time.perf_counter() - loading, 2)
    for workload, module_name, needs_cuda, rows_of in WORKLOADS:
        if only is not None and workload not in only:
            continue
        if needs_cuda and not torch.cuda.is_available():
            results["skipped"].append(f"{workload} ({module_name}): needs CUDA, none here")
            continue
        module = _load(module_name)
        if module is None:
            results["skipped"].append(f"{workload}: benchmarks/{module_name}.py is not in this checkout yet")
            continue
        print(f"{workload} …", flush=True)
        try:
            results["rows"] += rows_of(module, quick)
        except Exception as error:  # one broken workload must not hide the others' numbers
            traceback.print_exc()
            results["skipped"].append(f"{workload}: failed with {type(error).__name__}: {error}")
    results["load_average_end"] = list(os.getloadavg())
    results["seconds"] = time.perf_counter() - started
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes: the whole table in under 3 minutes")
    parser.add_argument("--only", help="comma-separated workload ids, e.g. B1,B3")
    parser.add_argument("--threads", type=int, help="torch threads while timing (default: torch's own)")
    parser.add_argument("--markdown", action="store_true", help="print the README table from results.json and exit")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for results.json and results.png")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.out / "results.json", args.out / "results.png"
    if args.markdown:
        print(render_markdown(json.loads(json_path.read_text(encoding="utf-8"))))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    only = {w.strip().upper() for w in args.only.split(",")} if args.only else None
    results = run_all(args.quick, only)
    options = [("--quick", args.quick), (f"--only {args.only}", args.only), (f"--threads {args.threads}", args.threads)]
    results["command"] = " ".join(["python -m benchmarks"] + [text for text, given in options if given])
    write_json(results, json_path)
    if results["rows"]:
        plot(results, png_path)
    print(render_table(results))
    print(f"({results['seconds']:.0f} s; written {json_path} and {png_path})")
    failed = any(not row["checks_ok"] for row in results["rows"])
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
