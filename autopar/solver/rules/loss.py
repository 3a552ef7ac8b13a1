"""Losses: cross entropy over ``logits[N, C]`` and ``target[N]``; binary cross entropy with
logits over equal-shaped logits and targets (run on local shards).

One-axis options: replicate, or shard the batch dim N of logits and target. With
``reduction="mean"`` the output is a partial average (``Pavg``), with ``"sum"`` a partial sum,
with ``"none"`` sharded like the batch. The partial average is the mean of per-shard means,
exact only when every shard counts the same number of targets; so the tracer rewrites a mean
without class weights as sum / count (``tracer/lowerings.py``), and only a weighted mean
reaches this rule with ``reduction="mean"`` (a known limit, in ``docs/architecture.md``).
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
from torch.distributed.tensor import Partial, Replicate, Shard

from autopar.solver.rules.base import Option, RuleFn, shape, tensor_args

aten = torch.ops.aten
R = Replicate()

_REDUCTION = {0: Shard(0), 1: Partial("avg"), 2: Partial("sum")}


def cross_entropy_options(node: fx.Node) -> list[Option]:
    n_in = len(tensor_args(node))
    reduction = node.args[3] if len(node.args) > 3 else node.kwargs.get("reduction", 1)
    batch_in = (Shard(0), Shard(0)) + (R,) * (n_in - 2)  # class weights stay replicated
    return [Option(R, (R,) * n_in), Option(_REDUCTION[reduction], batch_in)]


def bce_options(node: fx.Node) -> list[Option]:
    """Any dim of the logits (and targets) may be sharded; a full mean is then the mean of the
    equal-sized shards' means, exactly. Weights broadcast: sharded where they have the dim."""
    ins = tensor_args(node)
    logits = shape(ins[0])
    reduction = node.args[4] if len(node.args) > 4 else node.kwargs.get("reduction", 1)
    options = [Option(R, (R,) * len(ins))]
    for d in range(len(logits)):
        extra = []
        for t in ins[2:]:
            e = d - (len(logits) - len(shape(t)))
            extra.append(Shard(e) if e >= 0 and shape(t)[e] == logits[d] else R)
        out = Shard(d) if reduction == 0 else _REDUCTION[reduction]
        options.append(Option(out, (Shard(d), Shard(d), *extra)))
    return options


def cross_entropy_flops(node: fx.Node) -> float:
    return 6.0 * math.prod(shape(node.args[0]))


OP = aten.cross_entropy_loss.default
BCE = aten.binary_cross_entropy_with_logits.default
RULES: dict[object, RuleFn] = {OP: cross_entropy_options, BCE: bce_options}
FLOPS = {OP: cross_entropy_flops}
LOCAL_OPS = frozenset({BCE})
