"""Models that return a tuple, a dict or a dataclass (`output=`), and the engine's refusals of mismatched dtypes
and non-finite coefficient rows."""
from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import Tensor, nn

import modeconn_fast as mc
from helpers import assert_same_loss_and_error, mlp, plain_loop, seeded

COEFFS = torch.tensor([[1.0, 0.0], [0.6, 0.4], [-0.2, 1.2], [0.0, 1.0]])


@dataclasses.dataclass
class Output:
    logits: Tensor
    hidden: Tensor


class Returning(nn.Module):
    """An MLP whose forward returns its logits inside a tuple, a dict or a dataclass."""

    def __init__(self, kind: str, mixes_samples: bool = False) -> None:
        super().__init__()
        self.kind, self.mixes_samples = kind, mixes_samples
        self.body = mlp()

    def forward(self, x: Tensor):
        if self.mixes_samples:  # forces the whole-model fallback
            x = x - x.mean(dim=0)
        logits = self.body(x)
        hidden = logits.tanh()
        return {"tuple": (hidden, logits), "dict": {"hidden": hidden, "logits": logits},
                "dataclass": Output(logits, hidden)}[self.kind]


class Logits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x)
        return out[1] if isinstance(out, tuple) else out["logits"] if isinstance(out, dict) else out.logits


@pytest.mark.parametrize("kind, output", [("tuple", 1), ("dict", "logits"), ("dataclass", "logits"),
                                          ("dict", lambda out: out["logits"])])
@pytest.mark.parametrize("mixes_samples", [False, True])
def test_output_picks_the_logits(kind, output, mixes_samples):
    models = [seeded(lambda: Returning(kind, mixes_samples), seed) for seed in (1, 2)]
    inputs, targets = torch.randn(12, 19), torch.randint(0, 5, (12,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if mixes_samples else "error")
        result = mc.evaluate(models[0], models, COEFFS, (inputs, targets), output=output)
    wrapped = [Logits(m) for m in models]
    assert_same_loss_and_error(result, plain_loop(wrapped[0], wrapped, COEFFS, [(inputs, targets)]))


def test_output_reaches_interpolate_and_barrier():
    a, b = seeded(lambda: Returning("dict"), 1), seeded(lambda: Returning("dict"), 2)
    data = (torch.randn(12, 19), torch.randint(0, 5, (12,)))
    path = mc.interpolate(a, b, data, points=3, output="logits")
    expected = mc.interpolate(Logits(a), Logits(b), data, points=3)
    torch.testing.assert_close(path.loss, expected.loss)
    assert mc.barrier(a, b, data, points=3, output="logits") == pytest.approx(expected.barrier())


def test_output_reaches_ensembles_and_fge():
    models = [seeded(lambda: Returning("dict"), seed) for seed in (1, 2)]
    inputs, targets = torch.randn(12, 19), torch.randint(0, 5, (12,))
    ensemble = mc.Ensemble(models, output="logits")
    expected = mc.Ensemble([Logits(m) for m in models])
    torch.testing.assert_close(ensemble.predict(inputs).probs, expected.predict(inputs).probs)
    assert ensemble.evaluate((inputs, targets)).loss == pytest.approx(expected.evaluate((inputs, targets)).loss)
    settings = dict(cycles=2, cycle_epochs=2, lr_1=0.05, lr_2=0.01, batch_size=4, progress=False)
    snapshots = mc.fge(models[0], (inputs, targets), output="logits", **settings)
    plain = mc.fge(Logits(models[0]), (inputs, targets), **settings)
    torch.testing.assert_close(snapshots.history.loss, plain.history.loss)
    torch.testing.assert_close(snapshots.predict(inputs).probs, plain.predict(inputs).probs)


def test_a_curve_takes_output_for_training_evaluation_and_ensembles():
    a, b = seeded(lambda: Returning("dict"), 1), seeded(lambda: Returning("dict"), 2)
    data = (torch.randn(16, 19), torch.randint(0, 5, (16,)))
    curve = mc.BezierCurve(a, b, output="logits")
    plain = mc.BezierCurve(Logits(a), Logits(b))
    torch.testing.assert_close(curve(data[0], 0.3), plain(data[0], 0.3))
    settings = dict(epochs=2, lr=0.05, batch_size=8, progress=False)
    history, expected = mc.train_curve(curve, data, **settings), mc.train_curve(plain, data, **settings)
    torch.testing.assert_close(torch.tensor(history.step_loss), torch.tensor(expected.step_loss))
    result, wanted = mc.evaluate_curve(curve, data, points=5), mc.evaluate_curve(plain, data, points=5)
    torch.testing.assert_close(result.loss, wanted.loss)
    members = mc.Ensemble.from_curve(curve, [0.25, 0.75]).predict(data[0]).probs
    torch.testing.assert_close(members, mc.Ensemble.from_curve(plain, [0.25, 0.75]).predict(data[0]).probs)


@pytest.mark.parametrize("kind, suggestion", [("tuple", "output=0"), ("dict", "output='logits'"),
                                              ("dataclass", "output='logits'")])
def test_without_output_the_error_names_it(kind, suggestion):
    models = [seeded(lambda: Returning(kind), seed) for seed in (1, 2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused at once, without a fallback warning
        with pytest.raises(TypeError, match=suggestion):
            mc.evaluate(models[0], models, COEFFS, (torch.randn(4, 19), torch.zeros(4, dtype=torch.long)))


def test_output_that_picks_nothing():
    models = [seeded(lambda: Returning("dict"), seed) for seed in (1, 2)]
    with pytest.raises(TypeError, match=r"output='probs'.*keys \['hidden', 'logits'\]"):
        mc.evaluate(models[0], models, COEFFS, (torch.randn(4, 19), torch.zeros(4, dtype=torch.long)), output="probs")


def test_basis_of_another_dtype_is_refused_naming_both():
    model = seeded(mlp, 1).double()
    other = seeded(mlp, 2)
    with pytest.raises(ValueError, match=r"torch.float32 but the model's is torch.float64"):
        mc.evaluate(model, [model, other], COEFFS, (torch.randn(4, 19).double(), torch.zeros(4, dtype=torch.long)))


def test_nonfinite_coefficient_rows_are_refused_with_their_indices():
    models = [seeded(mlp, seed) for seed in (1, 2)]
    coeffs = COEFFS.clone()
    coeffs[1, 0], coeffs[3, 1] = float("nan"), float("inf")
    with pytest.raises(ValueError, match="rows 1, 3 hold NaN"):
        mc.evaluate(models[0], models, coeffs, (torch.randn(4, 19), torch.zeros(4, dtype=torch.long)))


def test_fallback_warning_says_what_failed():
    class ReadsWeight(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(19, 5)

        def forward(self, x: Tensor) -> Tensor:
            return self.inner(x) + self.inner.weight.sum()

    models = [seeded(ReadsWeight, seed) for seed in (1, 2)]
    with pytest.warns(UserWarning) as record:
        mc.evaluate(models[0], models, COEFFS, (torch.randn(4, 19), torch.zeros(4, dtype=torch.long)))
    message = str(record[0].message)
    assert "AttributeError" in message and "batch axis" not in message


def test_simplexes_and_autoneb_take_output():
    a, b = seeded(lambda: Returning("tuple"), 1), seeded(lambda: Returning("tuple"), 2)
    data = (torch.randn(16, 19), torch.randint(0, 5, (16,)))
    settings = dict(vertices=2, epochs=2, lr=0.05, batch_size=8, samples_per_step=2, progress=False)
    simplex, plain = mc.train_simplex(a, data, output=1, **settings), mc.train_simplex(Logits(a), data, **settings)
    torch.testing.assert_close(torch.tensor(simplex.history.loss), torch.tensor(plain.history.loss))
    torch.testing.assert_close(simplex.predict(data[0], n=3), plain.predict(data[0], n=3))
    torch.testing.assert_close(simplex.ensemble(3).predict(data[0]).probs, plain.ensemble(3).predict(data[0]).probs)
    settings = dict(pivots=1, cycles=2, steps=3, lr=0.05, batch_size=8, sub_points=2, progress=False)
    path, wanted = mc.autoneb(a, b, data, output=1, **settings), mc.autoneb(Logits(a), Logits(b), data, **settings)
    torch.testing.assert_close(path.profile.loss, wanted.profile.loss)
    assert path.path.output == 1
