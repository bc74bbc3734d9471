"""Permutation specs of GPT-style decoders written by hand (nn.Linear + LayerNorm + causal attention)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from gpt_models import GPT
from test_rebasin_spec import random_permutation
from torch import Tensor

from modeconn_fast import interpolate
from modeconn_fast.rebasin import Heads, permutation_spec, weight_matching

VOCAB, LENGTH, CLASSES = 8, 8, 4


def batch(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """Random token sequences; the label is the most frequent of the tokens 0-3 (ties: the smallest)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (n, LENGTH), generator=generator)
    return tokens, F.one_hot(tokens, VOCAB)[..., :CLASSES].sum(1).argmax(1)


@pytest.mark.parametrize(("fused", "root_positions"), [(False, False), (True, True), (False, True), (True, False)])
def test_random_permutation_of_every_group_keeps_the_function(fused: bool, root_positions: bool) -> None:
    torch.manual_seed(0)
    model = GPT(VOCAB, fused=fused, root_positions=root_positions).eval()
    spec = permutation_spec(model, batch(4, 0)[0])
    assert len(spec.groups) == 1 + 3 * 2  # the residual stream; per block q/k, v and the MLP's hidden units
    q, v = ("qkv[0]", "qkv[2]") if fused else ("q", "v")
    assert spec.heads == {f"blocks.{i}.attn": Heads((f"blocks.{i}.attn.{q}", f"blocks.{i}.attn.{v}"), 4) for i in range(2)}
    stream = {str(a) for a in spec.groups["tokens"]}
    assert {"positions[2]" if root_positions else "positions.weight[1]", "blocks.1.attn.out.weight[0]", "head.weight[1]"} <= stream
    permuted = random_permutation(spec, model, seed=1).apply(model, probe=batch(16, 1)[0])
    x = batch(32, 2)[0]
    torch.testing.assert_close(permuted(x), model(x), rtol=1e-5, atol=1e-5)
    moved = {k for k, t in permuted.state_dict().items() if not torch.equal(t, model.state_dict()[k])}
    assert {f"blocks.0.attn.{'qkv' if fused else 'k'}.weight", "blocks.1.mlp.0.bias", "tokens.weight"} <= moved


def test_fused_projection_is_carved_into_q_k_v_rows() -> None:
    model = GPT(VOCAB, dim=8, heads=2, blocks=1, fused=True)
    spec = permutation_spec(model, batch(2, 0)[0])
    name = "blocks.0.attn.qkv"
    assert [str(a) for a in spec.groups[f"{name}[0]"]] == [
        f"{name}.weight[0][0:8]", f"{name}.bias[0][0:8]", f"{name}.weight[0][8:16]", f"{name}.bias[0][8:16]"
    ]  # fmt: skip
    assert [str(a) for a in spec.groups[f"{name}[2]"]] == [
        f"{name}.weight[0][16:24]", f"{name}.bias[0][16:24]", "blocks.0.attn.out.weight[1]"
    ]  # fmt: skip


def test_heads_kept_in_place_on_request() -> None:
    torch.manual_seed(0)
    model = GPT(VOCAB).eval()
    spec = permutation_spec(model, batch(2, 0)[0], move_heads=False)
    assert all(not tie.move for tie in spec.heads.values())
    permuted = random_permutation(spec, model, seed=2).apply(model)
    torch.testing.assert_close(permuted(batch(8, 3)[0]), model(batch(8, 3)[0]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused", [False, True])
def test_weight_matching_recovers_a_planted_permutation(fused: bool) -> None:
    torch.manual_seed(0)
    model_a = GPT(VOCAB, fused=fused).eval()
    spec = permutation_spec(model_a, batch(4, 0)[0])
    planted = random_permutation(spec, model_a, seed=6)
    result = weight_matching(model_a, planted.apply(model_a), spec=spec)
    for group, perm in planted.inverse().perms.items():
        assert torch.equal(result.perms[group], perm), group


def train(seed: int, steps: int = 250) -> GPT:
    torch.manual_seed(seed)
    model = GPT(VOCAB, dim=32, fused=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        x, y = batch(64, seed=1000 * seed + step)
        loss = F.cross_entropy(model(x)[:, :CLASSES], y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_weight_matching_lowers_the_barrier_of_trained_copies() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread, so that other processes cannot stall a team of threads
    try:
        model_a, model_b = train(1), train(2)
        x, y = batch(512, seed=99)
        with torch.no_grad():
            accuracy = min((m(x)[:, :CLASSES].argmax(1) == y).float().mean().item() for m in (model_a, model_b))
        assert accuracy > 0.8, accuracy  # both copies learned the task
        aligned = weight_matching(model_a, model_b, example_input=x[:4]).apply(model_b)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the engine's notes on how it runs the model are not under test here
            before = interpolate(model_a, model_b, (x, y), progress=False).barrier("loss")
            after = interpolate(model_a, aligned, (x, y), progress=False).barrier("loss")
    finally:
        torch.set_num_threads(threads)
    print(f"GPT: accuracy {accuracy:.3f}, loss barrier {before:.4f} -> {after:.4f}")
    assert after < 0.6 * before, (before, after)
