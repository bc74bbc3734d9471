"""nn.RNN, nn.GRU and nn.LSTM in a subspace view: all points in one pass.

For each layer and direction, the input products of the whole sequence are one combined product,

    gx[t, p] = x[t, p] @ W_ih(p)ᵀ + b_ih(p)                       (combined_linear over P points, all T steps)

and the recurrence runs once over the time steps for every point at once, with each point's own recurrent
weights (one batched product a step over [P, N, H] states):

    gh = h @ W_hh(p)ᵀ + b_hh(p)
    RNN:  h = tanh(gx + gh)  (or relu)
    GRU:  r, z = σ(gx_r + gh_r), σ(gx_z + gh_z);  n = tanh(gx_n + r ⊙ gh_n);  h = (1 − z) ⊙ n + z ⊙ h
    LSTM: i, f, o = σ(·), g = tanh(·) of gx + gh;  c = f ⊙ c + i ⊙ g;  h = o ⊙ tanh(c)

b_hh goes into gx wherever it adds alike (all of it but GRU's b_hn). Without gradients gx is laid out time-major
in contiguous parts (GRU: r and z | n), each step's product accumulates onto its part in one batched call, and
the gates take a few in-place element-wise passes. The input products are made for blocks of steps at a time
(BLOCK_BYTES of gx).

A first layer fed straight by the view's Embedding (x = E(p)[indices], evaluation only) gathers gx from each
point's table products instead: gx[t, p, n] = (E(p) W_ih(p)ᵀ + b)[indices[p, n, t]], V rows a point rather than
T·N (used where V ≤ T·N).

Every tanh is computed as tanh(a) = 2σ(2a) − 1 (torch's CPU sigmoid is about 6× faster than its tanh): the rows
of the tanh gate (TANH_GATE) in W_ih, W_hh, b_ih and b_hh are doubled, which is exact in floating point, so
that gate's pre-activation arrives doubled; LSTM's gates then take one sigmoid pass, and its tanh(c) doubles c.

Layers are stacked with dropout between them in train mode; a reverse direction reads the steps backwards.
Inputs are [P·N, T, I] (batch_first) or [T, P·N, I]; PackedSequence and unbatched inputs are refused (the view
then runs the whole model per point); `proj_size` is left to the vmap fallback.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .layers import SubspaceLayer
from .state import ViewState

GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "GRU": 3, "LSTM": 4}
TANH_GATE = {"RNN_TANH": 0, "GRU": 2, "LSTM": 2}  # the gate whose activation is tanh: GRU's n, LSTM's g
PARTS = {"RNN_TANH": (1,), "RNN_RELU": (1,), "GRU": (2, 1), "LSTM": (4,)}  # gates per part of gx (GRU: r z | n)
BLOCK_BYTES = 8 << 20


def supports_recurrent(module: nn.RNNBase) -> bool:
    return module.mode in GATES and module.proj_size == 0


class SubspaceRecurrent(SubspaceLayer):
    """Takes the arguments of nn.RNN / nn.GRU / nn.LSTM .forward and returns what they return; exposes their
    hyper-parameters (`batch_first`, `hidden_size`, `num_layers`, `bidirectional`, ...)."""

    def __init__(self, state: ViewState, stacked: dict[str, Tensor], module: nn.RNNBase):
        super().__init__(state, stacked)
        state.records_lookups = True  # a first layer fed straight by an Embedding gathers from its table
        self.mode, self.input_size, self.hidden_size = module.mode, module.input_size, module.hidden_size
        self.num_layers, self.bias, self.batch_first = module.num_layers, module.bias, module.batch_first
        self.dropout, self.bidirectional, self.proj_size = module.dropout, module.bidirectional, module.proj_size

    def forward(self, input: Tensor, hx: Tensor | tuple[Tensor, Tensor] | None = None):
        if not isinstance(input, Tensor) or input.dim() != 3:
            raise TypeError(f"the view's {self.mode} takes a batched tensor [batch, time, features] (no PackedSequence "
                            f"or unbatched input), got {type(input).__name__}"
                            + (f" of {input.dim()} dims" if isinstance(input, Tensor) else ""))
        points = self.state.points
        x = input if self.batch_first else input.transpose(0, 1)  # [P·N, T, I]
        rows, steps = x.shape[:2]
        samples = rows // points
        directions = 2 if self.bidirectional else 1
        h0, c0 = self._initial_states(hx, rows, directions)
        layer_input: Tensor = x  # then [T, P, N, D·H] between layers
        last_h, last_c = [], []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(directions):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                index = layer * directions + direction
                states, h, c = self._layer(layer_input, suffix, layer == 0, steps, samples, h0[index],
                                           None if c0 is None else c0[index], bool(direction))
                outputs.append(states)
                last_h.append(h)
                last_c.append(c)
            layer_input = outputs[0] if directions == 1 else torch.cat(outputs, dim=-1)
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
        out = layer_input  # [T, P, N, D·H]
        if self.batch_first:
            out = out.permute(1, 2, 0, 3).reshape(rows, steps, -1)
        else:
            out = out.reshape(steps, rows, -1)
        h_n = torch.stack(last_h).reshape(len(last_h), rows, self.hidden_size)
        if self.mode != "LSTM":
            return out, h_n
        return out, (h_n, torch.stack(last_c).reshape(len(last_c), rows, self.hidden_size))

    def _input_weights(self, suffix: str) -> tuple[Tensor, Tensor | None]:
        """W_ih [K, G·H, I] and the bias of gx [K, G·H]: b_ih plus b_hh where it adds to gx alike (GRU: its r and
        z parts); the tanh gate's rows doubled."""
        weight, bias = self._doubled("weight_ih" + suffix), self._doubled("bias_ih" + suffix)
        hidden_bias = self._doubled("bias_hh" + suffix)
        if hidden_bias is not None:
            if self.mode == "GRU":  # b_hn stays inside r ⊙ (h W_hnᵀ + b_hn)
                hidden_bias = torch.cat([hidden_bias[:, :2 * self.hidden_size],
                                         hidden_bias.new_zeros(hidden_bias.shape[0], self.hidden_size)], dim=1)
            bias = hidden_bias if bias is None else bias + hidden_bias
        return weight, bias

    def _input_products(self, x: Tensor, weights: tuple[Tensor, Tensor | None], first: bool, span: slice,
                        samples: int) -> Tensor:
        """gx [t, P, N, G·H] for the steps `span` (t of them; a strided view of [P, t, N, G·H]) of a layer input
        [P·N, T, I] (the first layer) or [T, P, N, F]. Rows are put in time-major order before the product (the
        input is the smaller tensor)."""
        state, points = self.state, self.state.points
        if first:
            shared = state.shared_rows(x)
            if shared is not None:  # [t·N, I] once for all points
                rows = shared[1][:, span].transpose(0, 1).reshape(-1, x.shape[-1])
            else:
                rows = x.reshape(points, samples, x.shape[1], -1)[:, :, span]
                rows = rows.transpose(1, 2).reshape(points, -1, x.shape[-1])
        else:
            rows = x[span].transpose(0, 1).reshape(points, -1, x.shape[-1])  # [P, t·N, F]
        gx = ops.combined_linear(rows, *weights, state.coeffs)  # [P, t·N, G·H]
        return gx.reshape(points, -1, samples, gx.shape[-1]).transpose(0, 1)

    def _table_products(self, x: Tensor, weights: tuple[Tensor, Tensor | None], steps: int, samples: int
                        ) -> tuple[list[Tensor], Tensor] | None:
        """For a first layer fed straight by the view's Embedding (x = E(p)[indices]): the input products of every
        row of each point's table, E(p) W_ih(p)ᵀ + b [P·V, G·H] (in `PARTS`), and the row each (step, point,
        sample) reads [T, P, N]; gx is then gathered, not multiplied. None where x is no such lookup, or the table has more
        rows than a point's sequence (the direct product is then cheaper)."""
        state, points = self.state, self.state.points
        lookup = state.lookup_of(x)
        if lookup is None or lookup.indices.shape != (points * samples, steps) or lookup.table.shape[1] > steps * samples:
            return None
        rows = lookup.table.shape[1]
        tables = ops.mix(state.coeffs, lookup.table)  # [P, V, I]
        products = ops.combined_linear(tables, *weights, state.coeffs).reshape(points * rows, -1)
        shared = state.shared_rows(lookup.indices)
        indices = shared[1].unsqueeze(0) if shared is not None else lookup.indices.reshape(points, samples, steps)
        offsets = torch.arange(0, points * rows, rows, device=indices.device).reshape(1, points, 1)
        return [part.contiguous() for part in self._parts(products)], indices.permute(2, 0, 1) + offsets

    def _layer(self, x: Tensor, suffix: str, first: bool, steps: int, samples: int, h: Tensor, c: Tensor | None,
               reverse: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        """Runs the steps of one layer and direction: (states [T, P, N, H], last h, last c). The input products
        are made for blocks of steps whose gx stays under BLOCK_BYTES (on CPU: in the cache, and not fresh pages
        each time). Without gradients gx is time-major in contiguous `PARTS`, one block's worth of memory reused
        block after block, and the states are written straight into their [T, ...] tensor."""
        coeffs, H = self.state.coeffs, self.hidden_size
        weight = ops.mix(coeffs, self._doubled("weight_hh" + suffix)).transpose(1, 2)  # [P, H, G·H]
        b_hn = None
        if self.mode == "GRU" and "bias_hh" + suffix in self.stacked:
            b_hn = ops.mix(coeffs, self._doubled("bias_hh" + suffix)[:, 2 * H:]).unsqueeze(1)  # [P, 1, H]
        recorded = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or h.requires_grad
                                                or any(t.requires_grad for t in self.stacked.values()))
        weights = self._input_weights(suffix)
        per_step = h.numel() * GATES[self.mode] * h.element_size()
        span = min(steps, steps if h.device.type != "cpu" else max(1, BLOCK_BYTES // per_step))
        blocks = [(start, min(steps, start + span)) for start in range(0, steps, span)]
        if reverse:
            blocks.reverse()
        if recorded:
            recorded_states = [h] * steps
            for start, stop in blocks:
                gx = self._input_products(x, weights, first, slice(start, stop), samples)
                for t in _steps(start, stop, reverse):
                    h, c = self._recorded_step(gx[t - start], h, c, weight, b_hn)
                    recorded_states[t] = h
            return torch.stack(recorded_states), h, c
        states = h.new_empty(steps, *h.shape)
        outputs, weight_parts = states.unbind(0), self._parts(weight)
        gx_parts = [h.new_empty(span, *h.shape[:2], part.shape[-1]) for part in weight_parts]  # reused block after block
        buffers = h.new_empty(2 if self.mode == "LSTM" else 1, *h.shape).unbind(0)  # GRU's h W_nᵀ; LSTM's c
        table = None if not first or self.state.plain else self._table_products(x, weights, steps, samples)
        for start, stop in blocks:
            if table is not None:  # gathered
                rows = table[1][start:stop].flatten()
                for gx_part, part in zip(gx_parts, table[0]):
                    torch.index_select(part, 0, rows, out=gx_part[:stop - start].view(-1, part.shape[-1]))
            else:
                gx = self._input_products(x, weights, first, slice(start, stop), samples)
                for gx_part, part in zip(gx_parts, self._parts(gx)):
                    gx_part[:stop - start].copy_(part)
            gates = list(zip(*(gx_part[:stop - start].unbind(0) for gx_part in gx_parts)))  # [t][part]
            for t in _steps(start, stop, reverse):
                h, c = self._step(gates[t - start], h, c, weight_parts, b_hn, outputs[t], buffers[t % len(buffers)])
        return states, h, c

    def _parts(self, gates: Tensor) -> list[Tensor]:
        """Views of the gates (last axis G·H) split as `PARTS`."""
        sizes = [count * self.hidden_size for count in PARTS[self.mode]]
        return list(gates.split(sizes, dim=-1)) if len(sizes) > 1 else [gates]

    def _doubled(self, name: str) -> Tensor | None:
        """The stacked tensor `name` [K, G·H, ...] with the rows of the tanh gate doubled (None if absent)."""
        tensor, gate = self.stacked.get(name), TANH_GATE.get(self.mode)
        if tensor is None or gate is None:
            return tensor
        scale = tensor.new_ones(tensor.shape[1])
        scale[gate * self.hidden_size:(gate + 1) * self.hidden_size] = 2
        return tensor * scale.reshape(-1, *[1] * (tensor.dim() - 2))

    def _step(self, g: tuple[Tensor, ...], h: Tensor, c: Tensor | None, weight: list[Tensor], b_hn: Tensor | None,
              out: Tensor, scratch: Tensor) -> tuple[Tensor, Tensor | None]:
        """One step for all points, every pass in place: g = gx[t] as contiguous `PARTS` [P, N, ·] (tanh gate
        doubled; overwritten), h [P, N, H], weight [P, H, G·H] as `PARTS`; the new h is written to `out`, GRU's
        h W_nᵀ or LSTM's new c to `scratch` [P, N, H] (neither h nor c). Each product accumulates onto its
        contiguous part of g in one batched call (into a slice of a wider tensor it would fall back to one call
        per point, at 2 threads a thread hand-off each)."""
        if self.mode == "GRU":
            (g_rz, g_n), (w_rz, w_n) = g, weight
            r, z = g_rz.baddbmm_(h, w_rz).sigmoid_().chunk(2, dim=-1)
            hn = torch.bmm(h, w_n, out=scratch)
            n = _tanh_from_sigmoid_(g_n.addcmul_(r, hn if b_hn is None else hn.add_(b_hn)).sigmoid_())
            return torch.lerp(n, h, z, out=out), None
        gates = g[0].baddbmm_(h, weight[0])  # b_hh is in g already
        if self.mode == "LSTM":
            i, f, cell, o = gates.sigmoid_().chunk(4, dim=-1)
            c = torch.mul(f, c, out=scratch).addcmul_(i, _tanh_from_sigmoid_(cell))
            return _tanh_from_sigmoid_(torch.mul(c, 2, out=out).sigmoid_()).mul_(o), c
        if self.mode == "RNN_TANH":
            return _tanh_from_sigmoid_(torch.sigmoid(gates, out=out)), None
        return torch.clamp_min(gates, 0, out=out), None

    def _recorded_step(self, g: Tensor, h: Tensor, c: Tensor | None, weight: Tensor, b_hn: Tensor | None
                       ) -> tuple[Tensor, Tensor | None]:
        """`_step` out of place, for autograd: g = gx[t] [P, N, G·H], weight [P, H, G·H]; returns the new h (and c)."""
        H = self.hidden_size
        if self.mode == "GRU":
            r, z = torch.baddbmm(g[..., :2 * H], h, weight[..., :2 * H]).sigmoid().chunk(2, dim=-1)
            hn = torch.bmm(h, weight[..., 2 * H:]) if b_hn is None else torch.baddbmm(b_hn, h, weight[..., 2 * H:])
            n = 2 * torch.addcmul(g[..., 2 * H:], r, hn).sigmoid() - 1
            return torch.lerp(n, h, z), None
        gates = torch.baddbmm(g, h, weight)
        if self.mode == "LSTM":
            i, f, cell, o = gates.sigmoid().chunk(4, dim=-1)
            c = torch.addcmul(f * c, i, 2 * cell - 1)
            return o * (2 * torch.sigmoid(2 * c) - 1), c
        if self.mode == "RNN_TANH":
            return 2 * gates.sigmoid() - 1, None
        return gates.relu(), None

    def _initial_states(self, hx: Tensor | tuple[Tensor, Tensor] | None, rows: int, directions: int
                        ) -> tuple[Tensor, Tensor | None]:
        """h0 (and c0 for LSTM) as [layers·directions, P, N, H]: zeros, or the given ones (folded over points, or
        given once for the samples of one point)."""
        points, count = self.state.points, self.num_layers * directions
        shape = (count, points, rows // points, self.hidden_size)
        dtype, device = self.stacked["weight_hh_l0"].dtype, self.stacked["weight_hh_l0"].device
        if hx is None:
            zeros = torch.zeros(shape, dtype=dtype, device=device)
            return zeros, (zeros if self.mode == "LSTM" else None)
        given = hx if isinstance(hx, (tuple, list)) else (hx,)
        expanded = []
        for state in given:
            if state.dim() != 3 or state.shape[0] != count or state.shape[1] not in (rows, rows // points):
                raise ValueError(f"the view's {self.mode} takes initial states [{count}, batch, {self.hidden_size}], "
                                 f"got {tuple(state.shape)}")
            expanded.append(state.reshape(shape) if state.shape[1] == rows else state.unsqueeze(1).expand(shape))
        return expanded[0], (expanded[1] if self.mode == "LSTM" else None)


def _steps(start: int, stop: int, reverse: bool) -> range:
    return range(stop - 1, start - 1, -1) if reverse else range(start, stop)


def _tanh_from_sigmoid_(s: Tensor) -> Tensor:
    """tanh(a) = 2σ(2a) − 1 in place, given s = σ(2a) (one pass)."""
    return torch.add(s.new_full((), -1.0), s, alpha=2, out=s)
