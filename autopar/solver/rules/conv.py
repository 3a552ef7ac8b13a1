"""Convolution and pooling over ``[batch, channels, *spatial]``.

One-axis options (run on local shards, see ``runtime.local_ops``):

- convolution: replicate; shard the batch (weight replicated); shard the output channels
  (weight and bias on dim 0); shard the input channels (input dim 1, weight dim 1; the
  output is a partial sum, the bias added as a partial share); pass a partial-sum input
  through (the op is linear). Grouped convolutions shard the batch only.
- pooling: replicate, or shard batch or channels; average pooling also passes partial sums.

Spatial dims are never sharded (that needs halo exchange).
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
from torch.distributed.tensor import Partial, Replicate, Shard

from autopar.solver.rules.base import Option, RuleFn, shape, tensor_args

aten = torch.ops.aten
R = Replicate()
P = Partial()

CONVS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default)
MAX_POOLS = (
    aten.max_pool1d.default,
    aten.max_pool2d.default,
    aten.max_pool3d.default,
    aten.adaptive_max_pool1d.default,
)
AVG_POOLS = (
    aten.avg_pool1d.default,
    aten.avg_pool2d.default,
    aten.avg_pool3d.default,
    aten.adaptive_avg_pool1d.default,
    aten.adaptive_avg_pool2d.default,
    aten.adaptive_avg_pool3d.default,
)


def _groups(node: fx.Node) -> int:
    return node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)


def conv_options(node: fx.Node) -> list[Option]:
    has_bias = len(tensor_args(node)) == 3

    def opt(out, x, w, b) -> Option:
        return Option(out, (x, w, b) if has_bias else (x, w))

    options = [opt(R, R, R, R), opt(Shard(0), Shard(0), R, R)]
    if _groups(node) == 1:
        options += [opt(Shard(1), R, Shard(0), Shard(0)), opt(P, Shard(1), Shard(1), P), opt(P, P, R, P)]
    return options


def pool_options(node: fx.Node) -> list[Option]:
    options = [Option(R, (R,)), Option(Shard(0), (Shard(0),)), Option(Shard(1), (Shard(1),))]
    if node.target in AVG_POOLS:
        options.append(Option(P, (P,)))
    return options


def conv_flops(node: fx.Node) -> float:
    weight = shape(node.args[1])  # [out_ch, in_ch / groups, *kernel]
    return 2.0 * math.prod(shape(node)) * math.prod(weight[1:])


RULES: dict[object, RuleFn] = {op: conv_options for op in CONVS}
RULES.update({op: pool_options for op in MAX_POOLS + AVG_POOLS})
FLOPS = {op: conv_flops for op in CONVS}
FOLLOWERS = frozenset(MAX_POOLS + AVG_POOLS)
