"""nn.MultiheadAttention in a subspace view: every point's projections in one combined product, attention per
point over its own sequences.

    q, k, v [p] = query[p] Wq(p)ᵀ + bq(p), key[p] Wk(p)ᵀ + bk(p), value[p] Wv(p)ᵀ + bv(p)   (combined_linear)
    out[p]      = concat_h softmax(q_h k_hᵀ / √d + mask) v_h · Wo(p)ᵀ + bo(p)

The folded batch axis [P·M] (M samples per point) holds P·M independent sequences, so one call of
`F.scaled_dot_product_attention` on [P·M, heads, L, d] serves all points. Masks follow torch's conventions: a
boolean True (or −inf) hides a key; `key_padding_mask` [M or P·M, S], `attn_mask` [L, S] or [M·heads or
P·M·heads, L, S]; a mask with M rows (not folded, e.g. a buffer) is shared by every point.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .layers import SubspaceLayer
from .state import ViewState


def supports_attention(module: nn.MultiheadAttention) -> bool:
    """add_bias_kv and add_zero_attn are left to the vmap fallback."""
    return module.bias_k is None and not module.add_zero_attn and type(module.out_proj) in (
        nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)


class SubspaceMultiheadAttention(SubspaceLayer):
    """Takes the arguments of nn.MultiheadAttention.forward; exposes the attributes its callers read
    (`batch_first`, `embed_dim`, `num_heads`, `head_dim`, `kdim`, `vdim`, `dropout`, `_qkv_same_embed_dim`)."""

    def __init__(self, state: ViewState, stacked: dict[str, Tensor], module: nn.MultiheadAttention):
        super().__init__(state, stacked)
        self.batch_first, self.embed_dim, self.num_heads = module.batch_first, module.embed_dim, module.num_heads
        self.head_dim, self.kdim, self.vdim, self.dropout = module.head_dim, module.kdim, module.vdim, module.dropout
        self._qkv_same_embed_dim = module._qkv_same_embed_dim

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        if query.dim() != 3:
            raise ValueError(f"the view's MultiheadAttention takes batched inputs (3 dims), got {query.dim()}")
        if is_causal and attn_mask is None:
            raise RuntimeError("need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)")
        packed = query is key and key is value
        if not self.batch_first:  # [L, P·M, E] -> [P·M, L, E]
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        q, k, v = self._project(query, key, value, packed)
        heads, d = self.num_heads, self.head_dim
        rows, length, sources = q.shape[0], q.shape[1], k.shape[1]
        q, k, v = (t.reshape(rows, -1, heads, d).transpose(1, 2) for t in (q, k, v))  # [P·M, H, L or S, d]
        dropout = self.dropout if self.training else 0.0
        causal_hint = is_causal and key_padding_mask is None and not need_weights  # as torch: trust the hint
        mask = None if causal_hint else self._additive_mask(attn_mask, key_padding_mask, rows, length, sources, q.dtype)
        weights = None
        if need_weights:
            scores = torch.matmul(q * d ** -0.5, k.transpose(-2, -1))
            if mask is not None:
                scores = scores + mask
            weights = F.dropout(torch.softmax(scores, dim=-1), dropout)
            out = torch.matmul(weights, v)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal_hint)
        out = self._linear(out.transpose(1, 2).reshape(rows, length, self.embed_dim), "out_proj.weight",
                           self.stacked.get("out_proj.bias"))
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _project(self, query: Tensor, key: Tensor, value: Tensor, packed: bool) -> tuple[Tensor, Tensor, Tensor]:
        """The three input projections; one product for self-attention with a packed in_proj_weight."""
        E = self.embed_dim
        bias = self.stacked.get("in_proj_bias")
        biases = [None if bias is None else bias[:, i * E:(i + 1) * E] for i in range(3)]
        if not self._qkv_same_embed_dim:
            return (self._linear(query, "q_proj_weight", biases[0]), self._linear(key, "k_proj_weight", biases[1]),
                    self._linear(value, "v_proj_weight", biases[2]))
        weight = self.stacked["in_proj_weight"]
        if packed:
            return self._linear(query, weight, bias).chunk(3, dim=-1)
        return tuple(self._linear(x, weight[:, i * E:(i + 1) * E], biases[i])  # type: ignore[return-value]
                     for i, x in enumerate((query, key, value)))

    def _linear(self, x: Tensor, weight: Tensor | str, bias: Tensor | None) -> Tensor:
        """x [P·M, L, Din] -> [P·M, L, Dout] with point p's combined weight."""
        weight = self.stacked[weight] if isinstance(weight, str) else weight
        points = self.state.points
        y = ops.combined_linear(x.reshape(points, -1, x.shape[-1]), weight, bias, self.state.coeffs)
        return y.reshape(*x.shape[:-1], weight.shape[1])

    def _additive_mask(self, attn_mask: Tensor | None, key_padding_mask: Tensor | None, rows: int, length: int,
                       sources: int, dtype: torch.dtype) -> Tensor | None:
        """Both masks as one float mask broadcastable to [P·M, H, L, S] (−inf where a key is hidden)."""
        mask = None
        if attn_mask is not None:
            attn_mask = _as_float(attn_mask, dtype)
            if attn_mask.dim() == 2:
                mask = attn_mask.reshape(1, 1, length, sources)
            else:
                mask = self._per_sequence(attn_mask, rows * self.num_heads, "attn_mask")
                mask = mask.reshape(rows, self.num_heads, length, sources)
        if key_padding_mask is not None:
            padding = self._per_sequence(_as_float(key_padding_mask, dtype), rows, "key_padding_mask")
            padding = padding.reshape(rows, 1, 1, sources)
            mask = padding if mask is None else mask + padding
        return mask

    def _per_sequence(self, mask: Tensor, rows: int, name: str) -> Tensor:
        """A mask with one entry per folded sequence ([rows, ...]), repeating one given per sample of one point."""
        points = self.state.points
        if mask.shape[0] == rows:
            return mask
        if mask.shape[0] * points == rows:
            return mask.repeat(points, *([1] * (mask.dim() - 1)))
        raise ValueError(f"{name} has {mask.shape[0]} rows; expected {rows // points} (one per sequence"
                         f"{', times heads' if name == 'attn_mask' else ''})")


def _as_float(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask (True = hidden) as 0 / −inf; a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)
