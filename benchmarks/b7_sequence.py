"""B7 sequence models: a plane through three models of torch's own sequence layers, evaluated on 512 sequences.

Two models, each trained briefly from three seeds on a synthetic task (the class of a sequence is its count of
token 1, modulo the classes):
- Transformer: Embedding, nn.TransformerEncoder (d_model 64, 4 heads, feed-forward 128, 2 layers, dropout 0.1,
  batch_first), mean pooling, Linear; sequences of 32 tokens.
- GRU: Embedding (32), nn.GRU (hidden 64, batch_first), Linear on the last hidden state; the same sequences.

A 20×20 grid of the plane (1, x, y) over (m0, m1 − m0, m2 − m0), as in B1. Peers: a loop of load_state_dict +
forward, and torch.func.vmap over functional_call (chunks of points); they evaluate a subset of the points and
are extrapolated per point. The ceiling column counts the multiply-adds of one forward per point (projections,
attention products, feed-forward, recurrence; ×2 FLOPs) and divides by the fp32 GEMM rate measured in the run.
That count stays the plain forward's where the view does less work: the Transformer's encoder, fed straight by the
Embedding of 16 tokens (no positional term), runs on the distinct tokens' rows (engine/transformer_per_point.py),
so its fraction can exceed 1.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import modeconn_fast

from .harness import (GEMM_FLOPS, Check, Contender, PeerTime, Row, compare, gemm_contender, interleaved_medians,
                      peer_times, target_met, threads)
from .peers.state_dict_loop import loop_losses
from .peers.vmap import VmapPeer
from .plane import PLANE, grid, plane_rows, subset

WORKLOAD = "B7 sequence models"
VOCAB, CLASSES, LENGTH = 16, 4, 32
D_MODEL, HEADS, FEED_FORWARD, LAYERS = 64, 4, 128, 2
EMBED, HIDDEN = 32, 64
TARGET_RATIO = 2.0
RTOL = 1e-4


@dataclass(frozen=True)
class Size:
    side: int
    samples: int
    peer_points: int
    vmap_chunk: int
    repeats: int
    train_steps: int


FULL = Size(side=20, samples=512, peer_points=24, vmap_chunk=8, repeats=3, train_steps=60)
QUICK = Size(side=6, samples=128, peer_points=6, vmap_chunk=6, repeats=5, train_steps=10)


class TransformerClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D_MODEL)
        layer = nn.TransformerEncoderLayer(D_MODEL, HEADS, FEED_FORWARD, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, LAYERS)
        self.head = nn.Linear(D_MODEL, CLASSES)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))


class GRUClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, EMBED)
        self.gru = nn.GRU(EMBED, HIDDEN, batch_first=True)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.gru(self.embed(tokens))[1][-1])


def transformer_flops(samples: int) -> int:
    """One forward over `samples` sequences: per layer the q/k/v and output projections, q·kᵀ and weights·v,
    the feed-forward; then the head."""
    L, E = LENGTH, D_MODEL
    per_layer = L * 3 * E * E + 2 * L * L * E + L * E * E + 2 * L * E * FEED_FORWARD
    return 2 * samples * (LAYERS * per_layer + E * CLASSES)


def gru_flops(samples: int) -> int:
    """One forward over `samples` sequences: input and recurrent products of the three gates, then the head."""
    return 2 * samples * (LENGTH * 3 * HIDDEN * (EMBED + HIDDEN) + HIDDEN * CLASSES)


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[int], int]]] = {
    "Transformer": (TransformerClassifier, transformer_flops),
    "GRU": (GRUClassifier, gru_flops),
}


def synthetic(samples: int, seed: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (samples, LENGTH), generator=generator)
    return tokens, (tokens == 1).sum(dim=1) % CLASSES


def train(factory: Callable[[], nn.Module], seed: int, steps: int) -> nn.Module:
    """Adam on fresh synthetic batches of 64 (one thread)."""
    torch.manual_seed(seed)
    model = factory()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    with threads(1):
        for step in range(steps):
            tokens, labels = synthetic(64, 1000 * seed + step)
            optimiser.zero_grad()
            F.cross_entropy(model(tokens), labels).backward()
            optimiser.step()
    return model.eval()


def measure(name: str, size: Size) -> Row:
    factory, flops = MODELS[name]
    models = [train(factory, seed, size.train_steps) for seed in (0, 1, 2)]
    states = [{n: t.detach().clone() for n, t in m.state_dict().items()} for m in models]
    members = [states[0]] + [{n: s[n] - states[0][n] for n in s} for s in states[1:]]
    basis = modeconn_fast.Basis.from_members(models).transform(PLANE)
    inputs, targets = synthetic(size.samples, seed=7)
    coeffs = plane_rows(grid(size.side))
    total = coeffs.shape[0]
    index = subset(total, size.peer_points)

    def ours() -> Tensor:
        result = modeconn_fast.evaluate(models[0], basis, coeffs, (inputs, targets), metrics=("loss",), progress=False)
        return result["loss"]

    vmap_peer = VmapPeer(models[0], members, size.vmap_chunk)
    peers = [
        Contender("load_state_dict loop", lambda: loop_losses(models[0], members, coeffs[index], inputs, targets),
                  len(index), total),
        Contender("vmap", lambda: vmap_peer.losses(coeffs[index], inputs, targets), len(index), total),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's warnings about its fast paths under vmap
        ours_losses = ours()
        checks: dict[str, Check] = {}
        runnable = []
        for peer in peers:
            try:
                checks[peer.name] = compare(ours_losses[index], peer.run(), rtol=RTOL)
                runnable.append(peer)
            except RuntimeError as error:  # vmap cannot batch some modules (e.g. torch's GRU)
                skipped = f"{peer.name} cannot run: {str(error).splitlines()[0][:120]}"
        ceiling = gemm_contender()
        medians = interleaved_medians([Contender("ours", ours, total, total), *runnable, ceiling], size.repeats)
    row = Row(WORKLOAD, f"{name}: {size.side}×{size.side} plane, {size.samples} sequences of {LENGTH}", total,
              medians["ours"], peer_times(runnable, medians, checks))
    rate = GEMM_FLOPS / medians[ceiling.name]
    work = flops(size.samples) * total
    fastest = row.fastest_peer
    row.ceiling = (f"ours {work / row.ours_s / rate:.2f}, fastest peer "
                   f"{work / fastest.seconds / rate if fastest else float('nan'):.2f} of fp32 GEMM ({rate / 1e9:.0f} GFLOP/s)")
    row.target = f"≥ {TARGET_RATIO:g}× fastest peer"
    row.met = target_met(row.ratio, TARGET_RATIO, row.checks_ok)
    if len(runnable) < len(peers):
        row.note = skipped
    return row


def run(quick: bool = False) -> list[dict[str, Any]]:
    size = QUICK if quick else FULL
    return [measure(name, size).to_dict() for name in MODELS]
