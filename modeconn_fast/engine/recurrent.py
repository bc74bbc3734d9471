"""nn.RNN, nn.GRU and nn.LSTM in a subspace view: all points in one pass.

For each layer and direction, the input products of the whole sequence are one combined product,

    gx[t, p] = x[t, p] @ W_ih(p)ᵀ + b_ih(p)                       (combined_linear over P points, all T steps)

and the recurrence runs once over the time steps for every point at once, with each point's own recurrent
weights (one batched product a step over [P, N, H] states):

    gh = h @ W_hh(p)ᵀ + b_hh(p)
    RNN:  h = tanh(gx + gh)  (or relu)
    GRU:  r, z = σ(gx_r + gh_r), σ(gx_z + gh_z);  n = tanh(gx_n + r ⊙ gh_n);  h = (1 − z) ⊙ n + z ⊙ h
    LSTM: i, f, o = σ(·), g = tanh(·) of gx + gh;  c = f ⊙ c + i ⊙ g;  h = o ⊙ tanh(c)

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


def supports_recurrent(module: nn.RNNBase) -> bool:
    return module.mode in GATES and module.proj_size == 0


class SubspaceRecurrent(SubspaceLayer):
    """Takes the arguments of nn.RNN / nn.GRU / nn.LSTM .forward and returns what they return; exposes their
    hyper-parameters (`batch_first`, `hidden_size`, `num_layers`, `bidirectional`, ...)."""

    def __init__(self, state: ViewState, stacked: dict[str, Tensor], module: nn.RNNBase):
        super().__init__(state, stacked)
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
                gx = self._input_products(layer_input, suffix, layer == 0, steps, samples)
                states, h, c = self._recur(gx, suffix, h0[index], None if c0 is None else c0[index], bool(direction))
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

    def _input_products(self, x: Tensor, suffix: str, first: bool, steps: int, samples: int) -> Tensor:
        """gx [T, P, N, G·H] (a strided view of [P, T, N, G·H]) for a layer input [P·N, T, I] (the first layer)
        or [T, P, N, F]. Rows are put in time-major order before the product (the input is the smaller tensor)."""
        state, points = self.state, self.state.points
        weight, bias = self.stacked["weight_ih" + suffix], self.stacked.get("bias_ih" + suffix)
        if self.mode != "GRU" and "bias_hh" + suffix in self.stacked:  # b_hh adds to gx alike: one addition here
            hidden_bias = self.stacked["bias_hh" + suffix]
            bias = hidden_bias if bias is None else bias + hidden_bias
        if first:
            shared = state.shared_rows(x)
            if shared is not None:  # [T·N, I] once for all points
                rows = shared[1].transpose(0, 1).reshape(-1, x.shape[-1])
            else:
                rows = x.reshape(points, samples, steps, -1).transpose(1, 2).reshape(points, -1, x.shape[-1])
        else:
            rows = x.transpose(0, 1).reshape(points, -1, x.shape[-1])  # [P, T·N, F]
        gx = ops.combined_linear(rows, weight, bias, state.coeffs)  # [P, T·N, G·H]
        return gx.reshape(points, steps, samples, -1).transpose(0, 1)

    def _recur(self, gx: Tensor, suffix: str, h: Tensor, c: Tensor | None, reverse: bool
               ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Runs the steps of one layer and direction: (states [T, P, N, H], last h, last c). Without gradients the
        states are written straight into their [T, ...] tensor."""
        coeffs, H = self.state.coeffs, self.hidden_size
        weight = ops.mix(coeffs, self.stacked["weight_hh" + suffix]).transpose(1, 2)  # [P, H, G·H]
        hidden_bias = self.mixed("bias_hh" + suffix) if self.mode == "GRU" else None  # others: in gx already
        in_place = not (torch.is_grad_enabled() and (gx.requires_grad or weight.requires_grad or h.requires_grad))
        states = h.new_empty(gx.shape[0], *h.shape) if in_place else []
        for t in (range(gx.shape[0] - 1, -1, -1) if reverse else range(gx.shape[0])):
            gh = torch.bmm(h, weight)
            g = gx[t]
            if self.mode == "GRU":  # b_hh stays inside r ⊙ (h W_hnᵀ + b_hn)
                gh = gh + hidden_bias.unsqueeze(1)
                r, z = torch.sigmoid(g[..., :2 * H] + gh[..., :2 * H]).chunk(2, dim=-1)
                n = torch.tanh(torch.addcmul(g[..., 2 * H:], r, gh[..., 2 * H:]))
                h = torch.addcmul(n, z, h - n, out=states[t]) if in_place else torch.addcmul(n, z, h - n)
            elif self.mode == "LSTM":
                gates = g + gh
                i, f = torch.sigmoid(gates[..., :2 * H]).chunk(2, dim=-1)
                o = torch.sigmoid(gates[..., 3 * H:])
                c = torch.addcmul(f * c, i, torch.tanh(gates[..., 2 * H:3 * H]))
                h = torch.mul(o, torch.tanh(c), out=states[t]) if in_place else o * torch.tanh(c)
            elif in_place:
                h = torch.add(g, gh, out=states[t])
                h = h.tanh_() if self.mode == "RNN_TANH" else h.relu_()
            else:
                h = torch.tanh(g + gh) if self.mode == "RNN_TANH" else torch.relu(g + gh)
            if not in_place:
                states.append(h)
        if not in_place:
            states = torch.stack(states[::-1] if reverse else states)
        return states, h, c

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
