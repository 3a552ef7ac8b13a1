"""Losses: cross entropy over ``logits[N, C]`` and ``target[N]``.

One-axis options: replicate, or shard the batch dim N of logits and target. With
``reduction="mean"`` the output is a partial average (``Pavg``), with ``"sum"`` a partial sum,
with ``"none"`` sharded like the batch. The partial average is the mean of per-shard means:
it equals the global mean when every shard holds the same number of counted targets, which
fails when ``ignore_index`` targets are spread unevenly (a known limit, documented in
``docs/architecture.md``).
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


def cross_entropy_flops(node: fx.Node) -> float:
    return 6.0 * math.prod(shape(node.args[0]))


OP = aten.cross_entropy_loss.default
RULES: dict[object, RuleFn] = {OP: cross_entropy_options}
FLOPS = {OP: cross_entropy_flops}
