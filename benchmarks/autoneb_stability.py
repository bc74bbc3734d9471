"""AutoNEB's final saddle against its learning rate, on pairs of digits models: the evidence for `autoneb`'s
default lr (not a timing).

For each pair (models trained from seeds 2i and 2i + 1 on the digits' training split) and each lr: `autoneb` with
its other defaults (4 cycles of 100 steps, momentum 0.9), the saddle of each cycle and the pivots at the end; "NaN"
where the band's loss turned non-finite (FloatingPointError). A saddle that rises from one cycle to the next is an
unstable band. Models: the digits MLP (64-128-128-128-10) and a CNN (two 3×3 convolutions of 16 and 32 channels
with BatchNorm and ReLU, a 2×2 max-pool, a linear head; BatchNorm recomputed on the training data for profiles).

    python -m benchmarks.autoneb_stability [--models mlp cnn] [--pairs 5] [--lrs 0.1 0.05 0.02]
"""
from __future__ import annotations

import argparse

import torch
from torch import Tensor, nn

import modeconn_fast as mc
from modeconn_fast.digits import load_digits_split, mlp, train_classifier


class _Image(nn.Module):
    """The digits' 64 features as a 1×8×8 image."""

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(-1, 1, 8, 8)


def cnn(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        _Image(), nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 10),
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=["mlp", "cnn"], default=["mlp", "cnn"])
    parser.add_argument("--pairs", type=int, default=5, help="pairs of each model (seeds 2i, 2i + 1)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.1, 0.05, 0.02])
    args = parser.parse_args()
    data = load_digits_split()
    for kind in args.models:
        make = (lambda seed: mlp(seed=seed)) if kind == "mlp" else cnn
        bn_data = data.train if kind == "cnn" else None
        for pair in range(args.pairs):
            a, b = (train_classifier(make(seed), data.train, seed=seed, progress=False) for seed in (2 * pair, 2 * pair + 1))
            cells = [f"{kind} pair {pair}", f"straight line's barrier {mc.barrier(a, b, data.train, bn_data=bn_data, progress=False):.3f}"]
            for lr in args.lrs:
                try:
                    result = mc.autoneb(a, b, data.train, lr=lr, bn_data=bn_data, progress=False)
                except FloatingPointError:
                    cells.append(f"lr {lr:g}: NaN")
                    continue
                saddles = " → ".join(f"{s:.3f}" for s in result.saddles)
                cells.append(f"lr {lr:g}: {result.saddle_loss:.3f} ({saddles}; {result.pivots[-1]} pivots)")
            print(" | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
