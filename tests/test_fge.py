"""Fast Geometric Ensembling: the cyclic schedule, where snapshots are taken, and the ensemble it gives on digits."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers import SmallCNN, mlp, one_thread, seeded, settle_batchnorm  # noqa: F401 (one_thread: a fixture)
from modeconn_fast import Ensemble, fge
from modeconn_fast.curves import fge_learning_rate
from modeconn_fast.digits import load_digits_split, train_classifier
from modeconn_fast.digits import mlp as digits_mlp


def garipov_rate(epoch: int, i: int, n: int, c: int, a1: float, a2: float) -> float:
    """DESIGN §5, written out again: τ = ((epoch mod c) + i/N)/c, linear down to α₂ at τ = ½ and back up."""
    tau = ((epoch % c) + i / n) / c
    return a1 * (1 - 2 * tau) + a2 * 2 * tau if tau < 0.5 else a1 * (2 * tau - 1) + a2 * (2 - 2 * tau)


def test_the_schedule_function_equals_the_formula():
    for n in (1, 3, 7):
        for c in (2, 4, 6):
            for epoch in range(2 * c + 1):
                for i in range(n):
                    assert fge_learning_rate(epoch, i, n, c, 0.05, 1e-4) == pytest.approx(
                        garipov_rate(epoch, i, n, c, 0.05, 1e-4), rel=1e-12, abs=0)
    assert fge_learning_rate(0, 0, 5, 4, 0.05, 1e-4) == 0.05  # a cycle starts at α₁
    assert fge_learning_rate(2, 0, 5, 4, 0.05, 1e-4) == 1e-4  # and is at α₂ at its midpoint


@pytest.mark.parametrize("factory, shape", [(mlp, (19,)), (SmallCNN, (3, 8, 8))], ids=["mlp", "cnn-batchnorm"])
def test_every_step_follows_the_schedule_and_snapshots_equal_a_plain_sgd_loop_at_the_midpoints(factory, shape):
    cycles, c, n_rows, batch = 3, 4, 37, 8  # 5 steps per epoch, the last one short
    model = seeded(factory, 0)
    inputs, targets = torch.randn(n_rows, *shape), torch.randint(0, 4, (n_rows,))
    if factory is SmallCNN:
        settle_batchnorm(model, inputs)
    before = copy.deepcopy(model.state_dict())
    ensemble = fge(model, (inputs, targets), cycles=cycles, cycle_epochs=c, lr_1=0.05, lr_2=0.002, momentum=0.9,
                   weight_decay=5e-4, batch_size=batch, seed=3, progress=False)
    history = ensemble.history
    n = history.iterations_per_epoch
    assert n == 5 and len(ensemble) == cycles
    epochs = (cycles - 1) * c + c // 2  # training stops at the last snapshot
    assert len(history.lr) == epochs * n
    for step, lr in enumerate(history.lr.tolist()):
        assert lr == pytest.approx(garipov_rate(step // n, step % n, n, c, 0.05, 0.002), rel=1e-12, abs=0)

    # The oracle: SGD written out, minibatches drawn as documented, a snapshot wherever the next step's rate is α₂.
    net = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(3)
    snapshots, steps = [], 0
    for epoch in range(epochs):
        for i, rows in enumerate(torch.randperm(n_rows, generator=generator).split(batch)):
            for group in optimizer.param_groups:
                group["lr"] = garipov_rate(epoch, i, n, c, 0.05, 0.002)
            optimizer.zero_grad()
            F.cross_entropy(net(inputs[rows]), targets[rows]).backward()
            optimizer.step()
            steps += 1
        if garipov_rate(epoch + 1, 0, n, c, 0.05, 0.002) == 0.002:
            snapshots.append((steps, copy.deepcopy(net.state_dict())))
    assert history.snapshot_steps == [s for s, _ in snapshots] == [(k * c + c // 2) * n for k in range(cycles)]
    for member, (_, expected) in zip(ensemble.models, snapshots):
        for name, value in member.state_dict().items():
            if value.is_floating_point():  # integer buffers (BatchNorm's batch count) are the basis's constants
                torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-7, msg=name)
    for name, value in model.state_dict().items():  # the starting model was not trained
        assert torch.equal(value, before[name])


def test_dataloader_sets_the_steps_per_epoch_and_randomness_comes_from_the_seed():
    model = nn.Sequential(nn.Linear(19, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 5))
    loader = DataLoader(TensorDataset(torch.randn(30, 19), torch.randint(0, 5, (30,))), batch_size=7)
    state = torch.get_rng_state()
    runs = [fge(model, loader, cycles=2, cycle_epochs=2, lr_1=0.05, lr_2=0.01, seed=seed, progress=False)
            for seed in (1, 1, 2)]
    assert torch.equal(torch.get_rng_state(), state)  # Dropout drew from the seed, not the global generator
    assert runs[0].history.iterations_per_epoch == len(loader) == 5
    assert len(runs[0].history.lr) == 3 * 5
    first, again, other = (run.models[1].state_dict()["3.weight"] for run in runs)
    assert torch.equal(first, again) and not torch.equal(first, other)


@pytest.mark.parametrize("arguments, message", [
    (dict(lr_1=0.01, lr_2=0.05), "lr_2 ≤ lr_1"),
    (dict(lr_2=-0.01), "lr_2 ≤ lr_1"),
    (dict(cycles=0), "cycles must be at least 1"),
    (dict(cycle_epochs=3), "even and at least 2"),
    (dict(cycle_epochs=0), "even and at least 2"),
    (dict(batch_size=0), "batch_size"),
    (dict(cycles=2.0), "cycles must be at least 1"),
    (dict(train_data=(torch.randn(0, 19), torch.zeros(0, dtype=torch.long))), "empty"),
    (dict(train_data=[]), "empty"),
])
def test_bad_input_raises_before_any_step(arguments, message, monkeypatch):
    steps = []
    monkeypatch.setattr(torch.optim.SGD, "step", lambda *args, **kwargs: steps.append(1))
    options = dict(train_data=(torch.randn(10, 19), torch.randint(0, 5, (10,))), cycles=2, cycle_epochs=2,
                   lr_1=0.05, lr_2=0.001, progress=False) | arguments
    with pytest.raises(ValueError, match=message):
        fge(seeded(mlp, 0), **options)
    assert steps == []


def test_fge_ensemble_on_digits_beats_its_members_on_average_and_is_less_sure_where_it_is_wrong():
    digits = load_digits_split()
    start = train_classifier(digits_mlp(seed=0), digits.train, seed=0, progress=False)
    ensemble = fge(start, digits.train, cycles=12, cycle_epochs=4, lr_1=0.07, lr_2=5e-4, batch_size=32, seed=0,
                   progress=False)
    result = ensemble.evaluate(digits.test)
    alone = Ensemble([start]).evaluate(digits.test)
    assert result.bn_mode == "none" and len(result.member_error) == 12
    # not "below every member": the first members, one cycle from the start, are worse, and which of 449 digits
    # the best late member gets right moves with the CPU's rounding (one digit apart on an AVX-512 Xeon)
    assert result.error <= float(result.member_error.mean())
    assert result.loss <= float(result.member_loss.mean())  # log of a mean ≥ mean of logs (Jensen)
    assert result.error < alone.error  # better than the model FGE started from
    prediction = ensemble.predict(digits.test[0])
    wrong = prediction.probs.argmax(dim=1) != digits.test[1]
    assert 0 < int(wrong.sum()) == round(result.error * len(wrong))
    assert prediction.entropy[wrong].mean() > prediction.entropy[~wrong].mean()
    assert prediction.mutual_information[wrong].mean() > prediction.mutual_information[~wrong].mean()
