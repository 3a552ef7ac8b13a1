"""Creation ops: a replicated output whatever the inputs hold.

``arange``, ``zeros``, ``full``... have no tensor inputs; the emitted module wraps their
plain-tensor result as a replicated DTensor. ``new_ones``, ``new_zeros``... read only their
input's dtype and device, so the input may be in any layout.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.distributed.tensor import Replicate, Shard

from autopar.solver.rules.base import Option, RuleFn, shape

aten = torch.ops.aten


def creation_options(node: fx.Node) -> list[Option]:
    return [Option(Replicate(), ())]


OPS = (
    aten.arange.default,
    aten.arange.start,
    aten.arange.start_step,
    aten.zeros.default,
    aten.ones.default,
    aten.full.default,
    aten.empty.memory_format,
    aten.scalar_tensor.default,
)


def new_factory_options(node: fx.Node) -> list[Option]:
    nd = len(shape(node.args[0]))
    return [Option(Replicate(), (Replicate(),))] + [Option(Replicate(), (Shard(d),)) for d in range(nd)]


NEW_OPS = (aten.new_ones.default, aten.new_zeros.default, aten.new_full.default, aten.new_empty.default)
RULES: dict[object, RuleFn] = {op: creation_options for op in OPS}
RULES.update({op: new_factory_options for op in NEW_OPS})
#: Run by DTensor's dispatcher (``rules.DISPATCHED``): sizes are global, and a factory with
#: no tensor input makes a plain tensor (``passes.layouts`` wraps it as replicated).
DISPATCHED = frozenset(OPS + NEW_OPS)
