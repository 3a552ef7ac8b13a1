"""A GPT-style decoder: token and position embeddings, pre-norm blocks with causal
scaled-dot-product attention and a GELU MLP, a final norm and an untied LM head.

``gpt_config("gpt2")`` has GPT-2 small's dimensions (12 layers, 768 wide, 12 heads, 50257
tokens); ``gpt_config("gpt2-tiny")`` is a 2-layer model for CPU runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class GPTConfig:
    vocab: int = 256
    max_seq: int = 128
    hidden: int = 64
    heads: int = 4
    layers: int = 2
    dropout: float = 0.0
    qkv_bias: bool = True


_CONFIGS = {
    "gpt2-tiny": GPTConfig(),
    "gpt2": GPTConfig(vocab=50257, max_seq=1024, hidden=768, heads=12, layers=12),
}


def gpt_config(name: str) -> GPTConfig:
    return _CONFIGS[name]


class Attention(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.heads = c.heads
        self.q = nn.Linear(c.hidden, c.hidden, bias=c.qkv_bias)
        self.k = nn.Linear(c.hidden, c.hidden, bias=c.qkv_bias)
        self.v = nn.Linear(c.hidden, c.hidden, bias=c.qkv_bias)
        self.proj = nn.Linear(c.hidden, c.hidden)
        self.dropout = c.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, h, d // h).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(c.hidden)
        self.attn = Attention(c)
        self.ln2 = nn.LayerNorm(c.hidden)
        self.fc = nn.Linear(c.hidden, 4 * c.hidden)
        self.fc2 = nn.Linear(4 * c.hidden, c.hidden)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.fc2(F.gelu(self.fc(self.ln2(x)))))


class GPT(nn.Module):
    def __init__(self, c: GPTConfig | None = None) -> None:
        super().__init__()
        c = c or GPTConfig()
        self.config = c
        self.wte = nn.Embedding(c.vocab, c.hidden)
        self.wpe = nn.Embedding(c.max_seq, c.hidden)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.ln_f = nn.LayerNorm(c.hidden)
        self.head = nn.Linear(c.hidden, c.vocab, bias=False)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t = input_ids.shape
        pos = torch.arange(t, device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        loss = F.cross_entropy(logits.view(b * t, -1), labels.view(b * t))
        return logits, loss
