"""Views and layout ops: view/reshape, transpose/permute, (un)squeeze, expand, split, slice.

Each op is described by which output dim each input dim's shard lands on. For view and
reshape the shapes are cut into groups of equal product (ignoring size-1 dims); a group that
splits one input dim into several, or flattens several input dims into one, keeps a shard of
its *first* input dim on its first output dim; other dims of the group must be replicated.
Partial sums pass through every view (views are linear).
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.distributed.tensor import Partial, Replicate

from autopar.solver.rules.base import Option, RuleFn, map_option, shape

aten = torch.ops.aten
R = Replicate()
P = Partial()


def reshape_mapping(in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> dict[int, int]:
    """Output dim -> input dim whose shard it keeps, for a view from in_shape to out_shape."""
    a = [i for i, s in enumerate(in_shape) if s != 1]
    b = [j for j, s in enumerate(out_shape) if s != 1]
    mapping: dict[int, int] = {}
    i = j = 0
    while i < len(a) and j < len(b):
        gi, gj = [a[i]], [b[j]]
        pa, pb = in_shape[a[i]], out_shape[b[j]]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                gi.append(a[i])
                pa *= in_shape[a[i]]
                i += 1
            else:
                gj.append(b[j])
                pb *= out_shape[b[j]]
                j += 1
        if len(gi) == 1 or len(gj) == 1:
            mapping[gj[0]] = gi[0]
    return mapping


def _mapping(node: fx.Node) -> dict[int, int]:
    op = node.target
    in_shape = shape(node.args[0])
    nd = len(in_shape)
    if op in (aten.transpose.int,):
        d0, d1 = (d % nd for d in node.args[1:3])
        perm = list(range(nd))
        perm[d0], perm[d1] = perm[d1], perm[d0]
        return dict(enumerate(perm))
    if op is aten.t.default:
        return {0: 1, 1: 0} if nd == 2 else {0: 0}
    if op is aten.permute.default:
        return {o: i % nd for o, i in enumerate(node.args[1])}
    if op is aten.expand.default:
        out = shape(node)
        off = len(out) - nd
        return {o: o - off for o in range(off, len(out)) if in_shape[o - off] == out[o]}
    if op in (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default):
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        return {d: d for d in range(nd) if d != dim % nd}
    if op is aten.slice.Tensor:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        return {d: d for d in range(nd) if d != dim % nd}
    if op is aten.select.int:
        dim = node.args[1] % nd
        return {(d if d < dim else d - 1): d for d in range(nd) if d != dim}
    return reshape_mapping(in_shape, shape(node))


def view_options(node: fx.Node) -> list[Option]:
    return [Option(R, (R,)), Option(P, (P,))] + map_option(_mapping(node))


VIEW_OPS = (
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.flatten.using_ints,
    aten.unflatten.int,
    aten.transpose.int,
    aten.t.default,
    aten.permute.default,
    aten.expand.default,
    aten.split.Tensor,
    aten.split_with_sizes.default,
    aten.chunk.default,
    aten.slice.Tensor,
    aten.select.int,
)
RULES: dict[object, RuleFn] = {op: view_options for op in VIEW_OPS}
FOLLOWERS = frozenset(VIEW_OPS)
#: Run by DTensor's dispatcher (``rules.DISPATCHED``): their arguments are global sizes.
DISPATCHED = frozenset(VIEW_OPS)
