"""Creation ops (``arange``, ``zeros``, ``full``...): no tensor inputs, a replicated output.

The emitted module wraps their plain-tensor result as a replicated DTensor.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.distributed.tensor import Replicate

from autopar.solver.rules.base import Option, RuleFn

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
RULES: dict[object, RuleFn] = {op: creation_options for op in OPS}
