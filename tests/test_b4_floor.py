"""B4's floor: the FLOPs of a weight-matching trajectory's cost matrices counted as updates."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from rebasin_models import mlp

from modeconn_fast.rebasin import permutation_spec, weight_matching

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.b4_rebasin import pair_digest, trajectory_flops, update_flops  # noqa: E402


def test_update_flops_by_hand() -> None:
    """MLP 2-3-4-1: groups g1 (3 units: fc1 rows, fc2 columns) and g2 (4 units: fc2 rows, fc3 columns)."""
    model = mlp((2, 3, 4, 1))
    spec = permutation_spec(model, torch.randn(1, 2))
    state = dict(model.named_parameters())
    g1, g2 = sorted(spec.groups, key=lambda g: spec.sizes(state)[g])
    visits = [
        (g1, torch.tensor([1, 0, 2])),  # first visit: 2·3·(6 + 3 + 12) = 126
        (g2, torch.tensor([3, 1, 2, 0])),  # first visit: 2·4·(12 + 4 + 4) = 160
        (g1, torch.tensor([0, 1, 2])),  # fc2.weight[1]: g2 moved 2 of 4 units: 2·3·3·2 = 36
        (g2, torch.tensor([3, 1, 2, 0])),  # fc2.weight[0]: g1 moved 2 of 3 units since g2's last visit: 2·4·4·2 = 64
        (g1, torch.tensor([0, 1, 2])),  # g2 chose what it had at g1's last visit: 0
    ]
    assert update_flops(spec, state, visits) == 126 + 160 + 36 + 64
    assert trajectory_flops(spec, state, 1) == 126 + 160


def test_update_flops_of_a_run_is_below_the_full_products() -> None:
    """Replaying weight_matching's visits ends at its permutations; the count lies between one sweep of full
    products and all of them."""
    torch.manual_seed(0)
    model_a, model_b = mlp((16, 40, 40, 40, 4)), mlp((16, 40, 40, 40, 4))
    spec = permutation_spec(model_a, torch.randn(1, 16))
    visits: list[tuple[str, torch.Tensor]] = []
    result = weight_matching(model_a, model_b, spec=spec, on_visit=lambda g, p: visits.append((g, p.clone())))
    last = dict(visits)
    for group in spec.groups:
        assert torch.equal(last[group], result.perms[group])
    state = dict(model_a.named_parameters())
    flops = update_flops(spec, state, visits)
    assert trajectory_flops(spec, state, 1) < flops < trajectory_flops(spec, state, result.iterations)


def test_b4_rows_hold_the_5x_target_at_every_width_with_a_port() -> None:
    """Issue 15: ≥ 5× the port at every width from 512 (a row without the port states no target); the
    floor target at 8192."""
    from benchmarks.external import b4_row

    def raw(width: int, ours_s: float, port_s: float | None) -> dict:
        row = {"width": width, "kind": "mlp-init", "ours_s": ours_s}
        if port_s is not None:
            row.update(port_s=port_s, port_objective=1.0, objective=1.0, same_objective=True)
        return row

    slow, fast = b4_row(raw(512, 0.1, 0.4)), b4_row(raw(512, 0.1, 0.6))
    assert slow.target == fast.target == "≥ 5× the port, same objective"
    assert (slow.met, fast.met) == (False, True)
    without_port = b4_row(raw(4096, 30.0, None))
    assert not without_port.target and without_port.met is None
    big = b4_row({**raw(8192, 200.0, None), "floor_s": 140.0, "full_floor_s": 3000.0, "peak_rss_gb": 2.8})
    assert big.target == "≤ 1.5× the GEMM floor of the updates" and big.met is True


def test_the_pair_digest_names_the_weights() -> None:
    """Equal weights give one digest whatever the dict's order; one changed bit, or the models swapped, another."""
    torch.manual_seed(0)
    a, b = ({k: v.detach().clone() for k, v in mlp((4, 6, 2)).state_dict().items()} for _ in range(2))
    digest = pair_digest(a, b)
    assert len(digest) == 12 and digest == pair_digest(dict(reversed(list(a.items()))), b)
    assert pair_digest(b, a) != digest
    a["0.weight"].view(torch.int32)[0, 0] ^= 1
    assert pair_digest(a, b) != digest


def test_a_gpu_row_states_its_device_and_memory_and_no_cpu_target() -> None:
    """Issue 15, item 5: a B4 row run with --device cuda is labelled so, shows the GPU memory, and is not held to
    the floor target of 2 cores."""
    from benchmarks.external import b4_row

    raw = {"width": 8192, "kind": "mlp", "ours_s": 40.0, "device": "cuda", "floor_s": 0.5, "full_floor_s": 12.0,
           "peak_rss_gb": 3.1, "peak_gpu_gb": 2.9, "sweeps": 34}
    row = b4_row(raw)
    assert "on CUDA" in row.case and "GPU memory 2.90 GB" in row.ceiling
    assert not row.target and row.met is None
    assert "on CUDA" not in b4_row({**raw, "device": "cpu"}).case


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_b4_runs_on_cuda_to_the_cpu_objective() -> None:
    """`--device cuda`: the models on the GPU reach the objective of the same pair on the CPU."""
    from benchmarks.b4_rebasin import run_width

    on_gpu = run_width(256, with_port=False, kind="mlp-init", device="cuda")
    on_cpu = run_width(256, with_port=False, kind="mlp-init")
    assert on_gpu["device"] == "cuda" and on_gpu["peak_gpu_gb"] > 0 and "lap_ceiling_s" not in on_gpu
    assert on_gpu["pair_sha256"] == on_cpu["pair_sha256"]
    assert on_gpu["objective"] == pytest.approx(on_cpu["objective"], rel=1e-5)
