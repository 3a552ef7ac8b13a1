"""A DLRM-style recommender: dense features through a bottom MLP, one lookup in each of many
embedding tables, pairwise dot interaction of all the vectors, a top MLP, a click logit.

The tables are one parameter ``tables`` of shape ``[tables, rows, dim]`` and the lookup is a
``gather`` on its row dim, so each of the three classic layouts is a placement of that one
tensor: table-wise ``Shard(0)``, row-wise ``Shard(1)`` (masked lookup, partial sums) and
column-wise ``Shard(2)``; sharding the indices is data parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class DLRMConfig:
    tables: int = 4
    rows: int = 64
    dim: int = 8
    dense: int = 13
    bottom: tuple[int, ...] = (16,)
    top: tuple[int, ...] = (16,)


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers)


class DLRM(nn.Module):
    def __init__(self, c: DLRMConfig) -> None:
        super().__init__()
        self.config = c
        self.bottom = _mlp([c.dense, *c.bottom, c.dim])
        self.tables = nn.Parameter(torch.randn(c.tables, c.rows, c.dim) * c.dim**-0.5)
        n = c.tables + 1
        self.register_buffer("pairs", torch.triu_indices(n, n, offset=1), persistent=False)
        self.top = _mlp([c.dim + n * (n - 1) // 2, *c.top])
        self.logit = nn.Linear(c.top[-1], 1)

    @staticmethod
    def example_inputs(c: DLRMConfig, batch: int) -> dict[str, torch.Tensor]:
        return {
            "dense": torch.randn(batch, c.dense),
            "sparse": torch.randint(0, c.rows, (batch, c.tables)),
            "labels": torch.randint(0, 2, (batch,)).float(),
        }

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor, labels: torch.Tensor):
        b = dense.shape[0]
        x = self.bottom(dense)  # [B, D]
        t, d = self.config.tables, self.config.dim
        ids = sparse.t().unsqueeze(-1).expand(t, b, d)  # [T, B, D]
        emb = self.tables.gather(1, ids).transpose(0, 1)  # [B, T, D]
        vecs = torch.cat((x.unsqueeze(1), emb), dim=1)  # [B, T+1, D]
        dots = torch.bmm(vecs, vecs.transpose(1, 2))  # [B, T+1, T+1]
        inter = dots[:, self.pairs[0], self.pairs[1]]  # [B, pairs]
        logits = self.logit(self.top(torch.cat((x, inter), dim=1))).squeeze(1)
        return F.binary_cross_entropy_with_logits(logits, labels), logits
