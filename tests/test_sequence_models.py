"""torch's attention, Transformer and recurrent layers on the view's fast path: each model must give what a plain
loop gives (copy the model, load the mixed weights, forward), with no module run per point under vmap, and
gradients through the view must equal a float64 autograd reference."""
from __future__ import annotations

import threading
import warnings

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

from helpers import assert_same_loss_and_error, plain_loop, seeded
from modeconn_fast import Basis, SubspaceView, evaluate
from modeconn_fast.engine import recurrent, transformer_per_point

COEFFS = torch.tensor([[1.0, 0.0], [0.6, 0.4], [-0.2, 1.2], [0.0, 1.0]])
TOKENS = 13


def tokens_with_padding(rows: int = 9, length: int = 7) -> Tensor:
    """Token ids; 0 pads the tails of the first four sequences."""
    tokens = torch.randint(1, TOKENS, (rows, length))
    tokens[:4, length - 2:] = 0
    tokens[1, length - 4:] = 0
    return tokens


def assert_native_and_matches_loop(factory, inputs, targets, **options) -> None:
    """`evaluate` equals the plain loop, warns of nothing, and no module of the model runs under vmap."""
    models = [seeded(factory, seed).eval() for seed in (1, 2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = evaluate(models[0], models, COEFFS, (inputs, targets), **options)
    view = SubspaceView(models[0], Basis.from_members(models, like=models[0]))
    view.prepare(COEFFS, inputs)
    assert view.fallback_names == []
    output = options.get("output")
    if output is not None:
        models = [Picked(m, output) for m in models]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own warnings about nested tensors
        expected = plain_loop(models[0], models, COEFFS, [(inputs, targets)])
    assert_same_loss_and_error(result, expected)


class Picked(nn.Module):
    def __init__(self, model: nn.Module, key) -> None:
        super().__init__()
        self.model, self.key = model, key

    def forward(self, *inputs: Tensor) -> Tensor:
        return self.model(*inputs)[self.key]


# --- Transformers -------------------------------------------------------------------------------------------
class EncoderClassifier(nn.Module):
    """Embedding, nn.TransformerEncoder with a key padding mask made from the tokens, mean pooling."""

    def __init__(self, norm_first: bool = False, batch_first: bool = True, dropout: float = 0.1) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(TOKENS, 16)
        layer = nn.TransformerEncoderLayer(16, 4, 24, dropout=dropout, batch_first=batch_first, norm_first=norm_first,
                                           activation="gelu" if norm_first else "relu")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "enable_nested_tensor is True, but ..."
            self.encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(16))
        self.head = nn.Linear(16, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens)
        h = h if self.batch_first else h.transpose(0, 1)
        h = self.encoder(h, src_key_padding_mask=tokens == 0)
        h = h if self.batch_first else h.transpose(0, 1)
        return self.head(h.mean(dim=1))


@pytest.mark.parametrize("norm_first, batch_first", [(False, True), (True, True), (False, False)])
def test_transformer_encoder_with_padding(norm_first, batch_first):
    torch.manual_seed(0)
    assert_native_and_matches_loop(lambda: EncoderClassifier(norm_first, batch_first), tokens_with_padding(),
                                   torch.randint(0, 3, (9,)))


class TokenEncoder(nn.Module):
    """Embedding of a small vocabulary straight into an encoder (no positional term), or with a position embedding
    added; options: a key padding mask, a causal or additive attention mask, tokens shifted per point, a single
    encoder layer instead of a stack."""

    def __init__(self, norm_first: bool = False, *, vocabulary: int = 5, mask: str = "none", positions: bool = False,
                 per_point: bool = False, single: bool = False, bias: bool = True) -> None:
        super().__init__()
        self.mask, self.positions, self.per_point, self.vocabulary = mask, positions, per_point, vocabulary
        self.shift = nn.Linear(12, 3)
        self.embed = nn.Embedding(vocabulary, 12)
        self.position = nn.Embedding(11, 12)
        layer = nn.TransformerEncoderLayer(12, 3, 20, dropout=0.1, batch_first=True, norm_first=norm_first, bias=bias,
                                           activation="gelu" if norm_first else "relu")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "enable_nested_tensor is True, but ..."
            self.encoder = layer if single else nn.TransformerEncoder(layer, 3)
        self.head = nn.Linear(12, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        if self.per_point:
            tokens = (tokens + self.shift(self.position(tokens % 11)).argmax(-1)) % self.vocabulary
        h = self.embed(tokens)
        if self.positions:
            h = h + self.position(torch.arange(tokens.shape[1]).expand(tokens.shape))
        length = tokens.shape[1]
        options = {}
        if self.mask == "padding":
            options["src_key_padding_mask"] = tokens == 0
        elif self.mask == "additive":
            options["src_mask" if isinstance(self.encoder, nn.TransformerEncoderLayer) else "mask"] = \
                torch.triu(torch.full((length, length), -1.5), diagonal=1)
        elif self.mask == "causal":
            causal = nn.Transformer.generate_square_subsequent_mask(length)
            if isinstance(self.encoder, nn.TransformerEncoderLayer):
                options.update(src_mask=causal, is_causal=True)
            else:
                options.update(mask=causal, is_causal=True)
        return self.head(self.encoder(h, **options).mean(dim=1))


TOKEN_ENCODERS = {
    "post-norm": dict(), "padding": dict(mask="padding"), "pre-norm padding": dict(norm_first=True, mask="padding"),
    "per point padding": dict(per_point=True, mask="padding"), "one layer": dict(single=True),
    "no biases": dict(bias=False, norm_first=True),
    "positions": dict(positions=True), "additive mask": dict(mask="additive"), "causal": dict(mask="causal"),
    "large vocabulary": dict(vocabulary=17), "large vocabulary pre-norm padding": dict(vocabulary=17, mask="padding"),
}


@pytest.mark.parametrize("case", TOKEN_ENCODERS)
def test_encoder_point_by_point(case, monkeypatch):
    """Encoder layers run point by point, fed straight by an Embedding of fewer tokens than positions on the distinct
    tokens' rows (`TokenRows`), else on every position (the first layer's q/k/v gathered from the table products where
    it is post-norm and the table is small); each equal to the plain loop, to the layer-by-layer path and, in float64,
    to a float64 loop."""
    options = TOKEN_ENCODERS[case]
    paths = []
    token_rows, run = transformer_per_point.TokenRows.of, transformer_per_point.run
    monkeypatch.setattr(transformer_per_point.TokenRows, "of",
                        staticmethod(lambda *args: paths.append(token_rows(*args)) or paths[-1]))
    monkeypatch.setattr(transformer_per_point, "run", lambda *args: paths.append("run") or run(*args))
    torch.manual_seed(0)
    tokens = tokens_with_padding(9, 11) % options.get("vocabulary", 5)
    tokens[:, 0] = 1  # no sequence all padding
    targets = torch.randint(0, 3, (9,))
    factory = lambda: TokenEncoder(**options)  # noqa: E731
    assert_native_and_matches_loop(factory, tokens, targets)
    took_token_rows = any(isinstance(p, transformer_per_point.TokenRows) for p in paths)
    assert took_token_rows == (case in ("post-norm", "padding", "pre-norm padding", "per point padding", "one layer",
                                        "no biases"))
    assert ("run" in paths) == (case != "causal")
    models = [seeded(factory, seed) for seed in (1, 2)]
    fast, plain = (evaluate(models[0], models, COEFFS, (tokens, targets), fast=f) for f in (True, False))
    torch.testing.assert_close(fast["loss"], plain["loss"], rtol=1e-5, atol=1e-7)
    wide = [m.double() for m in models]
    result = evaluate(wide[0], wide, COEFFS, (tokens, targets))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own warnings about nested tensors
        expected = plain_loop(wide[0], wide, COEFFS, [(tokens, targets)])
    torch.testing.assert_close(result["loss"], expected["loss"], rtol=1e-10, atol=1e-12)


class Attention(nn.Module):
    """nn.MultiheadAttention called directly: self-attention with its averaged weights, or attention over a
    projected context with other key/value sizes, an additive float mask and no weights."""

    def __init__(self, need_weights: bool) -> None:
        super().__init__()
        self.need_weights = need_weights
        self.embed = nn.Linear(5, 8)
        self.context = nn.Linear(5, 6)
        self.attention = (nn.MultiheadAttention(8, 2, batch_first=True) if need_weights else
                          nn.MultiheadAttention(8, 2, kdim=6, vdim=6, bias=False))
        self.out = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        if self.need_weights:
            h, weights = self.attention(h, h, h)
            return self.out(h.mean(dim=1)) + weights.sum(dim=1)[:, :3]
        length = x.shape[1]
        bias = torch.triu(torch.full((length, length), -2.0), diagonal=1)
        query, source = h.transpose(0, 1), self.context(x).transpose(0, 1)  # sequence first
        h, weights = self.attention(query, source, source, need_weights=False, attn_mask=bias)
        assert weights is None
        return self.out(h.mean(dim=0))


@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_attention(need_weights):
    torch.manual_seed(0)
    assert_native_and_matches_loop(lambda: Attention(need_weights), torch.randn(10, 6, 5), torch.randint(0, 3, (10,)))


class Decoder(nn.Module):
    """nn.TransformerDecoderLayer (sequence first) over a memory, with a causal mask on the target; or a stack of
    two in nn.TransformerDecoder with a final norm."""

    def __init__(self, norm_first: bool = False, stack: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 8)
        self.decoder = nn.TransformerDecoderLayer(8, 2, 12, dropout=0.0, norm_first=norm_first)
        if stack:
            self.decoder = nn.TransformerDecoder(self.decoder, 2, norm=nn.LayerNorm(8))
        self.out = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x).transpose(0, 1)  # [L, N, E]
        causal = nn.Transformer.generate_square_subsequent_mask(h.shape[0])
        h = self.decoder(h, h[:3].tanh(), tgt_mask=causal, tgt_is_causal=True)
        return self.out(h[-1])


@pytest.mark.parametrize("norm_first, stack", [(False, False), (True, False), (False, True)])
def test_transformer_decoder_with_causal_mask(norm_first, stack):
    torch.manual_seed(0)
    assert_native_and_matches_loop(lambda: Decoder(norm_first, stack), torch.randn(10, 6, 5), torch.randint(0, 3, (10,)))


def test_wrapped_attention_exposes_what_callers_read():
    model = EncoderClassifier()
    view = SubspaceView(model, Basis.from_members([model], like=model))
    layer = view.net.encoder.layers[0]
    assert layer.self_attn.batch_first and layer.self_attn.num_heads == 4 and not layer.norm_first
    assert view.net.encoder.num_layers == 2


# --- gradients ----------------------------------------------------------------------------------------------
def reference_gradients(model: nn.Module, stacked: dict[str, Tensor], coeffs: Tensor, inputs: Tensor,
                        weights: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """∂/∂(basis, coeffs) of Σ weights · outputs, per point through functional_call in float64."""
    model = model.double()
    stacked = {n: t.double().requires_grad_() for n, t in stacked.items()}
    coeffs = coeffs.double().requires_grad_()
    total = 0
    for p in range(coeffs.shape[0]):
        point = {n: torch.einsum("k,k...->...", coeffs[p], t) for n, t in stacked.items()}
        out = functional_call(model, point, (inputs.double() if inputs.is_floating_point() else inputs,))
        total = total + (out * weights[p].double()).sum()
    total.backward()
    return {n: t.grad for n, t in stacked.items()}, coeffs.grad


def assert_gradients_match(factory, inputs: Tensor) -> None:
    models = [seeded(factory, seed) for seed in (1, 2, 3)]
    basis = Basis.from_members(models, like=models[0])
    coeffs = torch.tensor([[0.2, 0.5, 0.3], [1.1, -0.4, 0.3]])
    view = SubspaceView(models[0], basis).train()
    stacked = {n: t.clone().requires_grad_() for n, t in basis.stacked.items()}
    view.rebind(stacked)
    leaf = coeffs.clone().requires_grad_()
    out = view(leaf, inputs)
    weights = torch.randn(out.shape)
    (out * weights).sum().backward()
    expected, expected_coeffs = reference_gradients(models[0].train(), basis.stacked, coeffs, inputs, weights)
    for name, grad in expected.items():
        if grad is None:  # an unused layer
            assert stacked[name].grad is None or not stacked[name].grad.any()
            continue
        torch.testing.assert_close(stacked[name].grad.double(), grad, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(leaf.grad.double(), expected_coeffs, rtol=1e-4, atol=1e-5)
    assert view.fallback_names == []


def test_gradients_through_transformer_layers():
    torch.manual_seed(0)
    assert_gradients_match(lambda: EncoderClassifier(norm_first=True, dropout=0.0), tokens_with_padding(5, 6))
    assert_gradients_match(Decoder, torch.randn(4, 6, 5))
    assert_gradients_match(lambda: Attention(need_weights=True), torch.randn(4, 6, 5))


class BiasKV(nn.Module):
    """add_bias_kv is left to the vmap fallback; the parent still reads the attention's attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, add_bias_kv=True, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        assert self.attention.batch_first and self.attention.embed_dim == 8
        return self.out(self.attention(x, x, x)[0].mean(dim=1))


def test_attention_options_left_to_the_fallback_still_expose_attributes():
    torch.manual_seed(0)
    models = [seeded(BiasKV, seed) for seed in (1, 2)]
    inputs, targets = torch.randn(6, 5, 8), torch.randint(0, 3, (6,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = evaluate(models[0], models, COEFFS, (inputs, targets))
    assert_same_loss_and_error(result, plain_loop(models[0], models, COEFFS, [(inputs, targets)]))
    view = SubspaceView(models[0], Basis.from_members(models, like=models[0]))
    assert view.fallback_names == ["attention"]
    with pytest.raises(AttributeError, match="differs per point"):
        view.net.attention.in_proj_weight


# --- recurrent networks -------------------------------------------------------------------------------------
class RecurrentClassifier(nn.Module):
    """A Linear, then nn.RNN / nn.GRU / nn.LSTM over the sequence; the head reads the last step and the final
    hidden states."""

    def __init__(self, kind: str, layers: int = 1, bidirectional: bool = False, batch_first: bool = True,
                 dropout: float = 0.0, first: bool = False) -> None:
        super().__init__()
        self.batch_first, self.first = batch_first, first
        self.embed = nn.Linear(5, 6)
        size = 5 if first else 6
        options = {"nonlinearity": "relu"} if kind == "rnn_relu" else {}
        self.rnn = {"rnn": nn.RNN, "rnn_relu": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[kind](
            size, 7, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, dropout=dropout, **options)
        self.out = nn.Linear(7 * (2 if bidirectional else 1) + 7, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = x if self.first else torch.tanh(self.embed(x))
        h = h if self.batch_first else h.transpose(0, 1)
        out, state = self.rnn(h)
        hidden = state[0] if isinstance(state, tuple) else state
        last = out[:, -1] if self.batch_first else out[-1]
        return self.out(torch.cat([last, hidden[-1]], dim=1))


@pytest.mark.parametrize("kind, layers, bidirectional, batch_first, first", [
    ("gru", 1, False, True, False), ("gru", 2, True, False, True), ("lstm", 2, True, True, False),
    ("lstm", 1, False, False, True), ("rnn", 2, True, True, False), ("rnn_relu", 1, False, False, False)])
def test_recurrent_networks(kind, layers, bidirectional, batch_first, first):
    torch.manual_seed(0)
    assert_native_and_matches_loop(lambda: RecurrentClassifier(kind, layers, bidirectional, batch_first, first=first),
                                   torch.randn(9, 6, 5), torch.randint(0, 3, (9,)))


@pytest.mark.parametrize("kind, bidirectional", [("gru", True), ("lstm", False), ("rnn", True)])
def test_recurrent_input_products_in_blocks_of_steps(kind, bidirectional, monkeypatch):
    """Input products made a few steps at a time (the blocks of long sequences), forwards and backwards."""
    monkeypatch.setattr(recurrent, "BLOCK_BYTES", 3 * 4 * 9 * 7 * 4)  # 4 points × 9 samples × 7 units (fp32):
    # one step of gates at a time for the LSTM and GRU, blocks of 3, 3 and 1 steps for the RNN
    torch.manual_seed(0)
    assert_native_and_matches_loop(lambda: RecurrentClassifier(kind, 2, bidirectional, first=True),
                                   torch.randn(9, 7, 5), torch.randint(0, 3, (9,)))
    assert_gradients_match(lambda: RecurrentClassifier(kind, 2, bidirectional), torch.randn(4, 5, 5))


@pytest.mark.parametrize("kind", ["gru", "lstm", "rnn_relu"])
def test_gradients_through_recurrent_networks(kind):
    torch.manual_seed(0)
    assert_gradients_match(lambda: RecurrentClassifier(kind, 2, bidirectional=True), torch.randn(4, 5, 5))


class WithInitialState(nn.Module):
    """nn.LSTM started from states computed from the input."""

    def __init__(self) -> None:
        super().__init__()
        self.init = nn.Linear(5, 7)
        self.lstm = nn.LSTM(5, 7, batch_first=True)
        self.out = nn.Linear(7, 3)

    def forward(self, x: Tensor) -> Tensor:
        h0 = torch.tanh(self.init(x[:, 0])).unsqueeze(0)
        out, _ = self.lstm(x, (h0, -h0))
        return self.out(out[:, -1])


def test_recurrent_initial_states():
    torch.manual_seed(0)
    assert_native_and_matches_loop(WithInitialState, torch.randn(9, 6, 5), torch.randint(0, 3, (9,)))


class EmbeddedRecurrent(nn.Module):
    """nn.Embedding straight into a recurrent layer; the indices are the input tokens (the same for every point),
    or shifted per point (by a Linear's argmax); or the embedding is scaled in place before the recurrent layer."""

    def __init__(self, kind: str, layers: int, bidirectional: bool, batch_first: bool, indices: str) -> None:
        super().__init__()
        self.batch_first, self.indices = batch_first, indices
        self.shift = nn.Linear(1, 3)
        self.embed = nn.Embedding(TOKENS, 5)
        self.rnn = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[kind](
            5, 7, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first)
        self.out = nn.Linear(7 * (2 if bidirectional else 1), 3)

    def forward(self, tokens: Tensor) -> Tensor:
        if self.indices == "per point":
            tokens = (tokens + self.shift(tokens.unsqueeze(-1).float()).argmax(-1)) % TOKENS
        h = self.embed(tokens)
        if self.indices == "scaled in place":
            h.mul_(1.5)
        out, _ = self.rnn(h if self.batch_first else h.transpose(0, 1))
        return self.out(out[:, -1] if self.batch_first else out[-1])


@pytest.mark.parametrize("kind, layers, bidirectional, batch_first, indices", [
    ("gru", 1, False, True, "shared"), ("lstm", 2, True, False, "per point"), ("gru", 1, True, True, "per point"),
    ("rnn", 1, False, True, "shared"), ("gru", 1, False, True, "scaled in place")])
def test_recurrent_layer_fed_by_an_embedding(kind, layers, bidirectional, batch_first, indices, monkeypatch):
    """The first layer's input products gathered from each point's table products E(p) W_ih(p)ᵀ + b, in blocks of
    steps, where its input is the Embedding's output as it was made (not where it was changed in place)."""
    monkeypatch.setattr(recurrent, "BLOCK_BYTES", 3 * 4 * 9 * 7 * 4)  # blocks of a few steps
    tables = []
    table_products = recurrent.SubspaceRecurrent._table_products
    monkeypatch.setattr(recurrent.SubspaceRecurrent, "_table_products",
                        lambda *args: tables.append(table_products(*args)) or tables[-1])
    torch.manual_seed(0)
    assert_native_and_matches_loop(lambda: EmbeddedRecurrent(kind, layers, bidirectional, batch_first, indices),
                                   tokens_with_padding(), torch.randint(0, 3, (9,)))
    gathered = [t is not None for t in tables]
    assert gathered and all(gathered) == (indices != "scaled in place") and any(gathered) == all(gathered)


def test_only_views_with_recurrent_or_encoder_layers_keep_embedding_outputs():
    """An Embedding's output is held for the forward (for a recurrent or encoder layer to recognise) only where one
    may read it."""
    for factory, expected in [(lambda: Attention(True), False), (Decoder, False), (EncoderClassifier, True),
                              (lambda: EmbeddedRecurrent("gru", 1, False, True, "shared"), True)]:
        models = [seeded(factory, seed).eval() for seed in (1, 2)]
        assert SubspaceView(models[0], Basis.from_members(models)).state.records_lookups is expected


@pytest.mark.parametrize("case", ["positions", "padding"])
def test_points_shared_between_threads(case, monkeypatch):
    """With several intra-op threads, Python threads take the points in turn (one intra-op thread each): the same
    losses as on one thread, for an odd number of points and more threads than points, and the thread count restored."""
    torch.manual_seed(0)
    tokens = tokens_with_padding(9, 11) % 5
    tokens[:, 0] = 1
    targets = torch.randint(0, 3, (9,))
    models = [seeded(lambda: TokenEncoder(**TOKEN_ENCODERS[case]), seed).eval() for seed in (1, 2, 3)]
    coeffs = torch.rand(5, 3)
    calls: list[tuple[int, bool, int]] = []  # (threads set, on the main thread, intra-op threads seen)
    layer = transformer_per_point._layer
    monkeypatch.setattr(transformer_per_point, "_layer", lambda *args: calls.append(
        (threads, threading.current_thread() is threading.main_thread(), torch.get_num_threads())) or layer(*args))
    before = torch.get_num_threads()
    losses = {}
    try:
        for threads in (1, 2, 7):
            torch.set_num_threads(threads)
            losses[threads] = evaluate(models[0], models, coeffs, (tokens, targets))["loss"]
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    for threads in (2, 7):
        torch.testing.assert_close(losses[threads], losses[1], rtol=1e-6, atol=1e-8)
    assert all(seen == 1 for _, main, seen in calls if not main)  # workers run their ops on one thread
    assert {set_to for set_to, main, _ in calls if not main} == {2, 7}


class ReadsEmbeddingSizes(nn.Module):
    """Model code that reads the Embedding's sizes in its forward (as Hugging Face style code does)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 5, padding_idx=0)
        self.head = nn.Linear(5, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        tokens = tokens.clamp(max=self.embed.num_embeddings - 1)
        scale = self.embed.embedding_dim ** -0.5 if self.embed.padding_idx == 0 else 1.0
        return self.head(self.embed(tokens).mean(dim=1) * scale)


def test_embedding_exposes_its_sizes_to_model_code():
    tokens = torch.randint(0, 9, (6, 4))
    assert_native_and_matches_loop(ReadsEmbeddingSizes, tokens, torch.randint(0, 3, (6,)))

