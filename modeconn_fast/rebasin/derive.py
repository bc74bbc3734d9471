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
    group and a v group whose units permute within each head, heads moving as blocks (spec.Heads).
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
from torch.fx.passes.shape_prop import ShapeProp

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


@dataclass(frozen=True)
class Feature:
    """A tensor whose axis `dim` carries units of slot `slot`, each a block of `inner` entries; dim None: none."""

    dim: int | None
    slot: int = FIXED
    inner: int = 1


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

    # union-find over slots; FIXED is its own class
    def new_slot(self, opener: str) -> int:
        self.parent.append(len(self.parent))
        self.opener.append(opener)
        return len(self.parent) - 1

    def find(self, slot: int) -> int:
        while self.parent[slot] != slot:
            self.parent[slot] = self.parent[self.parent[slot]]
            slot = self.parent[slot]
        return slot

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # the older slot (FIXED first) stays root, so groups are named after their first opener
            self.parent[max(ra, rb)] = min(ra, rb)

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
            elif node.op == "get_attr":
                self.state[node] = ("param", node.target)
            elif node.op == "call_module":
                self.state[node] = self.module(node, self.gm.get_submodule(node.target))
            else:
                self.state[node] = self.function(node)
            value = self.state.get(node)
            if isinstance(value, Feature) and value.dim is not None and node.op != "output":
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
        if target in _BINARY:
            return self.binary(node)
        if target in _ELEMENTWISE_FUNCTIONS or (node.op == "call_method" and target in _ELEMENTWISE_METHODS):
            return self.input(node)
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
            (features if isinstance(value, Feature) else others).append((arg, value))
        live = [(arg, f) for arg, f in features if f.dim is not None]
        if not live:
            return Feature(None)
        arg0, first = live[0]
        dim = first.dim + out_ndim - _ndim(arg0)
        for arg, f in live[1:]:
            if f.dim + out_ndim - _ndim(arg) != dim or f.inner != first.inner:
                raise self.fail(node, "operands carry units on different axes")
            self.union(first.slot, f.slot)
        for arg, value in features + others:
            if not isinstance(arg, torch.fx.Node) or (isinstance(value, Feature) and value.dim is not None):
                continue
            shape = _shape(arg)
            local = dim - (out_ndim - len(shape))
            if local < 0 or shape[local] == 1:
                continue  # broadcast along the units: invariant
            if isinstance(value, tuple) and value[0] == "param":  # a parameter added per unit, e.g. a bias
                self.claim(value[1], local, first)
            else:  # a fixed tensor (e.g. the input) meets permuted units: they cannot be permuted
                self.union(first.slot, FIXED)
        return Feature(dim, first.slot, first.inner)

    def reshape(self, node: torch.fx.Node, x: Feature) -> Feature:
        if x.dim is None:
            return x
        shape_in, shape_out = _shape(node.args[0]), _shape(node)
        lead = math.prod(shape_in[: x.dim])
        prefix = [math.prod(shape_out[:j]) for j in range(len(shape_out) + 1)]
        if lead not in prefix:
            raise self.fail(node, "reshape mixes the unit axis with the axes before it")
        j = prefix.index(lead)
        while j < len(shape_out) and shape_out[j] == 1 and shape_in[x.dim] != 1:
            j += 1
        width, end = shape_in[x.dim], x.dim + 1
        while width < shape_out[j] and end < len(shape_in):
            width *= shape_in[end]
            end += 1
        if width != shape_out[j]:
            raise self.fail(node, "reshape splits the unit axis")
        return Feature(j, x.slot, x.inner * math.prod(shape_in[x.dim + 1 : end]))

    def move(self, node: torch.fx.Node, x: Feature) -> Feature:
        if x.dim is None:
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
        return Feature(order.index(x.dim), x.slot, x.inner)

    def reduce(self, node: torch.fx.Node, x: Feature) -> Feature:
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
        return (
            {names[r]: a for r, a in sorted(axes.items())},
            {names[r]: nodes.get(r, []) for r in sorted(axes)},
            heads,
        )


def _tensor_meta(node: Any) -> Any:
    return node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None


def _shape(node: torch.fx.Node) -> tuple[int, ...]:
    return tuple(_tensor_meta(node).shape)


def _ndim(node: torch.fx.Node) -> int:
    return len(_shape(node))


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
    """Trace a copy of `model` (eval mode) with torch.fx and derive its spec; SpecError names what fails."""
    args = as_args(example_input)
    copied = copy.deepcopy(model).eval()  # tracing runs the model: keep the caller's buffers untouched
    try:
        gm = torch.fx.symbolic_trace(copied)
    except Exception as error:  # fx raises many kinds: data-dependent control flow, unsupported builtins, ...
        raise SpecError(f"torch.fx cannot trace {type(model).__name__}: {error}") from error
    with torch.no_grad():
        ShapeProp(gm).propagate(*args)
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
