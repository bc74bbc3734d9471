"""Small seeded models and the plain-loop oracle the engine is checked against."""
from __future__ import annotations

import copy
from typing import Callable, Iterable, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn


@pytest.fixture(autouse=True)
def one_thread():
    """Active in every test module that imports it: tiny steps only lose time splitting work across threads
    (on a busy 2-core machine, small convolutions and SGD steps ran up to 80× slower on two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def seeded(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return factory()


def settle_batchnorm(model: nn.Module, inputs: Tensor, steps: int = 3) -> nn.Module:
    """Give BatchNorm layers non-trivial running statistics, as training would."""
    model.train()
    with torch.no_grad():
        for i in range(steps):
            model(inputs[i::steps] * (1 + 0.3 * i) + 0.1 * i)
    return model.eval()


def mixed_state(members: Sequence[nn.Module], row: Tensor) -> dict[str, Tensor]:
    states = [m.state_dict() for m in members]
    mixed = {}
    for name, first in states[0].items():
        if torch.is_floating_point(first):
            mixed[name] = sum(float(c) * s[name] for c, s in zip(row, states))
        else:
            mixed[name] = first.clone()
    return mixed


def reset_and_recompute_batchnorm(net: nn.Module, bn_batches: Iterable[Tensor]) -> None:
    """The 2018 reference's update_bn: reset statistics, momentum b/(n+b), one pass in train mode."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
    net.train()
    seen = 0
    with torch.no_grad():
        for inputs in bn_batches:
            batch = inputs.shape[0]
            for m in norms:
                m.momentum = batch / (seen + batch)
            net(inputs)
            seen += batch
    net.eval()


def model_at(model: nn.Module, members: Sequence[nn.Module], row: Tensor) -> nn.Module:
    """A copy of `model` holding the weights Σ_k row[k] · members[k]."""
    net = copy.deepcopy(model)
    net.load_state_dict(mixed_state(members, row))
    return net


def assert_same_loss_and_error(result, expected) -> None:
    """The engine's loss and error against a plain loop's, at the tolerances of the engine tests."""
    torch.testing.assert_close(result["loss"], expected["loss"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(result["error"], expected["error"], rtol=0, atol=1e-12)


def plain_loop(model: nn.Module, members: Sequence[nn.Module], coeffs: Tensor, batches: Sequence[tuple[Tensor, Tensor]],
               *, bn: str = "eval", bn_batches: Sequence[Tensor] = ()) -> dict[str, Tensor]:
    """Per point: copy the model, load the mixed weights, (recompute BN), forward every batch."""
    losses, errors = [], []
    for row in coeffs:
        net = model_at(model, members, row)
        if bn == "recompute":
            reset_and_recompute_batchnorm(net, bn_batches)
        net.eval()
        loss_sum, wrong, count = 0.0, 0, 0
        with torch.no_grad():
            for inputs, targets in batches:
                out = net(inputs)
                loss_sum += float(F.cross_entropy(out, targets, reduction="sum"))
                wrong += int((out.argmax(1) != targets).sum())
                count += targets.numel()
        losses.append(loss_sum / count)
        errors.append(wrong / count)
    return {"loss": torch.tensor(losses, dtype=torch.float64), "error": torch.tensor(errors, dtype=torch.float64)}


# --- models of the tests ------------------------------------------------------------------------------------
def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(19, 23), nn.ReLU(), nn.Linear(23, 17), nn.Tanh(), nn.Linear(17, 5))


def float64_batch(factory: Callable[[], nn.Module]) -> tuple[Tensor, Tensor]:
    """Nine float64 samples and targets for `mlp` (19 features, 5 classes) or `SmallCNN` (3×8×8, 4 classes)."""
    if factory is mlp:
        return torch.randn(9, 19, dtype=torch.float64), torch.randint(0, 5, (9,))
    return torch.randn(9, 3, 8, 8, dtype=torch.float64), torch.randint(0, 4, (9,))


class SmallCNN(nn.Module):
    """Conv2d + BatchNorm2d + pooling + flatten + Linear + BatchNorm1d, one conv with reflect padding."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 6, 3, padding=1, padding_mode="reflect", bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Linear(6 * 4 * 4, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 4))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).view(x.size(0), -1))


class SequenceConv(nn.Module):
    """Conv1d with groups and stride, BatchNorm1d over [N, C, L]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 6, 3, stride=2, groups=2)
        self.norm = nn.BatchNorm1d(6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(F.relu(self.norm(self.conv(x))).mean(dim=2))


class TokenModel(nn.Module):
    """Embedding + LayerNorm + Linear over tokens, mean-pooled."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8, padding_idx=0)
        self.norm = nn.LayerNorm(8)
        self.mix = nn.Linear(8, 8)
        self.norm_no_affine = nn.LayerNorm(8, elementwise_affine=False)
        self.out = nn.Linear(8, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.norm(self.embed(tokens))
        h = self.norm_no_affine(h + F.gelu(self.mix(h)))
        return self.out(h.mean(dim=1))


class Scale(nn.Module):
    """A module the view does not know: a learnable per-feature scale with a child Linear."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.rand(features) + 0.5)
        self.inner = nn.Linear(features, features)

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x * self.scale)


class WithUnknownModules(nn.Module):
    """Runs partly through the vmap fallback: a custom parametrised module and a weight-normed Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(19, 16)
        self.scale = Scale(16)
        self.normed = nn.utils.parametrizations.weight_norm(nn.Linear(16, 12))
        self.last = nn.Linear(12, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.last(torch.relu(self.normed(torch.relu(self.scale(torch.relu(self.first(x)))))))
