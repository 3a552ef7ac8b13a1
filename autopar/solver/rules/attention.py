"""Scaled dot-product attention over ``[batch, heads, seq, head_dim]``.

One-axis options: replicate, or shard batch or heads in q, k, v and the output alike (an
attention mask is sharded the same way where it has that dim, else replicated); or shard
the query sequence of q, the mask and the output with k and v replicated (each query row
attends to all keys), unless the op builds its own causal mask, which assumes the local
queries start at position 0. It runs on
each rank's local shards (as every op but views, see ``runtime.local_ops``), which matters
here: tracing on CPU picks a CPU-only attention kernel that DTensor has no rule for.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
from torch.distributed.tensor import Replicate, Shard

from autopar.solver.rules.base import Option, RuleFn, shape, tensor_args

aten = torch.ops.aten
R = Replicate()


def sdpa_options(node: fx.Node) -> list[Option]:
    ins = tensor_args(node)
    out = shape(node)
    options = [Option(R, (R,) * len(ins))]
    for d in (0, 1):
        placements = []
        for t in ins:
            s = shape(t)
            e = d - (len(out) - len(s))
            placements.append(Shard(e) if e >= 0 and s[e] == out[d] else R)
        options.append(Option(Shard(d), tuple(placements)))
    if not _is_causal(node):
        mask = [
            Shard(len(shape(t)) - 2) if len(shape(t)) >= 2 and shape(t)[-2] == out[2] else R for t in ins[3:]
        ]
        options.append(Option(Shard(2), (Shard(2), R, R, *mask)))
    return options


def _is_causal(node: fx.Node) -> bool:
    return bool(node.kwargs.get("is_causal", False) or (len(node.args) > 5 and node.args[5]))


def sdpa_flops(node: fx.Node) -> float:
    q, k = shape(node.args[0]), shape(node.args[1])
    causal = _is_causal(node)
    flops = 4.0 * math.prod(q[:-1]) * k[-2] * q[-1]
    return flops / 2 if causal else flops


OP = aten.scaled_dot_product_attention.default
RULES: dict[object, RuleFn] = {OP: sdpa_options}
FLOPS = {OP: sdpa_flops}
