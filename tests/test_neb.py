"""AutoNEB (Draxler et al. 2018): the NEB force against plain autograd, the upwind tangent, pivot insertion, a
low-loss path between two digits MLPs, bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import modeconn_fast as mc
from modeconn_fast.curves.neb import _with_inserted_pivots, neb_step, upwind_tangent
from modeconn_fast.digits import load_digits_split, mlp as digits_mlp, train_classifier
from tests.helpers import mlp, seeded


def test_upwind_tangent():
    a, b, c = torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0]), torch.tensor([1.0, 2.0])
    torch.testing.assert_close(upwind_tangent(a, b, c, torch.tensor([0.0, 1.0, 2.0])), torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(upwind_tangent(a, b, c, torch.tensor([2.0, 1.0, 0.0])), torch.tensor([1.0, 0.0]))
    # a maximum: both segments (b − a, c − b) blended, ΔV_max = 4 on the side of the higher neighbour (a here)
    blend = upwind_tangent(a, b, c, torch.tensor([1.0, 4.0, 0.0]))
    expected = 4 * torch.tensor([1.0, 0.0]) + 3 * torch.tensor([0.0, 2.0])
    torch.testing.assert_close(blend, expected / expected.norm())


def test_neb_force_matches_plain_autograd():
    torch.manual_seed(0)
    inputs, targets = torch.randn(11, 19, dtype=torch.float64), torch.randint(0, 5, (11,))
    chain = mc.PolyChain(seeded(mlp, 0).double(), seeded(mlp, 1).double(), bends=3).double().train()
    with torch.no_grad():
        for point in chain.control_points[1:-1]:
            for p in point.parameters():
                p.add_(torch.randn_like(p) * 0.2)
    losses = neb_step(chain, inputs, targets, F.cross_entropy, spring=0.7)

    names = [name for name, _ in chain.architecture.named_parameters()]
    states = [dict(point.named_parameters()) for point in chain.control_points]
    flat = torch.stack([torch.cat([s[n].detach().reshape(-1) for n in names]) for s in states])
    expected_losses = []
    for k, state in enumerate(states):
        weights = {n: v.detach().clone().requires_grad_(True) for n, v in state.items()}
        loss = F.cross_entropy(functional_call(chain.architecture, weights, (inputs,)), targets)
        expected_losses.append(loss.detach())
        if 0 < k < chain.size - 1:
            grads = torch.autograd.grad(loss, [weights[n] for n in names])
            g = torch.cat([x.reshape(-1) for x in grads])
            tangent = upwind_tangent(flat[k - 1], flat[k], flat[k + 1], losses[k - 1:k + 2])
            gap = (flat[k + 1] - flat[k]).norm() - (flat[k] - flat[k - 1]).norm()
            force = g - (g @ tangent) * tangent - 0.7 * gap * tangent
            ours = torch.cat([state[n].grad.reshape(-1) for n in names])
            torch.testing.assert_close(ours, force, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(losses, torch.stack(expected_losses), rtol=1e-10, atol=1e-12)
    ends = (chain.control_points[0], chain.control_points[-1])
    assert all(p.grad is None for point in ends for p in point.parameters())


def test_pivot_insertion_where_the_dense_loss_bulges():
    chain = mc.PolyChain(seeded(mlp, 0), seeded(mlp, 1), bends=2)  # 4 pivots, 3 segments
    sub = 4  # dense points: 3 · 5 + 1; pivots' losses 0, 1, 1, 0
    dense = torch.tensor([0, .2, .4, .6, .8, 1, 1, 1.5, 1, 1, 1, .8, .6, .4, .2, 0], dtype=torch.float64)
    new = _with_inserted_pivots(chain, seeded(mlp, 0), seeded(mlp, 1), dense, sub, insert=2, threshold=0.1)
    assert new.size == 5  # only the middle segment bulges (by 0.5 at alpha 0.4)
    old = [p.state_dict() for p in chain.control_points]
    for name, value in new.control_points[2].state_dict().items():
        torch.testing.assert_close(value, 0.6 * old[1][name] + 0.4 * old[2][name])
    for k_new, k_old in ((0, 0), (1, 1), (3, 2), (4, 3)):
        for name, value in new.control_points[k_new].state_dict().items():
            assert torch.equal(value, old[k_old][name])
    assert not any(p.requires_grad for p in new.control_points[0].parameters())
    assert _with_inserted_pivots(chain, seeded(mlp, 0), seeded(mlp, 1), dense, sub, insert=2, threshold=0.6).size == 4
    assert _with_inserted_pivots(chain, seeded(mlp, 0), seeded(mlp, 1), dense, sub, insert=0, threshold=0.1).size == 4


@pytest.fixture(scope="module")
def digits_pair():
    data = load_digits_split()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small steps: one thread is faster on this machine
    try:
        a = train_classifier(digits_mlp(seed=0), data.train, seed=0, progress=False)
        b = train_classifier(digits_mlp(seed=1), data.train, seed=1, progress=False)
        # the default lr (0.02): here saddles 0.090, 0.055, 0.037 over the cycles; at the former default 0.1 this
        # MLP's band was at the edge of stability after pivots were inserted (seeds 0-4 on an AVX-512 Xeon: 1.54,
        # 0.06, NaN, 0.09, 0.14)
        result = mc.autoneb(a, b, data.train, cycles=3, steps=60, progress=False)
    finally:
        torch.set_num_threads(threads)
    return data, a, b, result


def test_autoneb_finds_a_low_loss_path_between_digits_mlps(digits_pair):
    data, a, b, result = digits_pair
    assert mc.barrier(a, b, data.train, progress=False) >= 0.3
    assert result.saddle_loss <= 0.1
    assert result.saddle_loss == pytest.approx(float(result.profile.loss.max()))
    assert len(result.saddles) == 3 and result.pivots[0] == 5 and result.pivots == sorted(result.pivots)
    assert result.path.size == result.pivots[-1]
    for point, model in ((result.path.control_points[0], a), (result.path.control_points[-1], b)):
        for name, value in model.state_dict().items():
            assert torch.equal(point.state_dict()[name], value)


def test_autoneb_profile_equals_evaluate_along_the_path(digits_pair):
    data, _, _, result = digits_pair
    path, profile = result.path, result.profile
    assert (len(profile.t) - 1) % (path.size - 1) == 0  # the pivots are points of the profile
    expected = mc.evaluate(path.architecture, path.basis(), path.coefficients(profile.t), data.train, progress=False)
    torch.testing.assert_close(profile.loss, expected["loss"].cpu(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(profile.error, expected["error"].cpu(), rtol=0, atol=1e-12)


def test_a_diverging_band_raises_and_says_what_to_lower():
    a, b = seeded(mlp, 0), seeded(mlp, 1)
    data = (torch.randn(64, 19), torch.randint(0, 5, (64,)))
    with pytest.raises(FloatingPointError, match=r"cycle 1.*lower lr \(now 1e\+30\)"):
        mc.autoneb(a, b, data, cycles=2, steps=5, lr=1e30, progress=False)


def test_bad_input_raises():
    a = seeded(mlp, 0)
    data = (torch.randn(8, 19), torch.zeros(8, dtype=torch.long))
    other = nn.Sequential(nn.Linear(19, 24), nn.ReLU(), nn.Linear(24, 17), nn.Tanh(), nn.Linear(17, 5))
    with pytest.raises(ValueError, match=r"'0.weight'.*\(23, 19\).*\(24, 19\)"):
        mc.autoneb(a, other, data)
    with pytest.raises(ValueError, match="empty"):
        mc.autoneb(a, seeded(mlp, 1), (torch.zeros(0, 19), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ValueError, match="pivots"):
        mc.autoneb(a, seeded(mlp, 1), data, pivots=0)
    with pytest.raises(ValueError, match="spring"):
        mc.autoneb(a, seeded(mlp, 1), data, spring=-1.0)
