"""Normalization: layer norm (and RMS norm) over the trailing ``normalized_shape`` dims.

The leading (non-normalized) dims may be sharded; weight and bias are replicated.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
from torch.distributed.tensor import Replicate, Shard

from autopar.solver.rules.base import Option, RuleFn, shape, tensor_args

aten = torch.ops.aten
R = Replicate()


def norm_options(node: fx.Node) -> list[Option]:
    n_in = len(tensor_args(node))
    nd = len(shape(node.args[0]))
    n_norm = len(node.args[1])
    options = [Option(R, (R,) * n_in)]
    for d in range(nd - n_norm):
        options.append(Option(Shard(d), (Shard(d),) + (R,) * (n_in - 1)))
    return options


def norm_flops(node: fx.Node) -> float:
    return 8.0 * math.prod(shape(node))


OPS = tuple(op for op in (aten.layer_norm.default, getattr(aten, "rms_norm", None)) if op is not None)
OPS = tuple(getattr(op, "default", op) for op in OPS)
RULES: dict[object, RuleFn] = {op: norm_options for op in OPS}
FLOPS = {op: norm_flops for op in OPS}
FOLLOWERS = frozenset(OPS)
