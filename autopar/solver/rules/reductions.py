"""Reductions (sum, mean, amax) and softmax-like ops along a dim.

Sum and mean: a shard on a kept dim stays a shard (renumbered when the dim goes away); a
shard on a reduced dim becomes a partial sum (``P``) or partial average (``Pavg``); a partial
sum stays partial through ``sum``. Softmax and log-softmax: any dim but the softmax dim may be sharded.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.distributed.tensor import Partial, Replicate, Shard

from autopar.solver.rules.base import Option, RuleFn, shape

aten = torch.ops.aten
R = Replicate()


def _reduced_dims(node: fx.Node) -> tuple[list[int], bool]:
    nd = len(shape(node.args[0]))
    if node.target in (aten.sum.default, aten.mean.default):
        return list(range(nd)), False
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None or dims == []:
        dims = list(range(nd))
    if isinstance(dims, int):
        dims = [dims]
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    return sorted(d % nd for d in dims), bool(keepdim)


def reduction_options(node: fx.Node) -> list[Option]:
    nd = len(shape(node.args[0]))
    reduced, keepdim = _reduced_dims(node)
    linear = node.target in (aten.sum.default, aten.sum.dim_IntList, aten.mean.default, aten.mean.dim)
    is_mean = node.target in (aten.mean.default, aten.mean.dim)
    options = [Option(R, (R,))]
    if linear and not is_mean:  # DTensor reduces a partial input of mean first
        options.append(Option(Partial(), (Partial(),)))
    for d in range(nd):
        if d in reduced:
            if linear:
                options.append(Option(Partial("avg" if is_mean else "sum"), (Shard(d),)))
            elif node.target is aten.amax.default:
                options.append(Option(Partial("max"), (Shard(d),)))
        else:
            out_d = d if keepdim else d - sum(1 for r in reduced if r < d)
            options.append(Option(Shard(out_d), (Shard(d),)))
    return options


def softmax_options(node: fx.Node) -> list[Option]:
    nd = len(shape(node.args[0]))
    dim = node.args[1] % nd
    return [Option(R, (R,))] + [Option(Shard(d), (Shard(d),)) for d in range(nd) if d != dim]


REDUCTIONS = (aten.sum.default, aten.sum.dim_IntList, aten.mean.default, aten.mean.dim, aten.amax.default)
SOFTMAX = (aten._softmax.default, aten.softmax.int, aten._log_softmax.default, aten.log_softmax.int)
RULES: dict[object, RuleFn] = {op: reduction_options for op in REDUCTIONS}
RULES.update({op: softmax_options for op in SOFTMAX})
FOLLOWERS = frozenset(REDUCTIONS + SOFTMAX)
