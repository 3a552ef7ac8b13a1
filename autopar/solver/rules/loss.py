"""Losses: cross entropy over ``logits[N, C]`` and ``target[N]``; binary cross entropy with
logits over equal-shaped logits and targets (run on local shards).

One-axis options: replicate, or shard the batch dim N of logits and target. With
``reduction="mean"`` the output is a partial average (``Pavg``), with ``"sum"`` a partial sum,
with ``"none"`` sharded like the batch. The partial average is the mean of per-shard means,
exact only when every shard counts the same number of targets; so the tracer rewrites a mean
without class weights as sum / count (``tracer/lowerings.py``), and only a weighted mean
reaches this rule with ``reduction="mean"`` (a known limit, in ``docs/architecture.md``).

*Vocabulary parallel*: 2-D logits may also be sharded along the classes (the vocabulary, as a
column-parallel LM head leaves them) with the target replicated; the loss is then computed
without gathering the logits (``runtime.vocab_parallel``): each rank reduces its columns to a
row max, a row sum of exponentials and the target's logit, and two all-reduces of ``[rows]``
fp32 values over the sharded axes (``inner_collectives``, priced with the op) give every rank
the whole loss. Not offered with class weights, label smoothing or a weighted mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.fx as fx
from torch.distributed.tensor import Partial, Replicate, Shard

from autopar.solver.rules.base import Option, RuleFn, Strategy, shape, tensor_args
from autopar.solver.specs import local_numel

aten = torch.ops.aten
R = Replicate()

_REDUCTION = {0: Shard(0), 1: Partial("avg"), 2: Partial("sum")}


def cross_entropy_options(node: fx.Node) -> list[Option]:
    n_in = len(tensor_args(node))
    reduction = _arg(node, 3, "reduction", 1)
    batch_in = (Shard(0), Shard(0)) + (R,) * (n_in - 2)  # class weights stay replicated
    options = [Option(R, (R,) * n_in), Option(_REDUCTION[reduction], batch_in)]
    if vocab_parallel_ok(node):
        options.append(Option(R, (Shard(1), R)))
    return options


def _arg(node: fx.Node, i: int, name: str, default):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def vocab_parallel_ok(node: fx.Node) -> bool:
    """2-D logits, no class weights, no label smoothing, a sum or no reduction (a mean without
    weights is a sum by now: ``tracer.lowerings``): the vocabulary may be sharded."""
    return (
        len(shape(node.args[0])) == 2
        and _arg(node, 2, "weight", None) is None
        and _arg(node, 3, "reduction", 1) != 1
        and not _arg(node, 5, "label_smoothing", 0.0)
    )


def inner_collectives(node: fx.Node, s: Strategy, mesh_shape: Sequence[int]) -> list[tuple[str, int, int]]:
    """The collectives a strategy runs inside the op, as ``(kind, mesh axis, bytes)``: on each
    axis that shards the vocabulary, an all-reduce of the row maxima and one of the row sums
    of exponentials with the target logits (fp32)."""
    logits = s.ins[0]
    rows = local_numel(shape(node.args[0])[:1], tuple(p if p != Shard(1) else R for p in logits), mesh_shape)
    axes = [i for i, p in enumerate(logits) if p == Shard(1)]
    return [c for i in axes for c in (("all_reduce", i, 4 * rows), ("all_reduce", i, 8 * rows))]


def bce_options(node: fx.Node) -> list[Option]:
    """Any dim of the logits (and targets) may be sharded; a full mean is then the mean of the
    equal-sized shards' means, exactly. Weights broadcast: sharded where they have the dim."""
    ins = tensor_args(node)
    logits = shape(ins[0])
    reduction = _arg(node, 4, "reduction", 1)
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
INNER_COLLECTIVES = {OP: inner_collectives}
