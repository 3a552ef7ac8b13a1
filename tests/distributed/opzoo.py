"""Small models whose exported graphs hold every op family's ops, for the rule tests, and
the zoo's tiny models."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from autopar.models import GPT, MLP, GPTConfig, zoo


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


def zoo_tiny() -> dict[str, tuple[nn.Module, dict[str, torch.Tensor]]]:
    """Every zoo family at its tiny size, one model per distinct tiny config."""
    torch.manual_seed(0)
    out, seen = {}, []
    for name in zoo.names():
        entry = zoo.ZOO[name]
        key = (entry.family, entry.tiny)
        if key in seen:
            continue
        seen.append(key)
        model, inputs = zoo.build(name, "tiny", batch=4, seq=8)
        if "labels" in inputs and inputs["labels"].dim() == 2:
            # padding in the first sequence only: batch shards count different numbers of targets
            inputs["labels"][0, :5] = -100
        out[name] = (model, inputs)
    return out


def models() -> dict[str, tuple[nn.Module, dict[str, torch.Tensor]]]:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab=64, max_seq=16, hidden=32, heads=4, layers=1)
    ids = torch.randint(0, 64, (4, 8))
    return {
        "mlp": (MLP(32, 64), {"x": torch.randn(8, 32), "target": torch.randn(8, 32)}),
        "gpt": (GPT(cfg), {"input_ids": ids, "labels": torch.randint(0, 64, (4, 8))}),
        "opzoo": (OpZoo(), {"x": torch.randn(8, 8), "y": torch.randn(4, 8, 8)}),
        **zoo_tiny(),
    }
