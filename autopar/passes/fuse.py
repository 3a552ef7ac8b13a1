"""Swap each chain the plan fuses (``Plan.fusions``, found by ``solver.fusion``) for its kernel.

Runs on the emitted graph, after the layout changes are in. A chain's tail becomes
``fused_call(kind, spec, x, params..., consts...)``: the kernel runs on this rank's shards
(``runtime.kernels``: Triton where it runs, else torch with the same numbers) and its result
is wrapped in the tail's planned layout; the other members go. The planner fuses only chains
whose layouts let the kernel run (``solver.fusion.runs_fused``); a chain that does not match
here (a plan edited by hand) is left as it is, with a warning: the numbers stay right.
"""

from __future__ import annotations

import warnings

import torch.fx as fx

from autopar.errors import PlanFormatError
from autopar.passes.layouts import INSERTED
from autopar.runtime.kernels.fused import KERNELS, fused_call
from autopar.solver.fusion import layout_fits
from autopar.solver.plan import Plan
from autopar.solver.specs import parse


def fuse_kernels(gm: fx.GraphModule, plan: Plan) -> fx.GraphModule:
    if not plan.fusions:
        return gm
    by_name = {n.name: n for n in gm.graph.nodes}
    for f in plan.fusions:
        _check_entry(f, by_name)
        chain = [by_name[n] for n in f["nodes"]]
        found = _inputs(chain, f)
        tail = chain[-1]
        why = (
            found
            if isinstance(found, str)
            else layout_fits(f["kind"], parse(plan.node(tail.name).spec), tail.meta["val"].dim())
        )
        if why:
            warnings.warn(
                f"autopar: chain ending at {chain[-1].name} ({f['kind']}) runs unfused: {why}", stacklevel=2
            )
            continue
        x, params = found
        consts = tuple(f["consts"][c] for c in KERNELS[f["kind"]][1])
        tail.target = fused_call
        tail.args = (f["kind"], plan.node(tail.name).spec, x, *params, *consts)
        tail.kwargs = {}
        for n in reversed(chain[:-1]):
            gm.graph.erase_node(n)
    gm.graph.lint()
    gm.recompile()
    return gm


def _check_entry(f: dict, by_name: dict[str, fx.Node]) -> None:
    """A fusion entry of a plan file names a known kernel and nodes of this graph."""
    kind = f.get("kind")
    if kind not in KERNELS:
        raise PlanFormatError(
            f"plan fusion {kind!r} is not a known kernel ({', '.join(KERNELS)}); make the plan again"
        )
    nodes = f.get("nodes") or []
    missing = [n for n in nodes if n not in by_name]
    if not nodes or missing:
        raise PlanFormatError(
            f"plan fusion {kind} names nodes {missing} the graph does not have; make the plan again"
        )


def _inputs(chain: list[fx.Node], f: dict) -> tuple[fx.Node, list] | str:
    """The emitted nodes the chain reads as its input and its parameters (in the kernel's
    order), or why it cannot be fused: it reads anything else."""
    members = set(chain)
    outside = {a for n in chain for a in n.all_input_nodes if a not in members}
    params: list = []
    for name in f["params"]:
        p = None if name is None else next((a for a in outside if _reads_param(a, name)), None)
        if name is not None and p is None:
            return f"its parameter {name} is not read directly"
        params.append(p)
    rest = outside - {p for p in params if p is not None}
    if len(rest) != 1:
        return "the plan changes a layout inside it"
    return next(iter(rest)), params


def _reads_param(node: fx.Node, name: str) -> bool:
    """Whether ``node`` is parameter ``name`` or the layout pass's wrapping of it."""
    while node.name != name:
        if not node.meta.get(INSERTED) or not isinstance(node.args[0], fx.Node):
            return False
        node = node.args[0]
    return True


__all__ = ["fuse_kernels"]
