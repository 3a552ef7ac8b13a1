"""Small models whose exported graphs hold every op family's ops, for the rule tests."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from autopar.models import GPT, MLP, GPTConfig


class OpZoo(nn.Module):
    """mm / bmm / addmm / matmul, reductions, softmax, elementwise, view ops and a fallback op."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 12))
        self.b = nn.Parameter(torch.randn(12))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a = torch.mm(x, self.w)  # [8, 12]
        a = torch.addmm(self.b, x, self.w) + a
        c = torch.bmm(y, y.transpose(1, 2))  # [4, 8, 8]
        d = torch.matmul(y, x)  # [4, 8, 8]
        e = torch.softmax(c, dim=-1) * F.log_softmax(d, dim=1)
        f = e.permute(0, 2, 1).sum(dim=2) - e.mean(dim=1)  # [4, 8]
        g = f.unsqueeze(2).expand(4, 8, 12) * torch.relu(a)
        h = torch.div(g, 2.0) - torch.tanh(g) * torch.exp(-g.abs())
        k = torch.cumsum(f, dim=1) + torch.erfinv(torch.tanh(f) * 0.5)  # erfinv: no rule, replicated
        return h.sum() + a.t().mean() + torch.sigmoid(f).sum(dim=[0, 1]) + k.sum()


def hf_models() -> dict[str, tuple[nn.Module, dict[str, torch.Tensor]]]:
    """Tiny HuggingFace GPT-2 (fused qkv, tied head) and LLaMA (RMSNorm, rotary, GQA, SwiGLU)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(
            n_layer=1,
            n_embd=32,
            n_head=4,
            vocab_size=64,
            n_positions=16,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
    )
    llama = LlamaForCausalLM(
        LlamaConfig(
            num_hidden_layers=1,
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            vocab_size=64,
            bos_token_id=0,
            eos_token_id=0,
        )
    )
    ids = torch.randint(0, 64, (4, 8))
    return {
        "hf-gpt2": (gpt2, {"input_ids": ids, "labels": ids.clone()}),
        "hf-llama": (llama, {"input_ids": ids, "labels": ids.clone()}),
    }


def models() -> dict[str, tuple[nn.Module, dict[str, torch.Tensor]]]:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab=64, max_seq=16, hidden=32, heads=4, layers=1)
    ids = torch.randint(0, 64, (4, 8))
    return {
        "mlp": (MLP(32, 64), {"x": torch.randn(8, 32), "target": torch.randn(8, 32)}),
        "gpt": (GPT(cfg), {"input_ids": ids, "labels": torch.randint(0, 64, (4, 8))}),
        "opzoo": (OpZoo(), {"x": torch.randn(8, 8), "y": torch.randn(4, 8, 8)}),
        **hf_models(),
    }
