"""torch's Transformer layers (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer and their stacks) in a
subspace view.

Their children (Linear, LayerNorm, Dropout, MultiheadAttention) are converted as everywhere else; these
stand-ins replace only their forward, which in eval mode would otherwise take torch's fused fast path
(`torch._transformer_encoder_layer_fwd`, nested tensors) on the weights of the user's model, and which for
sequence-first layers ([L, N, E]) would hand the view's Linear and LayerNorm tensors whose first axis is not
the folded points (the stand-ins run them points-first). They compute torch's own slow path:

    post-norm:  x = norm1(x + SA(x));          x = norm2(x + FF(x))
    pre-norm:   x = x + SA(norm1(x));          x = x + FF(norm2(x))
    SA(x) = dropout1(self_attn(x, x, x)),      FF(x) = dropout2(linear2(dropout(activation(linear1(x)))))

and, where torch's encoder would run its layers on a nested tensor (eval mode, a key padding mask, no other
mask), set the outputs at padded positions to zero before the final norm as torch does. The decoder layer adds
attention over the memory between the two blocks. Reads of any other attribute (`norm_first`, `num_layers`,
...) go to the original module.

Without gradients, residual sums and ReLU run in place.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import transformer_per_point
from .attention import SubspaceMultiheadAttention
from .layers import SubspaceLayer


class StandIn(nn.Module):
    """Registers `module`'s (converted) children as its own; other attributes are read from `module`. Where it
    `reads_lookups` (encoder layers: `transformer_per_point`), the view keeps its Embeddings' outputs."""

    reads_lookups = False

    def __init__(self, module: nn.Module):
        super().__init__()
        self.__dict__["original"] = module  # not a submodule: its children are registered here
        self._modules.update(module._modules)
        self.train(module.training)
        for child in self.modules():
            if self.reads_lookups and isinstance(child, SubspaceMultiheadAttention):
                child.state.records_lookups = True

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            original = self.__dict__.get("original")
            if original is None:
                raise
            return getattr(original, name)


def _points_first(x: Tensor, batch_first: bool) -> Tensor:
    """[L, P·M, E] <-> [P·M, L, E] where the model is sequence-first: the view's Linear and LayerNorm need the
    folded points on the first axis."""
    return x if batch_first else x.transpose(0, 1)


class SubspaceTransformerEncoderLayer(StandIn):
    """nn.TransformerEncoderLayer's slow path (see the module docstring); point by point where
    `transformer_per_point` applies."""

    reads_lookups = True

    def forward(self, src: Tensor, src_mask: Tensor | None = None, src_key_padding_mask: Tensor | None = None,
                is_causal: bool = False) -> Tensor:
        batch_first = self.self_attn.batch_first
        x = _points_first(src, batch_first)
        if transformer_per_point.applies([self], x, is_causal):
            return _points_first(transformer_per_point.run([self], x, src_mask, src_key_padding_mask), batch_first)
        masks = dict(attn_mask=src_mask, key_padding_mask=src_key_padding_mask, is_causal=is_causal)
        if self.norm_first:
            x = _residual(x, self.dropout1(_attend(self.self_attn, self.norm1(x), None, masks)))
            x = _residual(x, _feed_forward(self, self.norm2(x), self.dropout2))
        else:
            x = self.norm1(_residual(x, self.dropout1(_attend(self.self_attn, x, None, masks))))
            x = self.norm2(_residual(x, _feed_forward(self, x, self.dropout2)))
        return _points_first(x, batch_first)


class SubspaceTransformerDecoderLayer(StandIn):
    """nn.TransformerDecoderLayer: self-attention, attention over `memory`, feed-forward (each with its norm,
    before or after as `norm_first` says)."""

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Tensor | None = None, memory_mask: Tensor | None = None,
                tgt_key_padding_mask: Tensor | None = None, memory_key_padding_mask: Tensor | None = None,
                tgt_is_causal: bool = False, memory_is_causal: bool = False) -> Tensor:
        batch_first = self.self_attn.batch_first
        x, memory = _points_first(tgt, batch_first), _points_first(memory, batch_first)
        own = dict(attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask, is_causal=tgt_is_causal)
        other = dict(attn_mask=memory_mask, key_padding_mask=memory_key_padding_mask, is_causal=memory_is_causal)
        if self.norm_first:
            x = _residual(x, self.dropout1(_attend(self.self_attn, self.norm1(x), None, own)))
            x = _residual(x, self.dropout2(_attend(self.multihead_attn, self.norm2(x), memory, other)))
            x = _residual(x, _feed_forward(self, self.norm3(x), self.dropout3))
        else:
            x = self.norm1(_residual(x, self.dropout1(_attend(self.self_attn, x, None, own))))
            x = self.norm2(_residual(x, self.dropout2(_attend(self.multihead_attn, x, memory, other))))
            x = self.norm3(_residual(x, _feed_forward(self, x, self.dropout3)))
        return _points_first(x, batch_first)


def _residual(x: Tensor, update: Tensor) -> Tensor:
    """x + update; in place into `update` (a fresh tensor of the layer's own) when no gradient is recorded."""
    if torch.is_grad_enabled() and (x.requires_grad or update.requires_grad):
        return x + update
    return update.add_(x)


def _attend(attention: nn.Module, x: Tensor, memory: Tensor | None, masks: dict[str, Any]) -> Tensor:
    """attention(x, memory, memory) (self-attention without memory) on points-first tensors, without weights."""
    batch_first = attention.batch_first
    query = _points_first(x, batch_first)
    source = query if memory is None else _points_first(memory, batch_first)
    out = attention(query, source, source, need_weights=False, **masks)[0]
    return _points_first(out, batch_first)


def _feed_forward(layer: StandIn, x: Tensor, dropout: nn.Module) -> Tensor:
    hidden = layer.linear1(x)
    if layer.activation is F.relu and not (torch.is_grad_enabled() and hidden.requires_grad):
        hidden = hidden.relu_()
    else:
        hidden = layer.activation(hidden)
    return dropout(layer.linear2(layer.dropout(hidden)))


class SubspaceTransformerEncoder(StandIn):
    """nn.TransformerEncoder: the layers in turn (point by point where `transformer_per_point` applies), then the
    optional final norm."""

    reads_lookups = True

    def forward(self, src: Tensor, mask: Tensor | None = None, src_key_padding_mask: Tensor | None = None,
                is_causal: bool | None = None) -> Tensor:
        out = src
        batch_first = self.layers[0].self_attn.batch_first
        if transformer_per_point.applies(self.layers, _points_first(src, batch_first), bool(is_causal)):
            out = _points_first(transformer_per_point.run(self.layers, _points_first(src, batch_first), mask,
                                                          src_key_padding_mask), batch_first)
        else:
            for layer in self.layers:
                out = layer(out, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=bool(is_causal))
        if self._torch_would_nest(src, mask, src_key_padding_mask):
            assert src_key_padding_mask is not None
            padded = src_key_padding_mask != 0  # True or a non-zero float: a padded position
            if padded.shape[0] != out.shape[0]:  # one mask for the samples of one point
                padded = padded.repeat(out.shape[0] // padded.shape[0], 1)
            out = out.masked_fill(padded.unsqueeze(-1), 0.0)
        return _final_norm(self, out)

    def _torch_would_nest(self, src: Tensor, mask: Tensor | None, padding: Tensor | None) -> bool:
        """Whether torch's encoder, evaluating the model without gradients, would run its layers on a nested
        tensor (its outputs at padded positions are then zero)."""
        if not (torch.backends.mha.get_fastpath_enabled() and getattr(self, "use_nested_tensor", False)):
            return False
        if self.layers[0].training or src.dim() != 3 or padding is None or mask is not None:
            return False
        if torch.is_autocast_enabled() or (torch.is_grad_enabled() and self._records_gradients(src)):
            return False
        if getattr(self, "mask_check", True):
            kept = (padding == 0).reshape(-1, padding.shape[-1])
            kept = kept.repeat(src.shape[0] // kept.shape[0], 1)
            return bool(torch._nested_tensor_from_mask_left_aligned(src, kept))
        return True

    def _records_gradients(self, src: Tensor) -> bool:
        return src.requires_grad or any(t.requires_grad for m in self.layers[0].modules()
                                        if isinstance(m, SubspaceLayer) for t in m.stacked.values())


class SubspaceTransformerDecoder(StandIn):
    """nn.TransformerDecoder: the layers in turn, then the optional final norm."""

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Tensor | None = None, memory_mask: Tensor | None = None,
                tgt_key_padding_mask: Tensor | None = None, memory_key_padding_mask: Tensor | None = None,
                tgt_is_causal: bool | None = None, memory_is_causal: bool = False) -> Tensor:
        out = tgt
        for layer in self.layers:
            out = layer(out, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                        tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                        tgt_is_causal=bool(tgt_is_causal), memory_is_causal=memory_is_causal)
        return _final_norm(self, out)


def _final_norm(stack: StandIn, out: Tensor) -> Tensor:
    if stack.norm is None:
        return out
    batch_first = stack.layers[0].self_attn.batch_first
    return _points_first(stack.norm(_points_first(out, batch_first)), batch_first)


STAND_INS: dict[type, type[StandIn]] = {
    nn.TransformerEncoderLayer: SubspaceTransformerEncoderLayer,
    nn.TransformerEncoder: SubspaceTransformerEncoder,
    nn.TransformerDecoderLayer: SubspaceTransformerDecoderLayer,
    nn.TransformerDecoder: SubspaceTransformerDecoder,
}
