"""Lookups: ``embedding``, ``gather``, advanced indexing (``index.Tensor``) and ``one_hot``.

One-axis options (all run on local shards, see ``runtime.local_ops``):

- replicate;
- shard the indices along one of their dims: the output is sharded the same way, the table
  replicated (data parallel lookups; for ``gather`` only along the gathered dim, since its
  other index dims are positions in the table);
- shard a dim of the table that is not looked up: the output is sharded on the matching dim
  (column-wise embedding; table-wise and column-wise ``gather``);
- shard the table along the looked-up dim (``embedding`` and ``gather``): each rank looks up
  the indices in its rows and the output is a partial sum (row-wise / vocab-parallel).
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.distributed.tensor import Partial, Replicate, Shard

from autopar.solver.rules.base import Option, RuleFn, shape

aten = torch.ops.aten
R = Replicate()
P = Partial()


def embedding_options(node: fx.Node) -> list[Option]:
    n_idx = len(shape(node.args[1]))
    options = [Option(R, (R, R)), Option(Shard(n_idx), (Shard(1), R)), Option(P, (Shard(0), R))]
    options += [Option(Shard(d), (R, Shard(d))) for d in range(n_idx)]
    return options


def gather_options(node: fx.Node) -> list[Option]:
    table, index = shape(node.args[0]), shape(node.args[2])
    dim = node.args[1] % len(table)
    options = [Option(R, (R, R)), Option(P, (Shard(dim), R)), Option(Shard(dim), (R, Shard(dim)))]
    # along other dims, index positions are table positions: shard both alike
    options += [
        Option(Shard(d), (Shard(d), Shard(d))) for d in range(len(index)) if d != dim and table[d] == index[d]
    ]
    return options


def index_options(node: fx.Node) -> list[Option]:
    """``self[indices]`` with a list of index tensors (``None`` for a dim taken whole)."""
    self_shape, out = shape(node.args[0]), shape(node)
    indices = list(node.args[1])
    used = [i for i, t in enumerate(indices) if t is not None]
    adjacent = used == list(range(used[0], used[-1] + 1))
    n_b = len(out) - (len(self_shape) - len(used))  # rank of the broadcast index shape
    first = used[0] if adjacent else 0  # where the broadcast dims land in the output
    idx_nodes = [t for t in indices if t is not None]
    options = [Option(R, (R,) * (1 + len(idx_nodes)))]
    out_dim = 0
    for d in range(len(self_shape)):  # dims taken whole keep their order around the block
        if out_dim == first:
            out_dim += n_b
        if d in used:
            continue
        options.append(Option(Shard(out_dim), (Shard(d),) + (R,) * len(idx_nodes)))
        out_dim += 1
    for b in range(n_b):
        size = out[first + b]
        placements = []
        for t in idx_nodes:
            s = shape(t)
            e = b - (n_b - len(s))
            placements.append(Shard(e) if e >= 0 and s[e] == size else R)
        options.append(Option(Shard(first + b), (R, *placements)))
    return options


def one_hot_options(node: fx.Node) -> list[Option]:
    return [Option(R, (R,))] + [Option(Shard(d), (Shard(d),)) for d in range(len(shape(node.args[0])))]


OPS = (aten.embedding.default, aten.gather.default, aten.index.Tensor, aten.one_hot.default)
RULES: dict[object, RuleFn] = dict(
    zip(OPS, (embedding_options, gather_options, index_options, one_hot_options))
)
FLOPS = {op: (lambda node: 0.0) for op in OPS}
