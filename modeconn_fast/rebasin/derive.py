"""Derive a PermutationSpec from any traceable model with torch.fx (DESIGN §4).

Walk the graph once, in order, carrying for every tensor its feature axis and the union-find slot of the
permutation acting on it:
  - Linear / Conv / Embedding outputs open a new slot (their weight's output axis, bias); their input axis
    joins the slot of the incoming tensor;
  - element-wise ops, norms, pooling, dropout pass the slot on (norm scales and BatchNorm running statistics
    join it);
  - a binary op of two permuted tensors (residual `add`, gating `mul`) unites their slots;
  - flatten / view / reshape that merge trailing dims into the feature axis turn it into blocks (`inner`);
  - the model's inputs and outputs belong to the special FIXED slot: whatever unites with it is not permuted;
  - nn.MultiheadAttention, nn.TransformerEncoderLayer and nn.TransformerEncoder are leaves of the trace whose
    structure is written out here: the residual stream, the feed-forward units, and per attention module a q/k
    group and a v group whose units permute within each head, heads moving as blocks (spec.Heads);
  - attention written out by hand (GPT style) is followed op by op: a view that splits a unit axis of E into
    [H, E/H] gives the tensor a head axis (a head tag, its own union-find), `q @ kᵀ` or scaled_dot_product_attention
    unites the q and k groups and ties the heads of q, k and v, `weights @ v` keeps v's units, and the view that
    merges [H, E/H] back gives plain units of a head-structured group; `split`/`chunk` of a fused qkv Linear's
    output carves its rows into one group per part.
Anything else raises SpecError naming the fx node.
"""
from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from .spec import Axis, Heads, PermutationSpec, SpecError, as_args

FIXED = 0

_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.Softplus,
    nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.AlphaDropout, nn.Softmax, nn.LogSoftmax,
)  # fmt: skip
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.LPPool2d,
)  # fmt: skip
_ELEMENTWISE_FUNCTIONS = {
    torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.abs, torch.neg, torch.square, torch.sqrt,
    F.relu, F.relu6, F.gelu, F.silu, F.sigmoid, F.tanh, F.leaky_relu, F.elu, F.selu, F.softplus, F.mish,
    F.hardswish, F.dropout, F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, operator.neg,
}  # fmt: skip
_ELEMENTWISE_METHODS = {
    "relu", "sigmoid", "tanh", "exp", "abs", "neg", "square", "sqrt", "contiguous", "clone", "float", "double",
    "half", "bfloat16", "to", "type_as", "detach", "softmax", "log_softmax",
}  # fmt: skip
_BINARY = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub, operator.imul,
    torch.add, torch.sub, torch.mul, torch.div, "add", "sub", "mul", "div", "add_", "mul_",
}  # fmt: skip
_POOL_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d, torch.max_pool2d, torch.avg_pool1d,
}  # fmt: skip
_RESHAPES = {torch.flatten, torch.reshape, "flatten", "view", "reshape"}
_REDUCTIONS = {torch.mean, torch.sum, torch.amax, "mean", "sum", "amax"}
_MATMULS = {operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm"}
_SPLITS = {torch.split, torch.chunk, "split", "chunk"}
_MASKED_FILL = {torch.masked_fill, "masked_fill", "masked_fill_"}
_CONSTANTS = {  # tensors made from shapes or fixed tensors only (masks, positions): nothing to permute
    torch.arange, torch.ones, torch.zeros, torch.full, torch.empty, torch.eye, torch.tril, torch.triu, torch.ones_like,
    torch.zeros_like, torch.logical_not, operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
    operator.invert, "tril", "triu", "bool", "long", "int", "eq", "ne", "logical_not",
}  # fmt: skip


@dataclass(frozen=True)
class Feature:
    """A tensor whose axis `dim` carries units of slot `slot`, each a block of `inner` entries; dim None: none.

    Attention heads split out of the unit axis: axis `heads` indexes the head (head tag `tag`) and axis `dim` the
    units within it; a tensor with `heads` but dim None (attention scores) carries the head order only."""

    dim: int | None
    slot: int = FIXED
    inner: int = 1
    heads: int | None = None
    tag: int = 0

    @property
    def live(self) -> bool:
        """Whether any axis of the tensor follows a permutation (units or head order)."""
        return self.dim is not None or self.heads is not None


class _Derivation:
    def __init__(self, gm: torch.fx.GraphModule, move_heads: bool = True) -> None:
        self.gm = gm
        self.move_heads = move_heads
        self.heads: list[tuple[str, int, int, int, bool]] = []  # attention module, q/k slot, v slot, heads, move
        self.parent = [FIXED]
        self.opener = ["inputs/outputs"]
        self.axes: list[tuple[str, int, int, int, int, int | None]] = []  # tensor, dim, slot, inner, start, stop
        self.state: dict[torch.fx.Node, Any] = {}
        self.carriers: list[tuple[str, Feature]] = []  # every node whose output carries permuted units
        self.tag_parent: list[int] = []  # union-find over head tags: heads that must move in one order
        self.tag_heads: list[int] = []  # number of heads of each tag
        self.tag_fixed: set[int] = set()  # tags whose heads must stay in place
        self.slot_tag: dict[int, int] = {}  # root slot -> head tag of a head-structured group

    # union-find over slots; FIXED is its own class
    def new_slot(self, opener: str) -> int:
        self.parent.append(len(self.parent))
        self.opener.append(opener)
        return len(self.parent) - 1

    def find(self, slot: int) -> int:
        return _root(self.parent, slot)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # the older slot (FIXED first) stays root, so groups are named after their first opener
            root, child = min(ra, rb), max(ra, rb)
            self.parent[child] = root
            if child in self.slot_tag:  # a group joined with a head-structured one keeps its head structure
                tag = self.slot_tag.pop(child)
                self.slot_tag[root] = self.union_tags(self.slot_tag[root], tag) if root in self.slot_tag else tag

    # union-find over head tags
    def new_tag(self, num_heads: int) -> int:
        self.tag_parent.append(len(self.tag_parent))
        self.tag_heads.append(num_heads)
        return len(self.tag_parent) - 1

    def find_tag(self, tag: int) -> int:
        return _root(self.tag_parent, tag)

    def union_tags(self, a: int, b: int) -> int:
        ra, rb = self.find_tag(a), self.find_tag(b)
        if self.tag_heads[ra] != self.tag_heads[rb]:
            raise SpecError(f"attention tensors with {self.tag_heads[ra]} and {self.tag_heads[rb]} heads meet")
        if ra != rb:
            self.tag_parent[max(ra, rb)] = min(ra, rb)
            if max(ra, rb) in self.tag_fixed:
                self.tag_fixed.add(min(ra, rb))
        return min(ra, rb)

    def fix_heads(self, tag: int) -> None:
        self.tag_fixed.add(self.find_tag(tag))

    def slot_heads(self, node: torch.fx.Node, slot: int, num_heads: int) -> int:
        """The head tag of `slot` split into `num_heads` heads (a new one unless the slot has heads already)."""
        root = self.find(slot)
        if root == self.find(FIXED):  # fixed units: the heads of whatever meets them stay in place
            tag = self.new_tag(num_heads)
            self.fix_heads(tag)
            return tag
        if root not in self.slot_tag:
            self.slot_tag[root] = self.new_tag(num_heads)
        elif self.tag_heads[self.find_tag(self.slot_tag[root])] != num_heads:
            raise self.fail(node, f"units already split into {self.tag_heads[self.find_tag(self.slot_tag[root])]} heads")
        return self.slot_tag[root]

    def claim(self, tensor: str, dim: int, feature: Feature, start: int = 0, stop: int | None = None) -> None:
        if feature.dim is not None:
            self.axes.append((tensor, dim, feature.slot, feature.inner, start, stop))

    def fail(self, node: torch.fx.Node, why: str) -> SpecError:
        target = getattr(node.target, "__name__", node.target)
        return SpecError(f"cannot derive a permutation spec at fx node {node.name!r} ({node.op} {target}): {why}")

    # ------------------------------------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.state[node] = Feature(None)
            elif node.op == "output":
                for value in _tensors_in(node.args, self.state):
                    if isinstance(value, Feature) and value.dim is not None:
                        self.union(value.slot, FIXED)
                    if isinstance(value, Feature) and value.heads is not None:
                        self.fix_heads(value.tag)
            elif node.op == "get_attr":
                self.state[node] = ("param", node.target)
            elif node.op == "call_module":
                self.state[node] = self.module(node, self.gm.get_submodule(node.target))
            else:
                self.state[node] = self.function(node)
            value = self.state.get(node)
            if isinstance(value, Feature) and value.dim is not None and value.heads is None and node.op != "output":
                self.carriers.append((node.name, value))

    def input(self, node: torch.fx.Node, index: int = 0) -> Feature:
        value = self.state.get(node.args[index]) if isinstance(node.args[index], torch.fx.Node) else None
        if not isinstance(value, Feature):
            raise self.fail(node, "its input is not a tensor the derivation followed")
        return value

    def module(self, node: torch.fx.Node, mod: nn.Module) -> Feature:
        name = node.target
        x = self.input(node)
        ndim = _ndim(node.args[0])
        if x.heads is not None and not isinstance(mod, _ELEMENTWISE_MODULES):
            raise self.fail(node, f"module type {type(mod).__name__} over attention heads is not supported")
        if isinstance(mod, nn.Linear):
            if x.dim is not None and x.dim != ndim - 1:
                raise self.fail(node, f"Linear over axis {ndim - 1} while the units lie on axis {x.dim}")
            self.claim(f"{name}.weight", 1, x)
            out = Feature(_ndim(node) - 1, self.new_slot(name))
            self.claim(f"{name}.weight", 0, out)
            if mod.bias is not None:
                self.claim(f"{name}.bias", 0, out)
            return out
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d)):
            if x.dim not in (None, 1) or x.inner != 1:
                raise self.fail(node, "convolution over an axis that is not the channel axis")
            transposed = isinstance(mod, (nn.ConvTranspose1d, nn.ConvTranspose2d))
            in_dim, out_dim = (0, 1) if transposed else (1, 0)
            if mod.groups == 1:
                self.claim(f"{name}.weight", in_dim, x)
                out = Feature(1, self.new_slot(name))
                self.claim(f"{name}.weight", out_dim, out)
            elif mod.groups == mod.in_channels == mod.out_channels and not transposed:  # depthwise
                out = Feature(1 if x.dim is not None else None, x.slot)
                self.claim(f"{name}.weight", 0, out)
            else:
                raise self.fail(node, f"grouped convolution (groups={mod.groups}) is not supported")
            if mod.bias is not None:
                self.claim(f"{name}.bias", 0, out)
            return out
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
            if x.dim not in (None, 1):
                raise self.fail(node, "BatchNorm over an axis that is not the unit axis")
            for tensor in ("weight", "bias", "running_mean", "running_var"):
                if getattr(mod, tensor, None) is not None:
                    self.claim(f"{name}.{tensor}", 0, x)
            return x
        if isinstance(mod, nn.LayerNorm):
            first = ndim - len(mod.normalized_shape)
            if x.dim is not None and x.dim >= first and mod.elementwise_affine:
                for tensor in ("weight", "bias"):
                    if getattr(mod, tensor, None) is not None:
                        self.claim(f"{name}.{tensor}", x.dim - first, x)
            return x
        if isinstance(mod, nn.GroupNorm):
            if mod.num_groups not in (1, mod.num_channels):
                raise self.fail(node, f"GroupNorm with {mod.num_groups} groups of several channels ties units")
            if x.dim not in (None, 1):
                raise self.fail(node, "GroupNorm over an axis that is not the unit axis")
            if mod.affine:
                self.claim(f"{name}.weight", 0, x)
                self.claim(f"{name}.bias", 0, x)
            return x
        if isinstance(mod, nn.MultiheadAttention):
            return self.attention(node, mod)
        if isinstance(mod, nn.TransformerEncoderLayer):
            return self.encoder_layer(node, name, mod, x, ndim)
        if isinstance(mod, nn.TransformerEncoder):
            return self.encoder(node, mod, x)
        if isinstance(mod, nn.Embedding):
            out = Feature(_ndim(node) - 1, self.new_slot(name))
            self.claim(f"{name}.weight", 1, out)
            return out
        if isinstance(mod, _POOL_MODULES):
            if x.dim not in (None, 1):
                raise self.fail(node, "pooling over the unit axis")
            return x
        if isinstance(mod, nn.Flatten):
            return self.reshape(node, x)
        if isinstance(mod, _ELEMENTWISE_MODULES):
            return x
        raise self.fail(node, f"module type {type(mod).__name__} is not supported")

    def attention(self, node: torch.fx.Node, mod: nn.MultiheadAttention) -> tuple[str, list[Feature]]:
        """nn.MultiheadAttention called in the model: (output, weights); the weights carry no units."""
        inputs = [self.input(node, i) for i in range(3)]
        call = dict(zip(("need_weights", "attn_mask", "average_attn_weights"), node.args[4:7])) | dict(node.kwargs)
        weights = call.get("need_weights", True) is not False
        per_head_weights = weights and call.get("average_attn_weights", True) is False
        out = self.multihead(node, node.target, mod, inputs, _ndim(node.args[0]), keep_heads=per_head_weights)
        return ("tuple", [out, Feature(None)])

    def multihead(
        self, node: torch.fx.Node, name: str, mod: nn.MultiheadAttention, inputs: list[Feature], ndim: int,
        keep_heads: bool = False,
    ) -> Feature:  # fmt: skip
        """Multi-head attention softmax(q_h k_hᵀ/√d) v_h per head h, heads concatenated into out_proj.

        One permutation for query, key and value inputs permutes in_proj_weight's columns. Per head, a
        permutation of the head's d units applied to its q and k rows together keeps q_h·k_h; another applied
        to its v rows and out_proj's columns h·d … (h+1)·d − 1 keeps out_proj(v_h); the head order is shared by
        both (Heads; `keep_heads`: heads stay in place, e.g. when per-head attention weights are returned).
        out_proj's output opens a new group."""
        if not mod._qkv_same_embed_dim:
            raise self.fail(node, f"{name}: attention with separate key/value sizes is not supported")
        if mod.bias_k is not None:
            raise self.fail(node, f"{name}: attention with add_bias_kv=True is not supported")
        live = [f for f in inputs if f.dim is not None]
        for f in live:
            if f.dim != ndim - 1 or f.inner != 1:
                raise self.fail(node, f"{name}: attention over an axis that is not the embedding axis")
            self.union(live[0].slot, f.slot)
        if live and len(live) < 3:  # a fixed tensor shares the projection's columns
            self.union(live[0].slot, FIXED)
        if live:
            self.claim(f"{name}.in_proj_weight", 1, live[0])
        e = mod.embed_dim
        qk, v = Feature(0, self.new_slot(f"{name}.qk")), Feature(0, self.new_slot(f"{name}.v"))
        for tensor in ("in_proj_weight", "in_proj_bias"):
            if getattr(mod, tensor) is not None:
                self.claim(f"{name}.{tensor}", 0, qk, 0, e)
                self.claim(f"{name}.{tensor}", 0, qk, e, 2 * e)
                self.claim(f"{name}.{tensor}", 0, v, 2 * e, 3 * e)
        self.claim(f"{name}.out_proj.weight", 1, v)
        self.heads.append((name, qk.slot, v.slot, mod.num_heads, self.move_heads and not keep_heads))
        out = Feature(ndim - 1, self.new_slot(f"{name}.out_proj"))
        self.claim(f"{name}.out_proj.weight", 0, out)
        if mod.out_proj.bias is not None:
            self.claim(f"{name}.out_proj.bias", 0, out)
        return out

    def encoder_layer(
        self, node: torch.fx.Node, name: str, mod: nn.TransformerEncoderLayer, x: Feature, ndim: int
    ) -> Feature:
        """nn.TransformerEncoderLayer, either norm order: x + SA(LN₁ x), then + W₂ act(W₁ LN₂ x) + b₂ (norm_first),
        or LN₁(x + SA(x)), then LN₂(x + FF(x)). The residual stream (x, both norms, out_proj's and linear2's
        outputs) is one group; linear1's outputs (linear2's inputs) open another; the heads as in `multihead`."""
        if x.dim is not None and (x.dim != ndim - 1 or x.inner != 1):
            raise self.fail(node, f"{name}: the units do not lie on the last (embedding) axis")
        act = mod.activation
        if act not in _ELEMENTWISE_FUNCTIONS and not isinstance(act, _ELEMENTWISE_MODULES):
            raise self.fail(node, f"{name}: activation {act!r} is not a known element-wise function")
        stream = x if x.dim is not None else Feature(ndim - 1, FIXED)
        params = dict(mod.named_parameters())
        for tensor in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "linear2.bias"):
            if tensor in params:
                self.claim(f"{name}.{tensor}", 0, stream)
        self.union(self.multihead(node, f"{name}.self_attn", mod.self_attn, [stream] * 3, ndim).slot, stream.slot)
        hidden = Feature(ndim - 1, self.new_slot(f"{name}.linear1"))
        self.claim(f"{name}.linear1.weight", 1, stream)
        self.claim(f"{name}.linear1.weight", 0, hidden)
        if mod.linear1.bias is not None:
            self.claim(f"{name}.linear1.bias", 0, hidden)
        self.claim(f"{name}.linear2.weight", 1, hidden)
        self.claim(f"{name}.linear2.weight", 0, stream)
        return stream

    def encoder(self, node: torch.fx.Node, mod: nn.TransformerEncoder, x: Feature) -> Feature:
        """nn.TransformerEncoder: its layers in turn, then its final norm (a LayerNorm on the stream), if any."""
        ndim = _ndim(node.args[0])
        for i, layer in enumerate(mod.layers):
            if not isinstance(layer, nn.TransformerEncoderLayer):
                raise self.fail(node, f"layer {i} is a {type(layer).__name__}, not an nn.TransformerEncoderLayer")
            x = self.encoder_layer(node, f"{node.target}.layers.{i}", layer, x, ndim)
        if mod.norm is not None:
            if not isinstance(mod.norm, nn.LayerNorm):
                raise self.fail(node, f"final norm {type(mod.norm).__name__} is not supported")
            for tensor in ("weight", "bias"):
                if getattr(mod.norm, tensor) is not None:
                    self.claim(f"{node.target}.norm.{tensor}", 0, x)
        return x

    def function(self, node: torch.fx.Node) -> Any:
        target = node.target
        if target is operator.getitem and isinstance(self.state.get(node.args[0]), tuple):
            kind, items = self.state[node.args[0]]
            if kind == "tuple" and isinstance(node.args[1], int):
                return items[node.args[1]]
        if _tensor_meta(node) is None:  # shapes, sizes, getattr of a non-tensor: nothing to permute
            return None
        if target is operator.getitem:
            return self.index(node)
        if target in _CONSTANTS:
            if any(isinstance(v, Feature) and v.live for v in _tensors_in((node.args, node.kwargs), self.state)):
                raise self.fail(node, "comparison or mask made from permuted units")
            return Feature(None)
        if target in _BINARY:
            return self.binary(node)
        if target in _ELEMENTWISE_FUNCTIONS or (node.op == "call_method" and target in _ELEMENTWISE_METHODS):
            return self.input(node)
        if target in (torch.pow, "pow") and not isinstance(node.args[1], torch.fx.Node):
            return self.input(node)
        if target in _MASKED_FILL:
            x = self.input(node)
            self.fixed_operand(node, x, node.args[1])
            return x
        if target in _MATMULS:
            return self.matmul(node)
        if target is F.scaled_dot_product_attention:
            return self.sdpa(node)
        if target in _SPLITS:
            return self.split(node)
        if target in _POOL_FUNCTIONS:
            x = self.input(node)
            if x.dim not in (None, 1):
                raise self.fail(node, "pooling over the unit axis")
            return x
        if target in _RESHAPES:
            return self.reshape(node, self.input(node))
        if target in ("transpose", "permute", "movedim", torch.transpose, torch.permute, torch.movedim):
            return self.move(node, self.input(node))
        if target is getattr and node.args[1] in ("T", "mT"):  # reverses the axes / swaps the last two
            x = self.input(node)
            if x.dim is None:
                return x
            ndim = _ndim(node)
            swap = {ndim - 1: ndim - 2, ndim - 2: ndim - 1}
            if x.heads is not None:
                raise self.fail(node, ".T of a tensor split into attention heads: use transpose")
            return Feature(ndim - 1 - x.dim if node.args[1] == "T" else swap.get(x.dim, x.dim), x.slot, x.inner)
        if target in _REDUCTIONS:
            return self.reduce(node, self.input(node))
        if target in (torch.cat, torch.concat):
            return self.cat(node)
        raise self.fail(node, "operation not supported by the spec derivation")

    def binary(self, node: torch.fx.Node) -> Feature:
        out_ndim = _ndim(node)
        features: list[Feature] = []
        others: list[Any] = []
        for arg in node.args[:2]:
            value = self.state.get(arg) if isinstance(arg, torch.fx.Node) else None
            if isinstance(value, Feature) and value.live:
                features.append(_aligned(value, out_ndim - _ndim(arg)))
            else:
                others.append(arg)
        if not features:
            return Feature(None)
        first = features[0]
        for f in features[1:]:
            if (f.dim, f.inner, f.heads) != (first.dim, first.inner, first.heads):
                raise self.fail(node, "operands carry units on different axes")
            if f.dim is not None:
                self.union(first.slot, f.slot)
            if f.heads is not None:
                self.union_tags(first.tag, f.tag)
        for arg in others:
            self.fixed_operand(node, first, arg)
        return first

    def fixed_operand(self, node: torch.fx.Node, x: Feature, arg: Any) -> None:
        """`arg` (a parameter, a fixed tensor or a number) meets the permuted tensor `x` element-wise."""
        if not isinstance(arg, torch.fx.Node) or _tensor_meta(arg) is None:
            return
        value = self.state.get(arg)
        shape = _shape(arg)
        offset = _ndim(node) - len(shape)

        def extent(axis: int | None) -> int:
            return 1 if axis is None or axis < offset else shape[axis - offset]

        if x.heads is not None and extent(x.heads) > 1:  # e.g. a per-head bias: the heads stay in place
            self.fix_heads(x.tag)
        if extent(x.dim) == 1:
            return  # broadcast along the units: invariant
        if isinstance(value, tuple) and value[0] == "param" and x.heads is None:  # a parameter per unit, e.g. a bias
            self.claim(value[1], x.dim - offset, x)
        else:  # a fixed tensor (e.g. the input) meets permuted units: they cannot be permuted
            self.union(x.slot, FIXED)

    def index(self, node: torch.fx.Node) -> Any:
        """x[...] with slices, integers, None and Ellipsis; the unit and head axes must be kept whole."""
        value = self.state.get(node.args[0])
        items = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        if any(not (i is None or i is Ellipsis or isinstance(i, (int, slice))) for i in items):
            raise self.fail(node, "indexing with tensors is not supported")
        if isinstance(value, tuple) and value[0] == "param":  # a slice of a parameter, e.g. positions[:T]
            return value if all(isinstance(i, slice) or i is Ellipsis for i in items) else Feature(None)
        if not isinstance(value, Feature) or not value.live:
            return Feature(None)
        ndim = _ndim(node.args[0])
        consumed = sum(isinstance(i, (int, slice)) for i in items)
        where: dict[int, int] = {}  # input axis -> output axis
        axis = out = 0
        for item in items:
            if item is None:
                out += 1
            elif item is Ellipsis:
                for _ in range(ndim - consumed):
                    where[axis], axis, out = out, axis + 1, out + 1
            else:
                if axis in (value.dim, value.heads) and item != slice(None):
                    raise self.fail(node, "indexing into the unit or head axis")
                if isinstance(item, slice):
                    where[axis], out = out, out + 1
                axis += 1
        while axis < ndim:
            where[axis], axis, out = out, axis + 1, out + 1
        dim = None if value.dim is None else where[value.dim]
        heads = None if value.heads is None else where[value.heads]
        return Feature(dim, value.slot, value.inner, heads, value.tag)

    def matmul(self, node: torch.fx.Node) -> Feature:
        """a @ b over a's last and b's second-to-last axis: units on both sides of the contraction unite (q·kᵀ),
        units on b's last axis pass on (weights @ v); head axes among the leading axes must meet."""
        n = _ndim(node)
        a, b = (_aligned(self.input(node, i), n - _ndim(node.args[i])) for i in range(2))
        if _ndim(node.args[0]) < 2 or _ndim(node.args[1]) < 2:
            raise self.fail(node, "matmul with a vector is not supported")
        if a.dim not in (None, n - 1) or b.dim not in (None, n - 2, n - 1) or (a.dim is not None and b.dim == n - 1):
            raise self.fail(node, "matmul over units that are not contracted with units, nor carried by the values")
        if (a.dim is None) != (b.dim != n - 2):
            contracted = a if a.dim is not None else b
            self.union(contracted.slot, FIXED)  # units contracted with a fixed tensor
        elif a.dim is not None:
            if a.inner != b.inner:
                raise self.fail(node, "contracted units with different block sizes")
            self.union(a.slot, b.slot)
        heads = [f for f in (a, b) if f.heads is not None]
        for f in heads[1:]:
            if f.heads != heads[0].heads:
                raise self.fail(node, "operands carry heads on different axes")
            self.union_tags(heads[0].tag, f.tag)
        for f, arg in ((a, node.args[1]), (b, node.args[0])):
            if f.heads is not None and not (isinstance(self.state.get(arg), Feature) and self.state[arg].heads is not None):
                self.fixed_operand(node, Feature(None, heads=f.heads, tag=f.tag), arg)
        head = heads[0] if heads else Feature(None)
        if b.dim == n - 1:
            return Feature(n - 1, b.slot, b.inner, head.heads, head.tag)
        return Feature(None, FIXED, 1, head.heads, head.tag)

    def sdpa(self, node: torch.fx.Node) -> Feature:
        """F.scaled_dot_product_attention(q, k, v, attn_mask, ...): q and k units united, v's units carried on,
        the heads of all three tied; a mask with an extent over the heads keeps them in place."""
        n = _ndim(node)
        q, k, v = (_aligned(self.input(node, i), n - _ndim(node.args[i])) for i in range(3))
        for f in (q, k, v):
            if f.dim not in (None, n - 1):
                raise self.fail(node, "attention over units that are not on the last axis")
        if (q.dim is None) != (k.dim is None):
            self.union((q if q.dim is not None else k).slot, FIXED)
        elif q.dim is not None:
            self.union(q.slot, k.slot)
        heads = [f for f in (q, k, v) if f.heads is not None]
        if heads and len(heads) < 3:
            raise self.fail(node, "some of q, k, v are split into heads and some are not")
        for f in heads[1:]:
            if f.heads != heads[0].heads:
                raise self.fail(node, "q, k, v carry heads on different axes")
            self.union_tags(heads[0].tag, f.tag)
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        if heads:
            self.fixed_operand(node, Feature(None, heads=v.heads, tag=v.tag), mask)
        return v

    def split(self, node: torch.fx.Node) -> tuple[str, list[Feature]]:
        """split / chunk: along other axes every part keeps the units; along the units of a Linear's output (a
        fused q/k/v projection) each part opens its own group over its rows of the weight and bias."""
        x = self.input(node)
        parts = [tuple(meta.shape) for meta in _tensor_meta(node)]
        ndim = _ndim(node.args[0])
        dim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % ndim
        if dim not in (x.dim, x.heads):
            return ("tuple", [x] * len(parts))
        source = node.args[0]
        if not (
            dim == x.dim and x.heads is None and x.inner == 1 and source.op == "call_module"
            and isinstance(self.gm.get_submodule(source.target), nn.Linear) and len(source.users) == 1
        ):  # fmt: skip
            raise self.fail(node, "split of the units of anything but a Linear's output used only here")
        own = [i for i, axis in enumerate(self.axes) if axis[2] == x.slot]
        if self.find(x.slot) != x.slot or any(self.parent[s] == x.slot for s in range(len(self.parent)) if s != x.slot):
            raise self.fail(node, "split of units already tied to others")
        rows = [self.axes[i] for i in own]
        self.axes = [axis for i, axis in enumerate(self.axes) if i not in own]
        features, start = [], 0
        for i, shape in enumerate(parts):
            part = Feature(x.dim, self.new_slot(f"{source.target}[{i}]"))
            for tensor, axis_dim, _, _, _, _ in rows:
                self.claim(tensor, axis_dim, part, start, start + shape[dim])
            features.append(part)
            start += shape[dim]
        return ("tuple", features)

    def reshape(self, node: torch.fx.Node, x: Feature) -> Feature:
        if not x.live:
            return x
        shape_in, shape_out = _shape(node.args[0]), _shape(node)
        prefix = [math.prod(shape_out[:j]) for j in range(len(shape_out) + 1)]
        if x.heads is not None:  # only [..., H, d, ...] -> [..., H·d, ...]: the heads merge back into units
            lead = math.prod(shape_in[: x.heads])
            if x.dim != x.heads + 1 or lead not in prefix:
                raise self.fail(node, "reshape of attention heads other than merging [heads, units] into one axis")
            j = prefix.index(lead)
            if j >= len(shape_out) or shape_out[j] != shape_in[x.heads] * shape_in[x.dim] or x.inner != 1:
                raise self.fail(node, "reshape of attention heads other than merging [heads, units] into one axis")
            return Feature(j, x.slot)
        lead = math.prod(shape_in[: x.dim])
        if lead not in prefix:
            raise self.fail(node, "reshape mixes the unit axis with the axes before it")
        j = prefix.index(lead)
        while j < len(shape_out) and shape_out[j] == 1 and shape_in[x.dim] != 1:
            j += 1
        width, end = shape_in[x.dim], x.dim + 1
        while width < shape_out[j] and end < len(shape_in):
            width *= shape_in[end]
            end += 1
        if width > shape_out[j] and x.inner == 1 and j + 1 < len(shape_out) and shape_out[j] * shape_out[j + 1] == width:
            return Feature(j + 1, x.slot, 1, j, self.slot_heads(node, x.slot, shape_out[j]))  # [E] -> [H, E/H]
        if width != shape_out[j]:
            raise self.fail(node, "reshape splits the unit axis")
        return Feature(j, x.slot, x.inner * math.prod(shape_in[x.dim + 1 : end]))

    def move(self, node: torch.fx.Node, x: Feature) -> Feature:
        if not x.live:
            return x
        ndim = _ndim(node)
        args = [a for a in node.args[1:]] or list(node.kwargs.values())
        order = list(range(ndim))
        if node.target in ("transpose", torch.transpose):
            i, j = (a % ndim for a in args[:2])
            order[i], order[j] = order[j], order[i]
        elif node.target in ("permute", torch.permute):
            dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
            order = [d % ndim for d in dims]
        else:  # movedim
            source, dest = args[0] % ndim, args[1] % ndim
            order.remove(source)
            order.insert(dest, source)
        dim, heads = (None if a is None else order.index(a) for a in (x.dim, x.heads))
        return Feature(dim, x.slot, x.inner, heads, x.tag)

    def reduce(self, node: torch.fx.Node, x: Feature) -> Feature:
        if x.heads is not None:
            raise self.fail(node, "reduction of a tensor split into attention heads is not supported")
        if x.dim is None:
            return x
        ndim = _ndim(node.args[0])
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        if dims is None:
            return Feature(None)
        dims = {d % ndim for d in ((dims,) if isinstance(dims, int) else dims)}
        if x.dim in dims:  # reduced over the units: invariant to their order
            return Feature(None)
        return Feature(x.dim if keep else x.dim - sum(d < x.dim for d in dims), x.slot, x.inner)

    def cat(self, node: torch.fx.Node) -> Feature:
        parts = node.args[0]
        ndim = _ndim(node)
        dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % ndim
        features = [self.state.get(p) for p in parts]
        if any(not isinstance(f, Feature) for f in features):
            raise self.fail(node, "concatenation of tensors the derivation did not follow")
        if any(f.heads is not None for f in features):
            raise self.fail(node, "concatenation of tensors split into attention heads is not supported")
        live = [f for f in features if f.dim is not None]
        if not live:
            return Feature(None)
        if any(f.dim == dim for f in live):
            raise self.fail(node, "concatenation along the unit axis")
        if len(live) < len(features) or any(f.dim != live[0].dim or f.inner != live[0].inner for f in live):
            self.union(live[0].slot, FIXED)
        for f in live[1:]:
            self.union(live[0].slot, f.slot)
        return live[0]

    def groups(self) -> tuple[dict[str, list[Axis]], dict[str, list[tuple[str, int, int]]], dict[str, Heads]]:
        """Group name -> its axes, group name -> the (fx node, axis, inner) of every activation it permutes, and
        attention module -> its Heads."""
        fixed = self.find(FIXED)
        axes: dict[int, list[Axis]] = {}
        for tensor, dim, slot, inner, start, stop in self.axes:
            if self.find(slot) != fixed:
                axes.setdefault(self.find(slot), []).append(Axis(tensor, dim, inner, start, stop))
        nodes: dict[int, list[tuple[str, int, int]]] = {}
        for name, feature in self.carriers:
            if self.find(feature.slot) in axes:
                nodes.setdefault(self.find(feature.slot), []).append((name, feature.dim, feature.inner))
        names = {root: self.opener[root] for root in axes}
        heads = {
            module: Heads((names[self.find(qk)], names[self.find(v)]), num_heads, move)
            for module, qk, v, num_heads, move in self.heads
        }
        tied: dict[int, list[int]] = {}  # head tag -> the groups split into its heads
        for root in sorted(axes):
            if root in self.slot_tag:
                tied.setdefault(self.find_tag(self.slot_tag[root]), []).append(root)
        for tag, roots in tied.items():
            fixed_units = self.find(FIXED) in self.slot_tag and self.find_tag(self.slot_tag[self.find(FIXED)]) == tag
            move = self.move_heads and tag not in self.tag_fixed and not fixed_units
            groups = tuple(names[r] for r in roots)
            key = _common_prefix(groups)
            heads[key if key not in heads else f"{key}#{tag}"] = Heads(groups, self.tag_heads[tag], move)
        head_groups = {g for tie in heads.values() for g in tie.groups}
        return (
            {names[r]: a for r, a in sorted(axes.items())},
            {names[r]: [] if names[r] in head_groups else nodes.get(r, []) for r in sorted(axes)},
            heads,
        )


class _ShapeRecorder(torch.fx.Interpreter):
    """Runs the graph on the example input and records, per node whose result holds tensors, that result with
    every tensor replaced by its shape as `node.meta["tensor_meta"]` (`.shape`). fx's own ShapeProp does the
    same but imports sympy (1.5 s, most of a process's first `weight_matching`)."""

    def run_node(self, n: torch.fx.Node) -> Any:
        result = super().run_node(n)
        found = False

        def shape_of(value: Any) -> Any:
            nonlocal found
            if not isinstance(value, Tensor):
                return value
            found = True
            return _Shape(value.shape)

        meta = torch.fx.node.map_aggregate(result, shape_of)
        if found:
            n.meta["tensor_meta"] = meta
        return result


@dataclass(frozen=True)
class _Shape:
    shape: torch.Size


def _tensor_meta(node: Any) -> Any:
    return node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None


def _shape(node: torch.fx.Node) -> tuple[int, ...]:
    return tuple(_tensor_meta(node).shape)


def _ndim(node: torch.fx.Node) -> int:
    return len(_shape(node))


def _root(parent: list[int], item: int) -> int:
    """The root of `item` in the union-find forest `parent` (halving the path on the way)."""
    while parent[item] != item:
        parent[item] = parent[parent[item]]
        item = parent[item]
    return item


def _aligned(x: Feature, offset: int) -> Feature:
    """`x` with its axes counted in a broadcast result with `offset` more leading axes."""
    dim, heads = (None if a is None else a + offset for a in (x.dim, x.heads))
    return Feature(dim, x.slot, x.inner, heads, x.tag)


def _common_prefix(names: Sequence[str]) -> str:
    """The dotted module path all `names` share ("blocks.0.attn" for "blocks.0.attn.q", "blocks.0.attn.v")."""
    parts = [name.split(".") for name in names]
    shared: list[str] = []
    for column in zip(*parts) if len(names) > 1 else [(p,) for p in parts[0][:-1]]:
        if len(set(column)) > 1:
            break
        shared.append(column[0])
    return ".".join(shared) or names[0]


def _tensors_in(args: Any, state: dict) -> list[Any]:
    leaves: list[Any] = []
    torch.fx.node.map_arg(args, lambda n: leaves.append(state.get(n)))
    return leaves


@dataclass
class Traced:
    """A model traced for Re-Basin: its spec, its fx GraphModule, and per group the activations it permutes."""

    spec: PermutationSpec
    graph_module: torch.fx.GraphModule
    activations: dict[str, list[tuple[str, int, int]]]


def trace(model: nn.Module, example_input: Tensor | Sequence[Tensor], move_heads: bool = True) -> Traced:
    """Trace a copy of `model` (eval mode, sharing its parameters) with torch.fx and derive its spec; SpecError
    names what fails."""
    args = as_args(example_input)
    # tracing runs the model: a copy keeps the caller's buffers and mode untouched; it shares the parameters (only
    # read; copying them cost a VGG of width 512 a third of the spec's time, and as much memory as the model)
    copied = copy.deepcopy(model, {id(p): p for p in model.parameters()}).eval()
    try:
        tracer = torch.fx.Tracer()
        tracer.proxy_buffer_attributes = True  # buffers read in forward (causal masks) become graph nodes
        gm = torch.fx.GraphModule(copied, tracer.trace(copied), type(model).__name__)
    except Exception as error:  # fx raises many kinds: data-dependent control flow, unsupported builtins, ...
        raise SpecError(f"torch.fx cannot trace {type(model).__name__}: {error}") from error
    with torch.no_grad():
        _ShapeRecorder(gm).run(*args)
    derivation = _Derivation(gm, move_heads)
    derivation.run()
    groups, activations, heads = derivation.groups()
    spec = PermutationSpec(groups, example_input=args, heads=heads)
    spec.sizes(model.state_dict())
    return Traced(spec, gm, activations)


def permutation_spec(
    model: nn.Module, example_input: Tensor | Sequence[Tensor], *, move_heads: bool = True
) -> PermutationSpec:
    """Derive the permutation spec of `model` by tracing it with torch.fx on `example_input`.

    Attention (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder) gets q/k and v groups
    per module whose units permute within each head; `move_heads=False` keeps the heads in place.
    Raises SpecError naming the fx node of the first construct it cannot handle, or when tracing fails.
    """
    return trace(model, example_input, move_heads).spec
