"""Elementwise ops with broadcasting (unary, binary, ternary).

One-axis options: replicate; shard output dim ``d`` with each input sharded on the dim that
broadcasts to ``d`` (or replicated where that input has size 1 or lacks the dim); and, for
ops linear in their operands, partial sums pass through: ``P + P -> P``, ``P * R -> P``,
``P / R -> P``, ``-P -> P``.
"""

from __future__ import annotations

import numbers

import torch
import torch.fx as fx
from torch.distributed.tensor import Partial, Replicate, Shard

from autopar.solver.rules.base import Option, RuleFn, shape, tensor_args

aten = torch.ops.aten
R = Replicate()
P = Partial()

# Linear in their one operand: partial sums pass through.
_LINEAR_UNARY = (
    aten.neg.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.alias.default,
    aten.detach.default,
    aten._to_copy.default,
    aten.to.dtype,
)

UNARY = _LINEAR_UNARY + (
    aten.gelu.default,
    aten.relu.default,
    aten.silu.default,
    aten.tanh.default,
    aten.sigmoid.default,
    aten.exp.default,
    aten.log.default,
    aten.rsqrt.default,
    aten.sqrt.default,
    aten.abs.default,
    aten.pow.Tensor_Scalar,
    aten.dropout.default,
    aten.to.dtype_layout,
    aten.to.device,
    aten.cos.default,
    aten.sin.default,
    aten.ne.Scalar,
    aten.eq.Scalar,
    aten.lt.Scalar,
    aten.le.Scalar,
    aten.gt.Scalar,
    aten.ge.Scalar,
    aten.logical_not.default,
    aten.bitwise_not.default,
)
BINARY = (
    aten.add.Tensor,
    aten.sub.Tensor,
    aten.mul.Tensor,
    aten.div.Tensor,
    aten.maximum.default,
    aten.minimum.default,
    aten.eq.Tensor,
    aten.ne.Tensor,
    aten.lt.Tensor,
    aten.gt.Tensor,
    aten.le.Tensor,
    aten.ge.Tensor,
    aten.__and__.Tensor,
    aten.__or__.Tensor,
    aten.bitwise_and.Tensor,
    aten.bitwise_or.Tensor,
    aten.logical_and.default,
    aten.logical_or.default,
    aten.where.self,
)
# Linear in every tensor operand together (sums) or in exactly one operand (products).
_LINEAR_SUM = (aten.add.Tensor, aten.sub.Tensor)
_LINEAR_ONE = (aten.mul.Tensor, aten.div.Tensor)


def elementwise_options(node: fx.Node) -> list[Option]:
    ins = tensor_args(node)
    out_shape = shape(node)
    options = [Option(R, (R,) * len(ins))]
    for d, size in enumerate(out_shape):
        if size == 1:
            continue
        placements = []
        for t in ins:
            s = shape(t)
            e = d - (len(out_shape) - len(s))
            placements.append(Shard(e) if e >= 0 and s[e] == size else R)
        options.append(Option(Shard(d), tuple(placements)))
    options.extend(_partial_options(node, ins))
    return options


def _partial_options(node: fx.Node, ins: list[fx.Node]) -> list[Option]:
    if not all(t.meta["val"].is_floating_point() for t in ins):
        return []
    scalars = [a for a in node.args if isinstance(a, numbers.Number) and not isinstance(a, bool)]
    op = node.target
    if op in _LINEAR_UNARY or (op is aten.pow.Tensor_Scalar and node.args[1] == 1):
        return [Option(P, (P,))]
    if op in _LINEAR_SUM and not scalars and len(ins) == 2:
        return [Option(P, (P, P))]
    if op in _LINEAR_ONE and len(ins) == 2:
        first = [Option(P, (P, R))]
        return first if op is aten.div.Tensor else first + [Option(P, (R, P))]
    if op in _LINEAR_ONE and len(ins) == 1:
        return [Option(P, (P,))]
    return []


def copy_options(node: fx.Node) -> list[Option]:
    """``copy_(buffer, value)``: an in-place write into a buffer (batch norm's running
    statistics). The planner keeps written buffers replicated (``solver.graph``), so the value
    is made whole and every rank writes its full copy."""
    return [Option(R, (R, R))]


INPLACE = (aten.copy_.default,)
RULES: dict[object, RuleFn] = {op: elementwise_options for op in UNARY + BINARY}
RULES[aten.copy_.default] = copy_options
# Single-input elementwise ops follow their producer's decision in the ILP.
FOLLOWERS = frozenset(UNARY)
#: Run by DTensor's dispatcher (``rules.DISPATCHED``): dropout draws its mask through DTensor's
#: random-number tracker; an in-place write must land in the DTensor's own buffer.
DISPATCHED = frozenset({aten.dropout.default}) | frozenset(INPLACE)
