"""Simplexes (SPRO, Benton et al. 2021): Cayley–Menger volume against closed forms, Dirichlet rows, the loss and its
gradient against a float64 plain-autograd reference, SPRO on digits, bad input."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import modeconn_fast as mc
from modeconn_fast.curves.simplex import VOLUME_EPSILON, simplex_loss, squared_volume
from modeconn_fast.digits import load_digits_split, mlp as digits_mlp, train_classifier
from tests.helpers import SmallCNN, float64_batch, mlp, seeded


def volume_of(points: torch.Tensor) -> float:
    return float(squared_volume(points @ points.T).sqrt())


def test_cayley_menger_volume_against_closed_forms():
    offset = torch.tensor([0.7, -1.3, 2.0, 0.4], dtype=torch.float64)  # not at the origin, in 4-d
    segment = torch.tensor([[0, 0, 0, 0], [3, 0, 4, 0]], dtype=torch.float64) + offset
    assert volume_of(segment) == pytest.approx(5.0, rel=1e-12)
    right_triangle = torch.tensor([[0, 0, 0, 0], [3, 0, 0, 0], [0, 4, 0, 0]], dtype=torch.float64) + offset
    assert volume_of(right_triangle) == pytest.approx(6.0, rel=1e-12)  # legs 3 and 4: ½·3·4
    corners = torch.tensor([[1, 1, 1, 0], [1, -1, -1, 0], [-1, 1, -1, 0], [-1, -1, 1, 0]], dtype=torch.float64)
    edge = 2 * math.sqrt(2)  # a regular tetrahedron: V = a³ / (6√2)
    assert volume_of(corners + offset) == pytest.approx(edge ** 3 / (6 * math.sqrt(2)), rel=1e-12)
    degenerate = torch.tensor([[0, 0, 0, 0], [1, 1, 0, 0], [2, 2, 0, 0]], dtype=torch.float64)
    assert volume_of(degenerate) == pytest.approx(0.0, abs=1e-12)


def test_simplex_volume_of_models_is_over_their_parameters():
    model = seeded(mlp, 0).double()
    simplex = mc.Simplex(model)
    for entry, step in (("0.bias", 3.0), ("2.weight", 4.0)):  # two vertices moved along orthogonal axes
        vertex = simplex.add_vertex()
        with torch.no_grad():
            for name, value in vertex.state_dict(keep_vars=True).items():
                value.copy_(model.state_dict()[name])
            vertex.get_parameter(entry).view(-1)[1] += step
    assert simplex.vertices == 3
    assert simplex.volume() == pytest.approx(6.0, rel=1e-9)
    assert [p.requires_grad for p in simplex.control_points[1].parameters()] == [False] * 6
    assert all(p.requires_grad for p in simplex.control_points[2].parameters())


def test_new_vertex_starts_at_the_centroid():
    simplex = mc.Simplex(seeded(mlp, 0))
    with torch.no_grad():
        for p in simplex.add_vertex().parameters():
            p.add_(torch.randn_like(p))
    third = simplex.add_vertex()
    for name, value in third.state_dict().items():
        expected = (simplex.control_points[0].state_dict()[name] + simplex.control_points[1].state_dict()[name]) / 2
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-7)


def test_dirichlet_samples_are_rows_on_the_simplex():
    simplex = mc.Simplex(seeded(mlp, 0))
    simplex.add_vertex()
    simplex.add_vertex()
    rows = simplex.sample(20000, seed=3)
    assert rows.shape == (20000, 3) and rows.dtype == torch.float64
    assert bool((rows >= 0).all())
    torch.testing.assert_close(rows.sum(1), torch.ones(20000, dtype=torch.float64), rtol=0, atol=1e-12)
    # Dirichlet(1, 1, 1): each α_i ~ Beta(1, 2), mean 1/3 and P(α_i < ½) = 1 − ¼
    torch.testing.assert_close(rows.mean(0), torch.full((3,), 1 / 3, dtype=torch.float64), rtol=0, atol=0.01)
    torch.testing.assert_close((rows < 0.5).double().mean(0), torch.full((3,), 0.75, dtype=torch.float64),
                               rtol=0, atol=0.01)
    assert torch.equal(simplex.sample(5, seed=3), rows[:5]) and not torch.equal(simplex.sample(5, seed=4), rows[:5])


def reference_loss(simplex: mc.Simplex, inputs, targets, alphas, weight_decay, reg):
    """Plain autograd in float64: per α, the mixed state dict through functional_call in train mode; the volume
    from the edge vectors' Gram determinant, V² = det(EEᵀ) / (d!)², not from Cayley–Menger."""
    states = [dict(point.named_parameters()) | dict(point.named_buffers()) for point in simplex.control_points]
    model = simplex.architecture.train()
    total = 0.0
    for row in alphas:
        weights = {name: sum(float(c) * s[name] for c, s in zip(row, states)) if torch.is_floating_point(value)
                   else value.clone() for name, value in states[0].items()}
        norm = sum((weights[name] ** 2).sum() for name, _ in model.named_parameters())
        total = total + F.cross_entropy(functional_call(model, weights, (inputs,)), targets) + 0.5 * weight_decay * norm
    simplex.architecture.eval()
    names = [name for name, _ in model.named_parameters()]
    flat = torch.stack([torch.cat([s[name].reshape(-1) for name in names]) for s in states])
    edges = flat[1:] - flat[0]
    d = edges.shape[0]
    squared = torch.linalg.det(edges @ edges.T) / math.factorial(d) ** 2
    return total / len(alphas) - reg * 0.5 * torch.log(squared + VOLUME_EPSILON)


@pytest.mark.parametrize("factory", [mlp, SmallCNN], ids=["mlp", "cnn-batchnorm"])
def test_simplex_loss_gradient_matches_plain_autograd(factory):
    torch.manual_seed(3)
    inputs, targets = float64_batch(factory)
    simplex = mc.Simplex(seeded(factory, 0).double())
    for _ in range(2):
        with torch.no_grad():
            for p in simplex.add_vertex().parameters():
                p.add_(torch.randn_like(p) * 0.1)
    simplex.train()
    alphas = simplex.sample(4, seed=1)
    free = [p for p in simplex.parameters() if p.requires_grad]
    assert len(free) == len(list(simplex.control_points[2].parameters()))

    ours = simplex_loss(simplex, inputs, targets, alphas, F.cross_entropy, weight_decay=0.01, reg=0.3)
    expected = reference_loss(simplex, inputs, targets, alphas, weight_decay=0.01, reg=0.3)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    for got, want in zip(torch.autograd.grad(ours, free), torch.autograd.grad(expected, free)):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


# --- SPRO on digits --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    torch.manual_seed(0)
    data = load_digits_split()
    model = train_classifier(digits_mlp(seed=0), data.train, progress=False)
    return data, model


@pytest.fixture(scope="module")
def spro(digits):
    data, model = digits
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small steps: one thread is faster on this machine
    try:
        return {reg: mc.train_simplex(model, data.train, vertices=3, epochs=10, lr=0.05, reg=reg, progress=False)
                for reg in (0.01, 0.05, 0.1)}
    finally:
        torch.set_num_threads(threads)


def test_spro_simplex_on_digits_is_low_loss_and_its_ensemble_no_worse(digits, spro):
    data, model = digits
    simplex = spro[0.05]
    assert simplex.vertices == 3 and len(simplex.history.loss) == 2 and len(simplex.history.loss[0]) == 10
    result = mc.evaluate(simplex.architecture, simplex.basis(), simplex.sample(100, seed=1), data.train, progress=False)
    assert float(result["loss"].max()) <= 0.1
    inputs, labels = data.test
    with torch.no_grad():
        start_error = float((model(inputs).argmax(1) != labels).double().mean())
    probs = simplex.predict(inputs, 10, seed=2)
    assert probs.shape == (len(labels), 10)
    torch.testing.assert_close(probs.sum(1), torch.ones(len(labels)), rtol=0, atol=1e-5)
    assert float((probs.argmax(1) != labels).double().mean()) <= start_error
    # the ensemble's probabilities are the mean over the sampled points, evaluated one by one
    rows = simplex.sample(10, seed=2)
    with torch.no_grad():
        one_by_one = torch.stack([simplex.model_at(row)(inputs).softmax(1) for row in rows]).mean(0)
    torch.testing.assert_close(probs, one_by_one, rtol=1e-5, atol=1e-6)
    ensemble = simplex.ensemble(10, seed=2)  # the same points as an Ensemble: metrics and uncertainty
    torch.testing.assert_close(ensemble.predict(inputs).probs, probs, rtol=1e-5, atol=1e-6)
    assert float(ensemble.evaluate(data.test).error) <= start_error


def test_spro_volume_grows_with_the_regulariser(spro):
    volumes = [spro[reg].volume() for reg in (0.01, 0.05, 0.1)]
    assert volumes[0] < volumes[1] < volumes[2], volumes
    assert spro[0.1].history.volume[-1] == pytest.approx(volumes[2])


def test_espro_trains_one_simplex_per_model(digits):
    data, model = digits
    small = (data.train[0][:256], data.train[1][:256])
    simplexes = mc.espro([model, seeded(digits_mlp, 1)], small, vertices=2, epochs=1, lr=0.01, progress=False)
    assert [s.vertices for s in simplexes] == [2, 2]
    for simplex, start in zip(simplexes, (model, seeded(digits_mlp, 1))):
        for name, value in start.state_dict().items():
            assert torch.equal(simplex.control_points[0].state_dict()[name], value)


def test_bad_input_raises_before_training():
    a = seeded(mlp, 0)
    data = (torch.randn(8, 19), torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="vertices"):
        mc.train_simplex(a, data, vertices=1, epochs=1, lr=0.1)
    with pytest.raises(ValueError, match="empty"):
        mc.train_simplex(a, (torch.zeros(0, 19), torch.zeros(0, dtype=torch.long)), epochs=1, lr=0.1)
    with pytest.raises(ValueError, match="reg"):
        mc.train_simplex(a, data, epochs=1, lr=0.1, reg=-1.0)
    other = nn.Sequential(nn.Linear(19, 24), nn.ReLU(), nn.Linear(24, 17), nn.Tanh(), nn.Linear(17, 5))
    with pytest.raises(ValueError, match=r"'0.weight'.*\(23, 19\).*\(24, 19\)"):
        mc.espro([a, other], data, epochs=1, lr=0.1)
    simplex = mc.Simplex(a)
    simplex.add_vertex()
    with pytest.raises(ValueError, match="summing to 1"):
        simplex.model_at([0.7, 0.7])
    with pytest.raises(ValueError, match="n must"):
        simplex.sample(0)
