"""Recompute the blocks the plan marks: each becomes a checkpointed submodule.

The plan names, per node, the block instance it is recomputed with (``NodePlan.recompute``,
e.g. ``"model.layers.3"``; empty when its output is kept). Each run of consecutive nodes of
one such block in the emitted graph, together with the layout changes inserted between them,
is moved into a ``GraphModule`` called through ``torch.utils.checkpoint.checkpoint`` (non-
reentrant): forward keeps only the region's inputs, backward runs the region again to
rebuild what its ops keep, collectives (a gathered weight) included.
"""

from __future__ import annotations

import operator

import torch.fx as fx
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from autopar.passes.layouts import INSERTED
from autopar.solver.plan import Plan


class Checkpointed(nn.Module):
    """Runs ``body`` under activation checkpointing."""

    def __init__(self, body: fx.GraphModule, block: str) -> None:
        super().__init__()
        self.body = body
        self.block = block

    def forward(self, *args):
        return checkpoint(self.body, *args, use_reentrant=False)

    def extra_repr(self) -> str:
        return f"block={self.block}"


def wrap_recomputed(gm: fx.GraphModule, plan: Plan) -> fx.GraphModule:
    block_of = {n.name: n.recompute for n in plan.nodes if n.recompute}
    if not block_of:
        return gm
    for i, (block, region) in enumerate(_regions(gm.graph, block_of)):
        _outline(gm, region, f"recompute_{i}", block)
    gm.graph.lint()
    gm.recompile()
    return gm


def _regions(graph: fx.Graph, block_of: dict[str, str]) -> list[tuple[str, list[fx.Node]]]:
    """Maximal runs of one block's recomputed nodes; nodes the layout pass inserted between
    two of them (reshards) join the run."""
    regions: list[tuple[str, list[fx.Node]]] = []
    current: list[fx.Node] = []
    pending: list[fx.Node] = []
    block = ""
    for node in graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        b = block_of.get(node.name)
        if b and b == block and current:
            current += pending + [node]
            pending = []
        elif b:
            if current:
                regions.append((block, current))
            current, pending, block = [node], [], b
        elif current and node.name not in block_of and _inserted(node):
            pending.append(node)
        else:
            if current:
                regions.append((block, current))
            current, pending, block = [], [], ""
    if current:
        regions.append((block, current))
    return regions


def _inserted(node: fx.Node) -> bool:
    """A node the layout pass added (``passes.layouts`` marks them)."""
    return node.meta.get(INSERTED, False)


def _outline(gm: fx.GraphModule, region: list[fx.Node], name: str, block: str) -> None:
    inside = set(region)
    inputs = list(dict.fromkeys(a for n in region for a in n.all_input_nodes if a not in inside))
    outputs = [n for n in region if any(u not in inside for u in n.users)]
    body = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for k, a in enumerate(inputs):
        env[a] = body.placeholder(f"in_{k}")
        env[a].meta = dict(a.meta)
    for n in region:
        env[n] = body.node_copy(n, lambda a: env[a])
    body.output(tuple(env[o] for o in outputs))
    gm.add_module(name, Checkpointed(fx.GraphModule(gm, body), block))
    with gm.graph.inserting_before(region[0]):
        call = gm.graph.call_module(name, tuple(inputs))
        for k, o in enumerate(outputs):
            got = gm.graph.call_function(operator.getitem, (call, k))
            got.meta = dict(o.meta)
            o.replace_all_uses_with(got, delete_user_cb=lambda u: u not in inside)
    for n in reversed(region):
        gm.graph.erase_node(n)
