"""A PaLM-style decoder: each block computes attention and a SwiGLU MLP in parallel from one
layer norm (``x + attn(ln(x)) + mlp(ln(x))``); multi-query attention (one shared key/value
head), rotary position embeddings, no biases, and an input embedding tied to the LM head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class PaLMConfig:
    layers: int = 2
    hidden: int = 32
    heads: int = 4
    ffn: int = 64
    vocab: int = 96
    rope_base: float = 10000.0


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-b, a), dim=-1) * sin


class ParallelBlock(nn.Module):
    def __init__(self, c: PaLMConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = c.heads, c.hidden // c.heads
        self.norm = nn.LayerNorm(c.hidden, bias=False)
        self.q = nn.Linear(c.hidden, c.hidden, bias=False)
        self.kv = nn.Linear(c.hidden, 2 * self.head_dim, bias=False)  # one key and one value head
        self.out = nn.Linear(c.hidden, c.hidden, bias=False)
        self.gate = nn.Linear(c.hidden, c.ffn, bias=False)
        self.up = nn.Linear(c.hidden, c.ffn, bias=False)
        self.down = nn.Linear(c.ffn, c.hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        y = self.norm(x)
        q = self.q(y).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(y).view(b, 1, t, 2 * self.head_dim).chunk(2, dim=-1)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        k, v = k.expand(b, self.heads, t, self.head_dim), v.expand(b, self.heads, t, self.head_dim)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        attn = self.out(a.transpose(1, 2).reshape(b, t, h))
        mlp = self.down(F.silu(self.gate(y)) * self.up(y))
        return x + attn + mlp


class PaLM(nn.Module):
    def __init__(self, c: PaLMConfig) -> None:
        super().__init__()
        self.config = c
        self.embed = nn.Embedding(c.vocab, c.hidden)
        self.blocks = nn.ModuleList(ParallelBlock(c) for _ in range(c.layers))
        self.norm = nn.LayerNorm(c.hidden, bias=False)
        self.head = nn.Linear(c.hidden, c.vocab, bias=False)
        self.head.weight = self.embed.weight
        half = c.hidden // c.heads // 2
        self.register_buffer("inv_freq", c.rope_base ** (-torch.arange(half, dtype=torch.float32) / half))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = input_ids.shape[1]
        angles = torch.arange(t, dtype=torch.float32, device=input_ids.device)[:, None] * self.inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos(), angles.sin()
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.head(self.norm(x))
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return loss, logits
