"""Fast Geometric Ensembling (Garipov et al. 2018, "Loss Surfaces, Mode Connectivity, and Fast Ensembling of
DNNs", §5): from a trained model, SGD with a cyclic learning rate; one snapshot per cycle, where the rate is
lowest. The snapshots lie along a low-loss path and make a cheap ensemble.

Per SGD step i of N per epoch, with cycles of c epochs (DESIGN §5):

    τ = ((epoch mod c) + i/N) / c
    lr = α₁ (1 − 2τ) + α₂ · 2τ       for τ < ½  (α₁ down to α₂)
    lr = α₁ (2τ − 1) + α₂ (2 − 2τ)   for τ ≥ ½  (back up to α₁)

A snapshot is taken at each cycle's midpoint τ = ½, where the schedule reaches lr = α₂: after the last step
of epoch c/2 − 1 of the cycle (c must be even), as the authors' code does.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..engine.batches import Batches, move
from ..engine.outputs import OutputSelector, pick_output
from ..subspace import Basis
from .ensemble import Ensemble
from .train import minibatches


def fge_learning_rate(epoch: int, iteration: int, iterations_per_epoch: int, cycle_epochs: int,
                      lr_1: float, lr_2: float) -> float:
    """The cyclic learning rate of step `iteration` (0 … N−1) of `epoch` (from 0): see the module's docstring."""
    tau = ((epoch % cycle_epochs) + iteration / iterations_per_epoch) / cycle_epochs
    if tau < 0.5:
        return lr_1 * (1.0 - 2.0 * tau) + lr_2 * 2.0 * tau
    return lr_1 * (2.0 * tau - 1.0) + lr_2 * (2.0 - 2.0 * tau)


@dataclass
class FGEHistory:
    """What `fge` did: the learning rate and the minibatch's training loss of every SGD step, and after how
    many steps each snapshot was taken."""

    lr: Tensor  # [steps], float64
    loss: Tensor  # [steps], float64
    iterations_per_epoch: int
    snapshot_steps: list[int]


def fge(model: nn.Module, train_data: Any, *, cycles: int, cycle_epochs: int, lr_1: float, lr_2: float,
        momentum: float = 0.9, weight_decay: float = 5e-4, batch_size: int = 128, seed: int = 0,
        bn_data: Any = None, output: OutputSelector = None, progress: bool = True) -> Ensemble:
    """An ensemble of `cycles` snapshots taken along SGD with the FGE cyclic learning rate, starting from the
    trained `model` (which is not modified: a copy is trained).

    train_data: `(inputs, targets)` tensors, cut into minibatches of `batch_size` rows shuffled from `seed`
    each epoch, or an iterable of batches with a length (a DataLoader). Loss: cross-entropy;
    weight decay and momentum as in `torch.optim.SGD` (fresh momentum buffers). cycle_epochs: c, even, ≥ 2.
    Training stops at the last snapshot, after (cycles − ½)·c epochs. Other randomness (Dropout, a
    DataLoader's shuffling) is drawn from torch's generator seeded with `seed`; the global state is restored.

    BatchNorm: each snapshot keeps the running statistics that train mode accumulated up to it. Pass `bn_data`
    (usually the training data) to have the ensemble recompute every member's statistics in one pass; the
    ensemble's results say which mode ran (`bn_mode`). The returned ensemble's `history` is an `FGEHistory`.
    output: which part of a tuple, dict or dataclass output holds the logits, as in `evaluate`.
    """
    _check_arguments(cycles, cycle_epochs, lr_1, lr_2, batch_size)
    device = _device_of(model)
    epochs = (cycles - 1) * cycle_epochs + cycle_epochs // 2
    lrs, losses, snapshots, snapshot_steps = [], [], [], []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # Dropout, and a DataLoader's shuffling
        batches = _Minibatches(train_data, batch_size, seed)
        per_epoch = len(batches)
        net = copy.deepcopy(model).train()
        optimizer = torch.optim.SGD(net.parameters(), lr=lr_1, momentum=momentum, weight_decay=weight_decay)
        with tqdm(total=epochs * per_epoch, desc="fge", unit="step", disable=not progress, leave=False) as bar:
            for epoch in range(epochs):
                for iteration, (inputs, targets) in enumerate(batches.epoch()):
                    lr = fge_learning_rate(epoch, iteration, per_epoch, cycle_epochs, lr_1, lr_2)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    inputs = move(inputs, device)
                    outputs = net(inputs) if isinstance(inputs, Tensor) else net(*inputs)
                    loss = F.cross_entropy(pick_output(outputs, output), targets.to(device))
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    lrs.append(lr)
                    losses.append(loss.item())
                    bar.update()
                    bar.set_postfix(lr=f"{lr:.2g}", loss=f"{losses[-1]:.3f}", snapshots=len(snapshots), refresh=False)
                if epoch % cycle_epochs == cycle_epochs // 2 - 1:  # the next step would start at τ = ½: lr = α₂
                    snapshots.append({name: t.detach().clone() for name, t in net.state_dict().items()})
                    snapshot_steps.append(len(lrs))
    basis = Basis.from_members(snapshots, like=model)
    ensemble = Ensemble.from_basis(model, basis, torch.eye(cycles), bn_data=bn_data, output=output)
    ensemble.history = FGEHistory(lr=torch.tensor(lrs, dtype=torch.float64),
                                  loss=torch.tensor(losses, dtype=torch.float64),
                                  iterations_per_epoch=per_epoch, snapshot_steps=snapshot_steps)
    return ensemble


class _Minibatches:
    """Training minibatches: tensors shuffled from a seed each epoch, or the batches of an iterable."""

    def __init__(self, data: Any, batch_size: int, seed: int):
        self.source = Batches(data, "train_data")
        if self.source.tensors is None and not self.source.has_length():
            raise TypeError("train_data needs a length (its number of batches per epoch) for the per-step "
                            "learning rate: pass (inputs, targets) tensors, a DataLoader or a list of batches")
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        if self.source.tensors is not None:
            return -(-self.source.rows // self.batch_size)
        return len(self.source)

    def epoch(self) -> Iterator[tuple[Any, Tensor]]:
        return minibatches(self.source, self.batch_size, self.generator)


def _check_arguments(cycles: int, cycle_epochs: int, lr_1: float, lr_2: float, batch_size: int) -> None:
    if not isinstance(cycles, int) or cycles < 1:
        raise ValueError(f"cycles must be at least 1 (an integer: one snapshot per cycle), got {cycles!r}")
    if not isinstance(cycle_epochs, int) or cycle_epochs < 2 or cycle_epochs % 2:
        raise ValueError(f"cycle_epochs must be even and at least 2 (the snapshot is taken after half a cycle, "
                         f"at an epoch's end), got {cycle_epochs}")
    if not 0 <= lr_2 <= lr_1:
        raise ValueError(f"FGE needs 0 ≤ lr_2 ≤ lr_1 (lr_1 is the largest rate of a cycle, lr_2 the rate at its "
                         f"snapshot), got lr_1={lr_1}, lr_2={lr_2}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer ≥ 1, got {batch_size!r}")


def _device_of(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    raise ValueError("the model has no parameters to train")
