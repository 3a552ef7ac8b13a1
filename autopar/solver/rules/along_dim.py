"""Ops that mix values along some dims and act independently along the others:
``cumsum``, ``diff``, ``cat``, ``pad``, ``flip``, and ``topk`` / ``sort`` (two outputs, both
laid out alike).

One-axis options: replicate, or shard any dim the op does not mix, in the output and in every
tensor input that has that dim at full size (a broadcast-size input stays replicated).
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.distributed.tensor import Replicate, Shard

from autopar.solver.rules.base import Option, RuleFn, out_tensors, shape, tensor_args

aten = torch.ops.aten
R = Replicate()


def _mixed_dims(node: fx.Node, nd: int) -> set[int]:
    op, args = node.target, node.args
    if op is aten.pad.default or op is aten.constant_pad_nd.default:
        return set(range(nd - len(args[1]) // 2, nd))
    if op is aten.flip.default:
        return {d % nd for d in args[1]}
    dim = args[1] if op is not aten.cat.default else (args[1] if len(args) > 1 else 0)
    if op is aten.diff.default:
        dim = args[2] if len(args) > 2 else node.kwargs.get("dim", -1)
    if op is aten.topk.default:
        dim = args[2] if len(args) > 2 else node.kwargs.get("dim", -1)
    if op is aten.sort.default:
        dim = args[1] if len(args) > 1 else node.kwargs.get("dim", -1)
    return {dim % nd}


def along_dim_options(node: fx.Node) -> list[Option]:
    out = tuple(out_tensors(node)[0].shape)
    mixed = _mixed_dims(node, len(out))
    ins = tensor_args(node)
    options = [Option(R, (R,) * len(ins))]
    for d in range(len(out)):
        if d in mixed:
            continue
        placements = tuple(
            Shard(d) if len(shape(t)) == len(out) and shape(t)[d] == out[d] else R for t in ins
        )
        options.append(Option(Shard(d), placements))
    return options


OPS = (
    aten.cumsum.default,
    aten.diff.default,
    aten.cat.default,
    aten.pad.default,
    aten.constant_pad_nd.default,
    aten.flip.default,
    aten.topk.default,
    aten.sort.default,
)
RULES: dict[object, RuleFn] = {op: along_dim_options for op in OPS}
FOLLOWERS = frozenset(
    {aten.cumsum.default, aten.pad.default, aten.constant_pad_nd.default, aten.flip.default}
)
