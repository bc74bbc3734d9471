"""Head-aware permutation specs for torch's own Transformer layers: function kept, heads respected, barrier lowered."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from test_rebasin_spec import random_permutation
from torch import Tensor, nn

from modeconn_fast import interpolate
from modeconn_fast.rebasin import Heads, Permutation, SpecError, permutation_spec, weight_matching

VOCAB, LENGTH, CLASSES = 8, 10, 4


class EncoderClassifier(nn.Module):
    """Embedding + learned positions, nn.TransformerEncoder (dropout on), mean pooling, linear head."""

    def __init__(
        self, norm_first: bool = False, batch_first: bool = True, activation: str = "relu", dim: int = 32,
        heads: int = 4, layers: int = 2,
    ) -> None:  # fmt: skip
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(VOCAB, dim)
        self.pos = nn.Parameter(0.1 * torch.randn(LENGTH, dim))
        layer = nn.TransformerEncoderLayer(
            dim, heads, 2 * dim, dropout=0.1, activation=activation, batch_first=batch_first, norm_first=norm_first
        )
        final = nn.LayerNorm(dim) if norm_first else None
        self.encoder = nn.TransformerEncoder(layer, layers, norm=final, enable_nested_tensor=False)
        self.head = nn.Linear(dim, CLASSES)

    def forward(self, tokens: Tensor, padding: Tensor) -> Tensor:
        h = self.embed(tokens) + self.pos
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.encoder(h, src_key_padding_mask=padding)
        return self.head(h.mean(1 if self.batch_first else 0))


def batch(n: int, seed: int) -> tuple[tuple[Tensor, Tensor], Tensor]:
    """Random token sequences; the label is the most frequent of the tokens 0-3 (ties: the smallest)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (n, LENGTH), generator=generator)
    counts = F.one_hot(tokens, VOCAB)[..., :CLASSES].sum(1)
    return (tokens, torch.zeros(n, LENGTH, dtype=torch.bool)), counts.argmax(1)


def padded(n: int, seed: int) -> tuple[Tensor, Tensor]:
    (tokens, padding), _ = batch(n, seed)
    padding[: n // 2, LENGTH - 3 :] = True  # half the sequences end early
    return tokens, padding


@pytest.mark.parametrize(
    ("norm_first", "batch_first", "activation"), [(False, True, "relu"), (True, True, "gelu"), (False, False, "gelu"), (True, False, "relu")]
)
def test_random_permutation_of_every_group_keeps_the_function(norm_first: bool, batch_first: bool, activation: str) -> None:
    torch.manual_seed(0)
    model = EncoderClassifier(norm_first, batch_first, activation).eval()
    spec = permutation_spec(model, padded(4, 0))
    assert len(spec.groups) == 1 + 3 * 2 and len(spec.heads) == 2  # stream; per layer q/k, v, feed-forward
    permuted = random_permutation(spec, model, seed=1).apply(model, probe=padded(16, 1))
    x = padded(16, 2)
    torch.testing.assert_close(permuted(*x), model(*x), rtol=1e-5, atol=1e-5)
    moved = {k for k, v in permuted.state_dict().items() if not torch.equal(v, model.state_dict()[k])}
    assert {"encoder.layers.1.self_attn.in_proj_weight", "encoder.layers.1.linear1.bias", "embed.weight"} <= moved


def test_encoder_spec_structure() -> None:
    model = EncoderClassifier(norm_first=True, dim=16, heads=2, layers=1)
    spec = permutation_spec(model, padded(2, 0))
    layer = "encoder.layers.0"
    assert {g: [str(a) for a in axes] for g, axes in spec.groups.items() if g.startswith(layer)} == {
        f"{layer}.self_attn.qk": [f"{layer}.self_attn.in_proj_weight[0][0:16]", f"{layer}.self_attn.in_proj_weight[0][16:32]",
                                  f"{layer}.self_attn.in_proj_bias[0][0:16]", f"{layer}.self_attn.in_proj_bias[0][16:32]"],
        f"{layer}.self_attn.v": [f"{layer}.self_attn.in_proj_weight[0][32:48]", f"{layer}.self_attn.in_proj_bias[0][32:48]",
                                 f"{layer}.self_attn.out_proj.weight[1]"],
        f"{layer}.linear1": [f"{layer}.linear1.weight[0]", f"{layer}.linear1.bias[0]", f"{layer}.linear2.weight[1]"],
    }  # fmt: skip
    stream = {str(a) for a in spec.groups["embed"]}
    assert {"pos[1]", f"{layer}.self_attn.in_proj_weight[1]", f"{layer}.self_attn.out_proj.weight[0]",
            f"{layer}.linear2.weight[0]", f"{layer}.norm2.bias[0]", "encoder.norm.weight[0]", "head.weight[1]"} <= stream  # fmt: skip
    assert spec.heads == {f"{layer}.self_attn": Heads((f"{layer}.self_attn.qk", f"{layer}.self_attn.v"), 2)}
    assert spec.sizes(model.state_dict())[f"{layer}.self_attn.qk"] == 16
    assert "heads encoder.layers.0.self_attn: 2 heads" in str(spec)


def test_permutations_that_break_heads_are_refused() -> None:
    model = EncoderClassifier(dim=16, heads=2, layers=1).eval()
    spec = permutation_spec(model, padded(2, 0))
    good = random_permutation(spec, model, seed=3)
    qk, v = "encoder.layers.0.self_attn.qk", "encoder.layers.0.self_attn.v"
    mixed = Permutation(spec, {**good.perms, qk: torch.cat([torch.arange(8, 16), torch.arange(8)]).roll(1)})
    with pytest.raises(SpecError, match="mixes units of different heads"):
        mixed.apply(model)
    swapped = torch.cat([torch.arange(8, 16), torch.arange(8)])
    apart = Permutation(spec, {**good.perms, qk: swapped, v: torch.arange(16)})
    with pytest.raises(SpecError, match="different orders"):
        apart.apply(model)
    fixed = permutation_spec(model, padded(2, 0), move_heads=False)
    with pytest.raises(SpecError, match="stay in place"):
        Permutation(fixed, {**good.perms, qk: swapped, v: swapped}).apply(model)
    kept = random_permutation(fixed, model, seed=4).apply(model)  # within-head orders only
    torch.testing.assert_close(kept(*padded(8, 5)), model(*padded(8, 5)), rtol=1e-5, atol=1e-5)


class DirectAttention(nn.Module):
    """nn.MultiheadAttention called directly (batch_first self-attention), optionally returning per-head weights."""

    def __init__(self, per_head_weights: bool) -> None:
        super().__init__()
        self.per_head_weights = per_head_weights
        self.embed = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.embed(x)
        out, weights = self.attn(h, h, h, average_attn_weights=not self.per_head_weights)
        return self.head(h + out), weights


@pytest.mark.parametrize("per_head_weights", [False, True])
def test_direct_multihead_attention(per_head_weights: bool) -> None:
    torch.manual_seed(0)
    model = DirectAttention(per_head_weights).eval()
    x = torch.randn(3, 5, 6)
    spec = permutation_spec(model, x)
    assert spec.heads["attn"].move is not per_head_weights  # per-head weights are outputs: heads stay in place
    permuted = random_permutation(spec, model, seed=2).apply(model)
    for got, want in zip(permuted(x), model(x)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_weight_matching_recovers_a_planted_permutation() -> None:
    torch.manual_seed(0)
    model_a = EncoderClassifier(norm_first=True).eval()
    spec = permutation_spec(model_a, padded(4, 0))
    planted = random_permutation(spec, model_a, seed=6)
    result = weight_matching(model_a, planted.apply(model_a), spec=spec)
    for group, perm in planted.inverse().perms.items():
        assert torch.equal(result.perms[group], perm), group
    assert all(b >= a - 1e-9 * abs(a) for a, b in zip(result.objective_history, result.objective_history[1:]))


def train(seed: int, norm_first: bool, steps: int = 300) -> EncoderClassifier:
    torch.manual_seed(seed)
    model = EncoderClassifier(norm_first=norm_first)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        x, y = batch(64, seed=1000 * seed + step)
        loss = F.cross_entropy(model(*x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture
def one_thread():
    """Tiny models: one thread, so that other processes on the shared cores cannot stall a team of threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("norm_first", [False, True])
def test_weight_matching_lowers_the_barrier_of_trained_copies(norm_first: bool, one_thread: None) -> None:
    model_a, model_b = train(1, norm_first), train(2, norm_first)
    x, y = batch(512, seed=99)
    with torch.no_grad():
        accuracy = min((m(*x).argmax(1) == y).float().mean().item() for m in (model_a, model_b))
    assert accuracy > 0.8, accuracy  # both copies learned the task
    result = weight_matching(model_a, model_b, example_input=x)
    aligned = result.apply(model_b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the engine's notes on how it runs the encoder are not under test here
        before = interpolate(model_a, model_b, (x, y), progress=False).barrier("loss")
        after = interpolate(model_a, aligned, (x, y), progress=False).barrier("loss")
    print(f"norm_first={norm_first}: accuracy {accuracy:.3f}, loss barrier {before:.4f} -> {after:.4f}")
    assert after < 0.6 * before, (before, after)
