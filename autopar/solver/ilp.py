r"""The integer linear program that chooses every decision node's strategy.

Sets: decisions ``d`` with strategies ``j in S_d``. A decision is a root of the strategy
graph, or the class of corresponding roots of identical repeated blocks, which take one
decision together (``StrategyGraph.shared``). Edges ``e = (u -> v)`` between different
roots; edges that connect the same two decisions with the same layouts and prices are one
edge ``e`` with multiplicity ``w_e``. On an edge, the producer's strategies are grouped by the
output spec they give the tensor (``a in A_e``) and the consumer's by the input spec and
gradient spec they need (``b in B_e``); ``c_e(a, b)`` is the resharding time forward plus the
gradient's way back.

Variables: ``x[d, j]`` binary (decision d uses strategy j); ``z[e, a, b] >= 0`` continuous.

Objective (estimated training step time, seconds)::

    minimize  sum_d sum_j cost_d(j) x[d, j]  +  sum_e w_e sum_{a, b} c_e(a, b) z[e, a, b]

``cost_d(j)`` is the sum over the roots ``r`` of the decision of ``cost_r(j)``: compute
(forward and backward), optimizer step, the merged followers' and leaves' costs and the
folded edges' resharding (see ``solver.graph``).

Named constraints::

    one_strategy[d]:    sum_j x[d, j] = 1
    edge_src[e, a]:     sum_b z[e, a, b] = sum_{j : out(j) = a} x[d(u), j]
    edge_dst[e, b]:     sum_a z[e, a, b] = sum_{k : in(k) = b} x[d(v), k]
    memory_budget:      sum_d sum_j mem_d(j) x[d, j] <= budget        (when a budget is given)

``edge_src``/``edge_dst`` make ``z[e]`` a transport plan between two one-hot marginals, so
``z[e, a, b] = X_a Y_b`` exactly at integer points; the formulation is tight, so the LP
relaxation is usually integral. An edge whose producer (or consumer) side has a single group
needs no ``z``: its cost is linear in the other side's ``x``. The memory term ``mem_d`` sums,
like ``cost_d``, the per-device parameter, gradient and optimizer-state bytes plus every saved
activation of the decision's roots (the peak of a training step without recomputation).
Shared decisions make the ILP's size independent of the model's depth; the objective stays
exact, since each member's costs are summed into its decision.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import sys
import time
from dataclasses import dataclass

import pulp

from autopar.errors import InfeasibleBudgetError
from autopar.solver.graph import EdgeUse, StrategyGraph, edge_key, grad_spec


@dataclass
class Solution:
    choice: dict[str, int]  # root -> strategy index
    objective_s: float
    status: str  # optimal | time_limit | brute_force
    gap: float
    solve_s: float
    solver: str
    n_variables: int = 0


def _edge_groups(g: StrategyGraph, e: EdgeUse):
    """(producer group per root strategy, consumer group per root strategy, cost matrix)."""
    src, dst = g.nodes[e.src], g.nodes[e.dst]
    a_of = [src.strategies[j].out for j in src.pick]
    b_strats = [dst.strategies[k] for k in dst.pick]
    b_of = [(s.ins[e.arg], grad_spec(s, e.arg)) for s in b_strats]
    a_keys = list(dict.fromkeys(a_of))
    b_keys = list(dict.fromkeys(b_of))
    rep = {b: s for b, s in zip(b_of, b_strats)}
    cost = {(a, b): g.edge_cost_s(e, a, rep[b]) for a in a_keys for b in b_keys}
    return a_of, b_of, a_keys, b_keys, cost


def distinct_edges(g: StrategyGraph) -> list[tuple[EdgeUse, int]]:
    """The ILP's edges with their multiplicities: edges between the same two decisions whose
    group maps and prices are the same objects (repeated blocks) are one edge."""
    count: dict[tuple, list] = {}
    for e in g.edges:
        src, dst = g.nodes[e.src], g.nodes[e.dst]
        key = (g.decision(src.root), g.decision(dst.root), id(src.strategies), id(src.pick))
        key += (id(dst.strategies), id(dst.pick), e.arg, edge_key(src, dst))
        count.setdefault(key, [e, 0])[1] += 1
    return [(e, n) for e, n in count.values()]


def _decision_vectors(g: StrategyGraph) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """cost_d and mem_d: the sums over each decision's roots."""
    cost: dict[str, list[float]] = {}
    mem: dict[str, list[int]] = {}
    for r in g.roots:
        d = g.decision(r)
        if d not in cost:
            cost[d], mem[d] = [0.0] * len(g.root_cost_s[r]), [0] * len(g.root_cost_s[r])
        for j, (c, m) in enumerate(zip(g.root_cost_s[r], g.root_memory_bytes[r])):
            cost[d][j] += c
            mem[d][j] += m
    return cost, mem


def evaluate(g: StrategyGraph, choice: dict[str, int]) -> float:
    """The objective of a complete assignment (the same sum the ILP minimizes)."""
    total = sum(g.root_cost_s[r][choice[r]] for r in g.roots)
    for e in g.edges:
        total += g.edge_cost_s(e, g.spec_of(e.src, choice).out, g.spec_of(e.dst, choice))
    return total


def memory_bytes(g: StrategyGraph, choice: dict[str, int]) -> int:
    return sum(g.root_memory_bytes[r][choice[r]] for r in g.roots)


def solve(
    g: StrategyGraph,
    *,
    memory_budget_bytes: int | None = None,
    time_limit_s: float | None = None,
    solver: str = "highs",
    objective: str = "time",
) -> Solution:
    """Solve the ILP; with a time limit, return the best plan found and its gap."""
    t0 = time.perf_counter()
    prob = pulp.LpProblem("autopar", pulp.LpMinimize)
    cost, mem = _decision_vectors(g)
    x = {
        d: [pulp.LpVariable(f"x_{i}_{j}", cat="Binary") for j in range(len(cost[d]))]
        for i, d in enumerate(cost)
    }
    mem_expr = pulp.lpSum(m * v for d in x for m, v in zip(mem[d], x[d]))
    if objective == "memory":
        terms = [mem_expr]
    else:
        terms = [pulp.lpSum(c * v for d in x for c, v in zip(cost[d], x[d]))]
    for i, d in enumerate(x):
        prob += pulp.lpSum(x[d]) == 1, f"one_strategy_{i}"
    if objective == "time":
        for ei, (e, weight) in enumerate(distinct_edges(g)):
            terms.append(_edge_terms(g, e, ei, weight, x, prob))
    prob += pulp.lpSum(terms)
    if memory_budget_bytes is not None:
        prob += mem_expr <= memory_budget_bytes, "memory_budget"
    n_vars = len(prob.variables())
    status, gap, name = _run(prob, solver, time_limit_s)
    if status == "infeasible" and memory_budget_bytes is not None:
        floor = solve(g, objective="memory", solver=solver, time_limit_s=time_limit_s)
        need = memory_bytes(g, floor.choice)
        raise InfeasibleBudgetError(
            f"no plan fits memory_budget={memory_budget_bytes} bytes per device on mesh "
            f"{g.mesh_shape}; the smallest plan needs {need} bytes ({need / 2**30:.2f} GiB). "
            "Raise the budget or use more devices.",
            need,
        )
    chosen = {d: max(range(len(x[d])), key=lambda j: x[d][j].value() or 0.0) for d in x}
    choice = {r: chosen[g.decision(r)] for r in g.roots}
    return Solution(choice, evaluate(g, choice), status, gap, time.perf_counter() - t0, name, n_vars)


def _edge_terms(g: StrategyGraph, e: EdgeUse, ei: int, weight: int, x, prob: pulp.LpProblem):
    src, dst = g.nodes[e.src], g.nodes[e.dst]
    a_of, b_of, a_keys, b_keys, cost = _edge_groups(g, e)
    xs, xd = x[g.decision(src.root)], x[g.decision(dst.root)]
    if len(a_keys) == 1:
        return pulp.lpSum(weight * cost[(a_keys[0], b)] * v for b, v in zip(b_of, xd))
    if len(b_keys) == 1:
        return pulp.lpSum(weight * cost[(a, b_keys[0])] * v for a, v in zip(a_of, xs))
    z = {
        (ai, bi): pulp.LpVariable(f"z_{ei}_{ai}_{bi}", lowBound=0)
        for ai in range(len(a_keys))
        for bi in range(len(b_keys))
    }
    src_x, dst_x = _grouped(a_of, a_keys, xs), _grouped(b_of, b_keys, xd)
    for ai in range(len(a_keys)):
        prob += (
            pulp.lpSum(z[ai, bi] for bi in range(len(b_keys))) == pulp.lpSum(src_x[ai]),
            f"edge_src_{ei}_{ai}",
        )
    for bi in range(len(b_keys)):
        prob += (
            pulp.lpSum(z[ai, bi] for ai in range(len(a_keys))) == pulp.lpSum(dst_x[bi]),
            f"edge_dst_{ei}_{bi}",
        )
    return pulp.lpSum(
        weight * cost[(a, b)] * z[ai, bi]
        for ai, a in enumerate(a_keys)
        for bi, b in enumerate(b_keys)
        if cost[(a, b)] > 0
    )


def _grouped(group_of: list, keys: list, x: list) -> list[list]:
    """The variables of ``x`` by the group their strategy falls in."""
    index = {k: i for i, k in enumerate(keys)}
    out: list[list] = [[] for _ in keys]
    for g, v in zip(group_of, x):
        out[index[g]].append(v)
    return out


@contextlib.contextmanager
def _quiet_stdout():
    """highspy prints a banner from C++ whatever ``msg`` says; keep the library quiet."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


def _run(prob: pulp.LpProblem, solver: str, time_limit_s: float | None) -> tuple[str, float, str]:
    if solver == "highs" and pulp.HiGHS().available():
        with _quiet_stdout():
            prob.solve(pulp.HiGHS(msg=False, timeLimit=time_limit_s))
        h = prob.solverModel
        model_status = h.modelStatusToString(h.getModelStatus()).lower()
        if "infeasible" in model_status:
            return "infeasible", math.inf, "highs"
        gap = h.getInfo().mip_gap
        status = "time_limit" if "time limit" in model_status else "optimal"
        return status, (0.0 if status == "optimal" or gap > 1e30 else float(gap)), "highs"
    prob.solve(pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s))
    st = pulp.LpStatus[prob.status].lower()
    if st == "infeasible":
        return "infeasible", math.inf, "cbc"
    return ("optimal" if st == "optimal" else "time_limit"), 0.0, "cbc"


def brute_force(g: StrategyGraph) -> Solution:
    """Enumerate every assignment of the decisions; the reference the ILP is tested against."""
    t0 = time.perf_counter()
    decisions = list(dict.fromkeys(g.decision(r) for r in g.roots))
    best, best_choice = math.inf, {}
    for combo in itertools.product(*(range(len(g.root_cost_s[d])) for d in decisions)):
        chosen = dict(zip(decisions, combo))
        choice = {r: chosen[g.decision(r)] for r in g.roots}
        v = evaluate(g, choice)
        if v < best:
            best, best_choice = v, choice
    return Solution(best_choice, best, "brute_force", 0.0, time.perf_counter() - t0, "enumeration")
