"""torch's Transformer encoder layers, evaluated one point at a time through all of them.

In evaluation on CPU (no gradients recorded, dropout off, not the view's plain mode) a stack of
nn.TransformerEncoderLayer stand-ins runs as one block: every layer's weights are mixed for all points at once
(θ(p) = Σ_k c[p,k] θ_k, one small product per tensor), then each point's sequences [M, L, E] go through all the
layers with that point's weights, as torch's slow path computes them:

    post-norm:  x = LN1(x + SA(x));   x = LN2(x + FF(x))        pre-norm:  x = x + SA(LN1(x));  x = x + FF(LN2(x))
    SA(x) = softmax(q kᵀ / √d + mask) v · Woᵀ + bo   per head,   [q k v] = x Winᵀ + bin
    FF(x) = W2 act(W1 x + b1) + b2

A point's activations (M·L·E floats, ~1 MB at B7's 128 sequences of 32 × 64) stay in the cache from one operation
to the next, where the layer-by-layer path writes every operation's output for all points ([P·M, L, E] and the
[P·M, H, L, L] attention weights, tens of MB) to memory and reads it back (B7 --quick with token rows turned off,
in one process alternating, load 1.3: 1.42× the layer-by-layer path on one thread, 1.24× on two; with two threads on
cores oversubscribed by other jobs, load 8-9, it once ran 0.47× as fast, small operations waiting for descheduled
threads).

With T > 1 intra-op threads, T Python threads share the points (`each_point`), each running a point's ops on one
thread: a point's ops are too small to split well between threads, and an op split between threads waits at its end
for the slowest, which on a loaded machine is often descheduled (B7's Transformer with a learned positional Embedding,
512 sequences, 36 points, 2 threads, load 3.4-6: 2.4× the points taken in turn on two threads, 1.58× vmap).

The first layer fed straight by the view's Embedding (x = E(p)[indices], recorded in `ViewState.lookups` as for the
recurrent layers) gathers its q/k/v rows from each point's table products E(p) Win(p)ᵀ + bin(p) [V, 3E] instead of
multiplying every position (V ≤ M·L rows a point). With fewer tokens than positions and no attention mask, the
whole stack runs on the distinct tokens' rows instead (`TokenRows`).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import linear_cpu, ops
from .attention import SubspaceMultiheadAttention
from .layers import SubspaceLayerNorm, SubspaceLinear, has_forward_hooks
from .state import ViewState

_ACTIVATIONS = (F.relu, F.gelu)
_IDENTITIES = (nn.Dropout, nn.Identity)


def applies(layers: Sequence[nn.Module], src: Tensor, is_causal: bool) -> bool:
    """Whether `layers` (encoder-layer stand-ins) can run point by point on `src`: see the module docstring."""
    if torch.is_grad_enabled() or src.device.type != "cpu" or src.dim() != 3 or is_causal:
        return False
    for layer in layers:
        attention = layer._modules.get("self_attn")
        if (layer.training or has_forward_hooks(layer) or type(attention) is not SubspaceMultiheadAttention
                or not attention._qkv_same_embed_dim or attention.state.plain
                or layer.activation not in _ACTIVATIONS):
            return False
        children = [layer._modules.get(name) for name in ("linear1", "linear2", "norm1", "norm2")]
        dropouts = [layer._modules.get(name) for name in ("dropout", "dropout1", "dropout2")]
        if not (type(children[0]) is type(children[1]) is SubspaceLinear
                and type(children[2]) is type(children[3]) is SubspaceLayerNorm
                and all(type(d) in _IDENTITIES for d in dropouts)
                and not any(has_forward_hooks(m) for m in (*children, *dropouts, attention))):
            return False
    return True


class _MixedLayer:
    """One encoder layer's weights mixed for every point of the forward in flight ([P, ...] each, or None)."""

    def __init__(self, layer: nn.Module, coeffs: Tensor):
        attention: SubspaceMultiheadAttention = layer.self_attn

        def mixed(module: Any, name: str) -> Tensor | None:
            tensor = module.stacked.get(name)
            return None if tensor is None else ops.mix(coeffs, tensor)

        self.attention, self.norm_first, self.activation = attention, layer.norm_first, layer.activation
        self.in_weight, self.in_bias = attention.stacked["in_proj_weight"], attention.stacked.get("in_proj_bias")
        self.in_proj = (ops.mix(coeffs, self.in_weight), mixed(attention, "in_proj_bias"))
        self.out_proj = (mixed(attention, "out_proj.weight"), mixed(attention, "out_proj.bias"))
        self.linear1 = (mixed(layer.linear1, "weight"), mixed(layer.linear1, "bias"))
        self.linear2 = (mixed(layer.linear2, "weight"), mixed(layer.linear2, "bias"))
        self.norms = [(mixed(norm, "weight"), mixed(norm, "bias"), norm.normalized_shape, norm.eps)
                      for norm in (layer.norm1, layer.norm2)]


def run(layers: Sequence[nn.Module], src: Tensor, attn_mask: Tensor | None, key_padding_mask: Tensor | None
        ) -> Tensor:
    """The layers' output [P·M, L, E] for their input `src` [P·M, L, E] (points first), point by point."""
    state: ViewState = layers[0].self_attn.state
    mixed = [_MixedLayer(layer, state.coeffs) for layer in layers]
    out = torch.empty_like(src, memory_format=torch.contiguous_format)
    lookup = state.lookup_of(src)
    tokens = None
    if lookup is not None and lookup.indices.shape == src.shape[:2] and attn_mask is None:
        tokens = TokenRows.of(state, lookup, key_padding_mask)
    samples = src.shape[0] // state.points
    if tokens is not None:
        def token_point(p: int, span: slice) -> None:
            x = tokens.tables[p].expand(samples, *tokens.tables.shape[1:])
            for layer in mixed:
                x = _layer(layer, p, x, None, tokens.mask(span))
            torch.index_select(x.reshape(-1, x.shape[-1]), 0, tokens.positions(span), out=out[span].flatten(0, 1))

        each_point(state.points, samples, token_point)
        return out
    length = src.shape[1]
    mask = mixed[0].attention._additive_mask(attn_mask, key_padding_mask, src.shape[0], length, length, src.dtype)
    table = _table_products(state, src, lookup, mixed[0]) if not mixed[0].norm_first else None

    def point(p: int, span: slice) -> None:
        x = src[span]
        point_mask = None if mask is None or mask.shape[0] == 1 else mask[span]
        for i, layer in enumerate(mixed):
            qkv = None
            if i == 0 and table is not None:  # gathered rows of x Winᵀ + bin
                products, indices = table
                qkv = F.embedding(indices[0] if indices.shape[0] == 1 else indices[span], products[p])
            x = _layer(layer, p, x, qkv, mask if point_mask is None else point_mask)
        out[span] = x

    each_point(state.points, samples, point)
    return out


def each_point(points: int, samples: int, fn: Callable[[int, slice], None]) -> None:
    """fn(p, rows of point p on the folded batch axis) for every point. With T > 1 intra-op threads, T Python
    threads take the points in turn, each running its ops on one thread: a point's ops are too small to share
    well between threads (each op ends at a barrier, costly where a thread is descheduled), whole points are not."""
    intra_op = torch.get_num_threads()
    threads = min(intra_op, points)
    if threads < 2:
        for p in range(points):
            fn(p, slice(p * samples, (p + 1) * samples))
        return

    def worker(first: int) -> None:
        torch.set_num_threads(1)  # a new thread's own OpenMP setting
        for p in range(first, points, threads):
            fn(p, slice(p * samples, (p + 1) * samples))

    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(threads) as pool:
            for done in [pool.submit(worker, first) for first in range(threads)]:
                done.result()
    finally:
        torch.set_num_threads(intra_op)


class TokenRows:
    """An encoder fed straight by an Embedding (no positional term) and no attention mask is equivariant to the
    order of the positions, so at every layer the row at position i of sequence m depends only on (m, token i): its
    attention reads the distinct tokens' rows, each weighted by its count c[m, v] among the sequence's (unpadded)
    positions, softmax_v(q kᵀ/√d + log c[m, v]). The layers then run on V rows a sequence (every token of the
    vocabulary, starting from the point's table E(p)) instead of L, and position i takes row token i at the end."""

    def __init__(self, tables: Tensor, log_counts: Tensor, indices: Tensor):
        self.tables = tables  # [P, V, E]
        self.log_counts = log_counts  # [M or P·M, 1, 1, V]
        self.indices = indices  # [M or P·M, L]

    @staticmethod
    def of(state: ViewState, lookup: Any, key_padding_mask: Tensor | None) -> "TokenRows | None":
        """None where this does not pay (a vocabulary of at least L tokens) or the padding mask is not boolean."""
        table, indices = lookup.table, lookup.indices
        vocabulary, length = table.shape[1], indices.shape[1]
        if vocabulary >= length or (key_padding_mask is not None and key_padding_mask.dtype != torch.bool):
            return None
        shared = state.shared_rows(indices)
        if shared is not None and (key_padding_mask is None or key_padding_mask.shape[0] == shared[1].shape[0]):
            indices = shared[1]
        kept = torch.ones(indices.shape, dtype=table.dtype, device=table.device)
        if key_padding_mask is not None:
            if key_padding_mask.shape[0] != indices.shape[0]:
                key_padding_mask = key_padding_mask.repeat(indices.shape[0] // key_padding_mask.shape[0], 1)
            kept = kept.masked_fill(key_padding_mask, 0.0)
        counts = kept.new_zeros(indices.shape[0], vocabulary).scatter_add_(1, indices, kept)
        return TokenRows(ops.mix(state.coeffs, table), counts.log().reshape(-1, 1, 1, vocabulary), indices)

    def mask(self, span: slice) -> Tensor:
        return self.log_counts if self.log_counts.shape[0] == span.stop - span.start else self.log_counts[span]

    def positions(self, span: slice) -> Tensor:
        """Row of [M·V] that each position of the point's [M·L] takes."""
        indices = self.indices if self.indices.shape[0] == span.stop - span.start else self.indices[span]
        vocabulary = self.tables.shape[1]
        offsets = torch.arange(0, indices.shape[0] * vocabulary, vocabulary, device=indices.device)
        return (indices + offsets.unsqueeze(1)).flatten()


def _table_products(state: ViewState, src: Tensor, lookup: Any, first: _MixedLayer) -> tuple[Tensor, Tensor] | None:
    """For a first layer fed straight by the view's Embedding: each point's products of its table rows with its
    in-projection, E(p) Win(p)ᵀ + bin(p) [P, V, 3E], and the indices [P·M or 1·M, L] each position reads (one
    copy where all points read the same tokens), from `lookup` (src's, or None). None where there is none or the table
    is the larger."""
    rows, length = src.shape[:2]
    if lookup is None or lookup.indices.shape != (rows, length) or lookup.table.shape[1] > rows // state.points * length:
        return None
    tables = ops.mix(state.coeffs, lookup.table)  # [P, V, E]
    products = ops.combined_linear(tables, first.in_weight, first.in_bias, state.coeffs)
    shared = state.shared_rows(lookup.indices)
    return products, (shared[1].unsqueeze(0) if shared is not None else lookup.indices)


def _layer(layer: _MixedLayer, p: int, x: Tensor, qkv: Tensor | None, mask: Tensor | None) -> Tensor:
    """One encoder layer at point p on x [M, L, E] (qkv: its in-projection when already known)."""
    if layer.norm_first:
        x = _residual(x, _self_attention(layer, p, _norm(layer, 0, p, x), None, mask))
        return _residual(x, _feed_forward(layer, p, _norm(layer, 1, p, x)))
    x = _norm(layer, 0, p, _residual(x, _self_attention(layer, p, x, qkv, mask)))
    return _norm(layer, 1, p, _residual(x, _feed_forward(layer, p, x)))


def _self_attention(layer: _MixedLayer, p: int, x: Tensor, qkv: Tensor | None, mask: Tensor | None) -> Tensor:
    attention = layer.attention
    samples, length, embed = x.shape
    heads, d = attention.num_heads, attention.head_dim
    if x.stride(0) == 0 and mask is not None and mask.shape[1:3] == (1, 1):  # the same rows in every sequence
        q, k, v = _linear(x[0], layer.in_proj, p).view(length, 3, heads, d).permute(1, 2, 0, 3)  # [H, L, d]
        scores = torch.matmul(q, k.transpose(1, 2)).mul_(d ** -0.5)  # [H, L, S] once for all sequences
        weights = torch.softmax(scores.unsqueeze(1) + mask.reshape(1, samples, 1, -1), dim=-1)  # [H, M, L, S]
        out = torch.bmm(weights.view(heads, -1, weights.shape[-1]), v).view(heads, samples, length, d)
        out = out.permute(1, 2, 0, 3)
    else:
        if qkv is None:
            qkv = _shared_rows_once(lambda rows: _linear(rows, layer.in_proj, p), x)
        q, k, v = qkv.view(samples, length, 3, heads, d).permute(2, 0, 3, 1, 4)  # [M, H, L, d] each
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    return _linear(out.reshape(samples, length, embed), layer.out_proj, p)


def _feed_forward(layer: _MixedLayer, p: int, x: Tensor) -> Tensor:
    relu = layer.activation is F.relu
    hidden = _linear(x, layer.linear1, p, relu=relu)
    return _linear(hidden if relu else layer.activation(hidden), layer.linear2, p)


def _linear(x: Tensor, weights: tuple[Tensor, Tensor | None], p: int, relu: bool = False) -> Tensor:
    """x [..., Din] @ W(p)ᵀ + b(p) (then ReLU): oneDNN's linear with the bias and ReLU in its epilogue in float32."""
    weight, bias = weights[0][p], None if weights[1] is None else weights[1][p]
    rows = x.reshape(-1, x.shape[-1])
    if linear_cpu.ONEDNN and x.dtype == torch.float32:
        y = linear_cpu.onednn_linear(rows, weight, bias, relu=relu)
    else:
        y = F.linear(rows, weight, bias)
        y = y.relu_() if relu else y
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _norm(layer: _MixedLayer, i: int, p: int, x: Tensor) -> Tensor:
    weight, bias, shape, eps = layer.norms[i]
    weight, bias = None if weight is None else weight[p], None if bias is None else bias[p]
    return _shared_rows_once(lambda rows: F.layer_norm(rows, shape, weight, bias, eps), x)


def _shared_rows_once(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """fn(x) for a row-wise fn; where x is one sequence's rows expanded over all (stride 0), on those rows once."""
    if x.stride(0) == 0:
        y = fn(x[:1])
        return y.expand(x.shape[0], *y.shape[1:])
    return fn(x)


def _residual(x: Tensor, update: Tensor) -> Tensor:
    """x + update, in place into `update` (a fresh tensor of this block's own)."""
    return update.add_(x)
