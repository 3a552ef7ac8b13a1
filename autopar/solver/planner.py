"""From a traced graph to a Plan: strategies and costs, the ILP, and the per-node record."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict

import torch.fx as fx

from autopar.cost import profile_db
from autopar.cost.hardware import get_hardware
from autopar.cost.units import parse_bytes
from autopar.errors import AutoparError
from autopar.solver import fusion, ilp
from autopar.solver.explain import alternatives
from autopar.solver.graph import (
    StrategyGraph,
    build,
    edge_bytes,
    edge_cost_s,
    input_grads,
    node_inputs,
    output_cost_s,
    output_names,
)
from autopar.solver.pinned import PARAM_MODES, pin_for
from autopar.solver.plan import NodePlan, Plan, fingerprint, graph_signature
from autopar.solver.specs import short
from autopar.solver.zero import add_param_modes, param_mode
from autopar.tracer import Traced


def plan_traced(
    traced: Traced,
    mesh_shape: Sequence[int],
    *,
    mesh_dim_names: Sequence[str] | None = None,
    gpu: str | None = "h100",
    memory_budget: int | str | None = None,
    strategy: str = "auto",
    time_limit_s: float | None = None,
    mixed_precision: str = "",
    timings_s: dict[str, float] | None = None,
    progress: Callable[[str], None] | None = None,
    profile: str | None = None,
    kernels: str = "auto",
) -> Plan:
    """Plan a traced model; ``progress`` (the CLI's) hears each phase's name; ``profile``: a
    profile database (``cost.profile_db``) whose measurements for ``gpu`` price the plan;
    ``kernels``: fuse the chains ``solver.fusion`` finds where ``gpu`` runs the fused kernels
    ("auto"), always ("fused") or never ("eager")."""
    say = progress or (lambda phase: None)
    hw = get_hardware(gpu)
    if strategy == "zero-offload" and hw.host_link is None:
        raise AutoparError(
            f'strategy "zero-offload" needs a device with its own memory beside the host\'s; '
            f"gpu={hw.name!r} computes in host memory. Plan for a GPU (gpu='h100') or pick another strategy."
        )
    timings = dict(timings_s or {}) | {"strategies_s": 0.0, "solve_s": 0.0}
    prof = profile_db.load(profile, hw.name) if profile else None
    fusions = fusion.planned(traced.gm.graph, kernels, hw.fused_kernels)
    while True:  # until every chain priced as fused can run fused (each round drops some)
        t0 = time.perf_counter()
        say("strategies and costs")
        g = build(traced.gm, mesh_shape, hw, traced.trainable, pin_for(strategy), profile=prof)
        if strategy in PARAM_MODES:
            add_param_modes(g, PARAM_MODES[strategy])
        elif memory_budget is not None:  # ZeRO-3 and offload only ever buy memory
            add_param_modes(g)
        timings["strategies_s"] += time.perf_counter() - t0
        say("solving the ILP")
        if memory_budget == "min":  # the plan with the smallest peak, whatever its step time
            sol = ilp.solve(g, objective="memory", time_limit_s=time_limit_s)
        else:
            sol = ilp.solve(g, memory_budget_bytes=parse_bytes(memory_budget), time_limit_s=time_limit_s)
        timings["solve_s"] += sol.solve_s
        fused = [f for f in fusions if fusion.runs_fused(f, *_lookups(g, sol.choice))]
        if len(fused) == len(fusions):
            break
        fusions = fused
        fusion.mark(traced.gm.graph, fusions)  # the others are priced unfused next round
    fallback = sorted({str(nc.node.target) for nc in g.nodes.values() if nc.fallback})
    if fallback:
        warnings.warn(
            f"autopar: no sharding rule for {', '.join(fallback)}; these ops run replicated "
            "(listed in plan.fallback_ops and the report)",
            stacklevel=2,
        )
    names = list(mesh_dim_names or _default_names(len(mesh_shape)))
    nodes = node_plans(g, sol.choice, sol.recomputed_nodes)
    sig = graph_signature(traced.gm)
    return Plan(
        fingerprint=fingerprint(sig),
        graph_signature=sig,
        mesh_shape=list(mesh_shape),
        mesh_dim_names=names,
        hardware=hw.name,
        strategy=strategy,
        mixed_precision=mixed_precision,
        nodes=nodes,
        estimated_step_s=sol.objective_s,
        peak_memory_bytes=int(sol.memory["peak_bytes"]),
        memory={k: v if isinstance(v, str) else int(v) for k, v in sol.memory.items()},
        recompute=sorted(sol.recomputed, key=_block_order),
        alternatives=alternatives(g, sol.choice),
        costs=cost_sources(g, sol.choice),
        fusions=[asdict(f) for f in fusions],
        fallback_ops=fallback,
        solver={
            "status": sol.status,
            "gap": sol.gap,
            "solve_s": sol.solve_s,
            "solver": sol.solver,
            "variables": sol.n_variables,
            "decision_nodes": len({g.decision(r) for r in g.roots}),
            "roots": len(g.roots),
            "shared_blocks": g.shared_blocks,
            "edges": len(g.edges),
        },
        timings_s=timings,
    )


def cost_sources(g: StrategyGraph, choice: dict[str, int]) -> dict:
    """Which of the chosen strategies' prices were measured (a profile) and which estimated."""
    prof = g.pricing.profile if g.pricing else None
    fused = sum(fusion.role(nc.node) == "tail" for nc in g.nodes.values())
    if prof is None:
        return {"source": f"hardware table ({g.hw.name})", "fused_chains": fused}
    estimated = []
    for name, nc in g.nodes.items():
        if nc.kind == "op" and not fusion.role(nc.node):
            grads = input_grads(g.nodes, nc.node)
            sig = profile_db.op_signature(nc.node, g.spec_of(name, choice).ins, grads, g.mesh_shape)
            if prof.op_s(sig) is None:
                estimated.append(name)
    n_ops = sum(nc.kind == "op" and not fusion.role(nc.node) for nc in g.nodes.values())
    links = g.links
    return {
        "source": f"profile {prof.path}",
        "device": prof.key,
        "measured_ops": n_ops - len(estimated),
        "estimated_ops": estimated,
        "collectives_measured": {f"axis{i}": [k for k, _, _ in link.fitted] for i, link in enumerate(links)},
        "optimizer_measured": prof.optimizer_s(g.mesh_shape, 0) is not None,
        "fused_chains": fused,
    }


def _lookups(g: StrategyGraph, choice: dict[str, int]):
    """A node's fx node and its chosen strategy, by name."""
    return (lambda name: g.nodes[name].node), (lambda name: g.spec_of(name, choice))


def _block_order(block: str) -> tuple[str, int]:
    prefix, _, i = block.rpartition(".")
    return prefix, int(i)


def _default_names(n: int) -> list[str]:
    return ["dp", "tp"] if n == 2 else [f"d{i}" for i in range(n)]


def node_plans(g: StrategyGraph, choice: dict[str, int], recomputed: dict[str, str]) -> list[NodePlan]:
    """Each node's chosen layout and its share of the estimated step."""
    out = []
    outputs = output_names(g)
    for name, nc in g.nodes.items():
        s = g.spec_of(name, choice)
        i = nc.pick[choice[nc.root]]
        comm, sent = 0.0, 0.0
        for k, a in enumerate(node_inputs(nc)):
            if a.name in g.nodes:
                have = g.spec_of(a.name, choice).out
                comm += edge_cost_s(g, g.nodes[a.name], nc, k, have, s)
                sent += edge_bytes(g, g.nodes[a.name], nc, k, have, s)
        if name in outputs:
            comm += output_cost_s(g, nc, s.out)
        out.append(
            NodePlan(
                name=name,
                op=str(nc.node.target) if nc.kind not in ("input",) else "input",
                kind=nc.kind,
                module=_module_of(nc.node, nc.kind),
                target=str(nc.node.target),
                spec=short(s.out),
                input_specs=[short(x) for x in s.ins] if nc.kind != "getitem" else [],
                recompute=recomputed.get(name, ""),
                mode=param_mode(g, nc, choice[nc.root]),
                decision=g.decision(nc.root),
                compute_s=nc.cost_s[i],
                comm_s=comm,
                comm_bytes=int(sent),
                memory_bytes=nc.memory_bytes[i],
            )
        )
    return out


def _module_of(node: fx.Node, kind: str) -> str:
    if kind in ("param", "buffer"):
        return str(node.target).rsplit(".", 1)[0] if "." in str(node.target) else ""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path.replace("L['self'].", "").replace("L__self__.", "") if isinstance(path, str) else ""
