"""Workloads written in their own modules by other engineers, turned into the harness's rows.

B4 (`b4_rebasin.run(quick) -> list[dict]`, one dict per width: width, ours_s, port_s, ratio, lap_ceiling_s,
objective, port_objective, same_objective, …) and B5 (`gpu_kernels`, CUDA only: rows already in the
harness's schema when it offers `run`).
"""
from __future__ import annotations

from types import ModuleType
from typing import Any

from .harness import PeerTime, Row

B4_RATIO, B4_BIG_WIDTH, B4_BIG_FLOOR = 5.0, 8192, 1.5


def b4_row(raw: dict[str, Any]) -> Row:
    width, ours_s = raw["width"], raw["ours_s"]
    model = {"mlp": "MLP 64-h-h-h-10 trained", "mlp-init": "MLP 64-h-h-h-10 untrained",
             "vgg": "VGG-style 3 conv h ch + BN, untrained"}[raw.get("kind", "mlp")]
    on_gpu = raw.get("device", "cpu") != "cpu"
    if on_gpu:
        model += f", on {raw['device'].upper()}"
    row = Row("B4 rebasin-wide", f"{model}, h = {width}", None, ours_s)
    if raw.get("port_s") is not None:
        difference = abs(raw["port_objective"] - raw["objective"]) / max(abs(raw["port_objective"]), 1e-30)
        check = f"{'ok' if raw['same_objective'] else 'FAILED'} (objective rel diff {difference:.1e}, ≤ 1e-6)"
        row.peers.append(PeerTime("Re-Basin port", raw["port_s"], None, check, bool(raw["same_objective"])))
    if raw.get("lap_ceiling_s") is not None:
        row.ceiling = f"one LAP of size h {raw['lap_ceiling_s']:.3g} s (ours = {ours_s / raw['lap_ceiling_s']:.1f} LAPs)"
    if raw.get("floor_s") is not None:
        row.ceiling = (f"{row.ceiling or ''}; GEMM floor {raw['floor_s']:.3g} s of updates (ours = "
                       f"{ours_s / raw['floor_s']:.2f}× it), {raw['full_floor_s']:.3g} s of full products; peak RSS "
                       f"{raw['peak_rss_gb']:.2f} GB ({raw.get('peak_rss_scope', 'process')})")
        if raw.get("peak_gpu_gb") is not None:
            row.ceiling += f", GPU memory {raw['peak_gpu_gb']:.2f} GB"
    if width < B4_BIG_WIDTH and row.peers:  # BENCHMARKS.md asks it at 2048, issue 15 at every width from 512
        row.target = f"≥ {B4_RATIO:g}× the port, same objective"
        row.met = row.checks_ok and (row.ratio or 0) >= B4_RATIO
    elif width >= B4_BIG_WIDTH and not on_gpu:  # on 2 cores; on a GPU issue 15 asks the time alone
        row.target = f"≤ {B4_BIG_FLOOR:g}× the GEMM floor of the updates"
        row.met = raw.get("floor_s") is not None and ours_s <= B4_BIG_FLOOR * raw["floor_s"]
    sweeps = [f"ours {raw['sweeps']} sweeps" if "sweeps" in raw else "",
              f"port {raw['port_sweeps']} sweeps" if "port_sweeps" in raw else ""]
    row.note = ", ".join(s for s in sweeps if s) if any(sweeps) else ""
    if row.note:
        row.note = f"h = {width}: {row.note}"
    return row


def b4_rows(module: ModuleType, quick: bool) -> list[dict[str, Any]]:
    return [b4_row(raw).to_dict() for raw in module.run(quick=quick)]


def b5_rows(module: ModuleType, quick: bool) -> list[dict[str, Any]]:
    """B5's rows when gpu_kernels offers run(quick) in the harness's schema; otherwise an explanation."""
    if not hasattr(module, "run"):
        raise NotImplementedError("benchmarks/gpu_kernels.py has no run(quick) yet: run `python -m benchmarks.gpu_kernels`")
    return list(module.run(quick=quick))
