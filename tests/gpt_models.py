"""Small GPT-style decoders written by hand with nn.Linear, LayerNorm and causal attention (Re-Basin tests)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CausalSelfAttention(nn.Module):
    """Causal multi-head self-attention: separate q/k/v Linears and scaled_dot_product_attention, or one fused
    qkv Linear split with `split` and an explicit masked softmax."""

    def __init__(self, dim: int, heads: int, length: int, fused: bool) -> None:
        super().__init__()
        self.heads, self.fused = heads, fused
        if fused:
            self.qkv = nn.Linear(dim, 3 * dim)
            self.register_buffer("mask", torch.tril(torch.ones(length, length)).view(1, 1, length, length))
        else:
            self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.size()
        if self.fused:
            q, k, v = self.qkv(x).split(C, dim=2)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        if self.fused:
            scores = (q @ k.transpose(-2, -1)) * (C // self.heads) ** -0.5
            scores = scores.masked_fill(self.mask[:, :, :T, :T] == 0, float("-inf"))
            y = F.softmax(scores, dim=-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).contiguous().view(B, T, C))


class DecoderBlock(nn.Module):
    """Pre-LN: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, dim: int, heads: int, length: int, fused: bool) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, length, fused)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Token + position embedding, pre-LN decoder blocks, final LayerNorm and a linear head on the last position.
    `root_positions`: the positions are an nn.Parameter of the root module instead of an nn.Embedding."""

    def __init__(
        self, vocab: int = 8, dim: int = 16, heads: int = 4, blocks: int = 2, length: int = 8, fused: bool = False,
        root_positions: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.root_positions = root_positions
        if root_positions:
            self.positions = nn.Parameter(0.1 * torch.randn(1, length, dim))
        else:
            self.positions = nn.Embedding(length, dim)
        self.blocks = nn.ModuleList(DecoderBlock(dim, heads, length, fused) for _ in range(blocks))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        T = idx.size(1)
        if self.root_positions:
            x = self.tokens(idx) + self.positions[:, :T]
        else:
            x = self.tokens(idx) + self.positions(torch.arange(T, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x)[:, -1])
