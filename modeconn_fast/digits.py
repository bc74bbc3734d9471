"""The bundled handwritten digits (scikit-learn's `load_digits`: 1,797 images of 8×8, no download) and small
classifiers trained on them in seconds, for the demo, the tests and the benchmarks."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm


@dataclass
class Digits:
    """Train and test splits as `(inputs [N, 64] in [0, 1], labels [N])` tuples."""

    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]


def load_digits_split(test_fraction: float = 0.25, seed: int = 0) -> Digits:
    """The digits, split train/test by a seeded shuffle."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    inputs = torch.tensor(images, dtype=torch.float32) / 16.0
    targets = torch.tensor(labels, dtype=torch.long)
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed))
    test_rows = int(round(len(targets) * test_fraction))
    test, train = order[:test_rows], order[test_rows:]
    return Digits(train=(inputs[train], targets[train]), test=(inputs[test], targets[test]))


def mlp(widths: Sequence[int] = (64, 128, 128, 128, 10), seed: int | None = None) -> nn.Sequential:
    """Linear layers of the given widths with ReLU between them, initialised from `seed` (then torch's global
    generator is left as it was) or from the global generator."""
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return mlp(widths)
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run a block on one intra-op thread: steps this small only lose time splitting work across threads (and
    far more on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_classifier(model: nn.Module, data: tuple[Tensor, Tensor], *, epochs: int = 40, batch_size: int = 32,
                     lr: float = 1e-3, seed: int = 0, progress: bool = True) -> nn.Module:
    """Adam on cross-entropy, minibatches shuffled from `seed`, on one intra-op thread. Returns the model in eval
    mode."""
    inputs, targets = data
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    with one_thread():
        for _ in tqdm(range(epochs), desc=f"train (seed {seed})", unit="epoch", disable=not progress, leave=False):
            for rows in torch.randperm(len(targets), generator=generator).split(batch_size):
                optimizer.zero_grad()
                F.cross_entropy(model(inputs[rows]), targets[rows]).backward()
                optimizer.step()
    return model.eval()
