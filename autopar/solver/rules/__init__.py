"""Sharding rules, one module per op family, collected into one registry.

``strategies(node, mesh_shape)`` is the only entry point the solver uses: the node's valid
(output spec, input specs) choices. An op with no rule gets the replicated strategy, runs on
local tensors, and is reported as a fallback op.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.fx as fx

from autopar.solver.rules import (
    along_dim,
    attention,
    conv,
    creation,
    elementwise,
    lookup,
    loss,
    matmul,
    norms,
    reductions,
    views,
)
from autopar.solver.rules.base import Option, RuleFn, Strategy, expand, numel, tensor_args

RULES: dict[object, RuleFn] = {}
FLOPS: dict[object, object] = {}
#: op -> predicate: the op's rule covers only the calls it accepts
SUPPORTED: dict[object, object] = {}
#: op -> (node, strategy, mesh shape) -> the collectives a strategy runs inside the op
INNER_COLLECTIVES: dict[object, object] = {}
for _family in (
    matmul,
    elementwise,
    views,
    reductions,
    along_dim,
    norms,
    lookup,
    conv,
    attention,
    loss,
    creation,
):
    RULES.update(_family.RULES)
    FLOPS.update(getattr(_family, "FLOPS", {}))
    SUPPORTED.update(getattr(_family, "SUPPORTED", {}))
    INNER_COLLECTIVES.update(getattr(_family, "INNER_COLLECTIVES", {}))

#: Ops whose node takes its producer's decision in the ILP (one non-parameter input).
FOLLOWERS = (
    elementwise.FOLLOWERS
    | views.FOLLOWERS
    | reductions.FOLLOWERS
    | along_dim.FOLLOWERS
    | norms.FOLLOWERS
    | conv.FOLLOWERS
)
#: Ops DTensor's dispatcher runs. Every other op (and every op with no rule) runs on each
#: rank's local shards (``runtime.local_ops``), so its backward is the local op's backward
#: and its gradients take the layouts the plan prices (``solver.graph.grad_spec``).
DISPATCHED = views.DISPATCHED | creation.DISPATCHED | elementwise.DISPATCHED


def has_rule(node: fx.Node) -> bool:
    supported = SUPPORTED.get(node.target)
    return node.target in RULES and (supported is None or supported(node))


def options(node: fx.Node) -> list[Option]:
    if not has_rule(node):
        return [Option(views.R, (views.R,) * len(tensor_args(node)))]
    return RULES[node.target](node)


def strategies(node: fx.Node, mesh_shape: Sequence[int]) -> list[Strategy]:
    return expand(node, options(node), mesh_shape)


def forward_flops(node: fx.Node) -> float:
    fn = FLOPS.get(node.target) if has_rule(node) else None
    return float(fn(node)) if fn is not None else float(numel(node))


__all__ = ["DISPATCHED", "FOLLOWERS", "Strategy", "forward_flops", "has_rule", "strategies"]
