"""Embedding lookup ``embedding(weight[V, D], indices[...]) -> [..., D]``.

One-axis options: replicate; shard the indices (the output is sharded the same way, the
table replicated); shard the table's hidden dim D (the output is sharded on its last dim,
the indices replicated).
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.distributed.tensor import Replicate, Shard

from autopar.solver.rules.base import Option, RuleFn, shape

aten = torch.ops.aten
R = Replicate()


def embedding_options(node: fx.Node) -> list[Option]:
    n_idx = len(shape(node.args[1]))
    options = [Option(R, (R, R)), Option(Shard(n_idx), (Shard(1), R))]
    options += [Option(Shard(d), (R, Shard(d))) for d in range(n_idx)]
    return options


RULES: dict[object, RuleFn] = {aten.embedding.default: embedding_options}
FLOPS = {aten.embedding.default: lambda node: 0.0}
