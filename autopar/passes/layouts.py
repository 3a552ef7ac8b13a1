"""Insert the planned layout changes into the graph.

For every node, in order: inputs are cut to this rank's shard (``distribute_input``);
parameters pass through ``sync_grad`` (their gradient ends in their own layout), offloaded
ones through ``to_device`` first, under mixed precision through ``to_dtype`` (the compute
copy; its gradient comes back in the master dtype), and a ``zero3`` one is gathered by
``gather_for_use`` (``runtime.zero``); each tensor argument whose current layout differs
from what the consumer's planned strategy needs goes through ``reshard``; ops that run on
local shards (all but views, factories, dropout and in-place writes: ``runs_locally``) are
called through ``local_call``; creation ops are wrapped as replicated DTensors; outputs lose
partial sums and replicated ones are handed back as plain tensors.
"""

from __future__ import annotations

import torch.fx as fx
from torch.distributed.device_mesh import DeviceMesh

from autopar.runtime.layout import (
    MeshContext,
    as_replicated,
    distribute_input,
    reshard,
    sync_grad,
    to_dtype,
    to_output,
)
from autopar.runtime.local_ops import local_call
from autopar.runtime.zero import gather_for_use, to_device
from autopar.solver import rules
from autopar.solver.plan import Plan
from autopar.solver.rules.base import is_tensor_node
from autopar.solver.specs import no_partial, parse, short
from autopar.tracer.export import MASTER_DTYPE

MESH_ATTR = "autopar_mesh"
#: ``node.meta`` key marking the nodes this pass adds (``passes.recompute`` reads it)
INSERTED = "autopar_inserted"


def insert_layouts(gm: fx.GraphModule, plan: Plan, mesh: DeviceMesh) -> fx.GraphModule:
    graph = gm.graph
    planned = {n.name: n for n in plan.nodes}
    gm.add_module(MESH_ATTR, MeshContext(mesh))
    first_op = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(first_op):
        ctx = graph.get_attr(MESH_ATTR)
    layout: dict[fx.Node, str] = {}  # runtime layout of each tensor-valued node
    resharded: dict[tuple[fx.Node, str], fx.Node] = {}
    refetched: set[fx.Node] = set()  # zero3 parameters

    def replace_after(node: fx.Node, fn, *args) -> fx.Node:
        with graph.inserting_after(node):
            new = graph.call_function(fn, (node, *args))
        node.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
        new.meta = dict(node.meta, **{INSERTED: True})
        return new

    def as_layout(a: fx.Node, need: str, before: fx.Node) -> fx.Node:
        if layout[a] == need:
            return a
        key = (a, need)
        if key not in resharded:
            with graph.inserting_before(before):
                fn = gather_for_use if a in refetched else reshard
                resharded[key] = graph.call_function(fn, (a, need))
            resharded[key].meta = dict(a.meta, **{INSERTED: True})
            layout[resharded[key]] = need
        return resharded[key]

    for node in list(graph.nodes):
        np_ = planned.get(node.name)
        if node.op == "output":
            _emit_outputs(node, layout, as_layout, graph)
            continue
        if np_ is None:
            continue
        if node.op == "placeholder":
            v = node.meta["val"]
            args = (ctx, np_.spec, node.name, list(v.shape), v.dtype)
            layout[replace_after(node, distribute_input, *args)] = np_.spec
        elif node.op == "get_attr" and np_.kind == "param":
            src = replace_after(node, to_device) if np_.mode == "offload" else node
            if MASTER_DTYPE in node.meta:  # mixed precision: compute on a cast copy
                src = replace_after(src, to_dtype, node.meta["val"].dtype)
            param = replace_after(src, sync_grad)
            layout[param] = np_.spec
            if np_.mode == "zero3":
                refetched.add(param)
        elif node.op == "get_attr":
            layout[node] = np_.spec
        elif np_.kind == "getitem":
            layout[node] = np_.spec
        else:
            node.args, node.kwargs = _relayout_args(node, np_.input_specs, as_layout)
            if runs_locally(node):
                node.args = (node.target, np_.spec, *node.args)
                node.target = local_call
                layout[node] = np_.spec
            elif not np_.input_specs:  # a creation op makes a plain tensor on every rank
                layout[replace_after(node, as_replicated, ctx)] = np_.spec
            else:
                layout[node] = np_.spec
    graph.lint()
    gm.recompile()
    return gm


def _relayout_args(node: fx.Node, needs: list[str], as_layout) -> tuple:
    """The node's (args, kwargs) with each tensor argument in the layout the plan needs."""
    it = iter(needs)
    return fx.node.map_arg(
        (node.args, node.kwargs), lambda a: as_layout(a, next(it), node) if is_tensor_node(a) else a
    )


def runs_locally(node: fx.Node) -> bool:
    """Every op but views, factories, dropout and in-place writes (``rules.DISPATCHED``) runs
    on local shards (``local_call``); so does an op with no rule."""
    return not rules.has_rule(node) or node.target not in rules.DISPATCHED


def _emit_outputs(out: fx.Node, layout, as_layout, graph: fx.Graph) -> None:
    def convert(a: fx.Node) -> fx.Node:
        if a not in layout:
            return a
        whole = short(no_partial(parse(layout[a])))
        b = as_layout(a, whole, out)
        with graph.inserting_before(out):
            return graph.call_function(to_output, (b,))

    out.args = fx.node.map_arg(out.args, lambda a: convert(a) if is_tensor_node(a) else a)


__all__ = ["insert_layouts", "runs_locally"]
