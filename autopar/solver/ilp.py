r"""The integer linear program that chooses every decision node's strategy.

Sets: decision nodes (roots) ``r`` with strategies ``j in S_r``; edges ``e = (u -> v)``
between different roots. On an edge, the producer's strategies are grouped by the output
spec they give the tensor (``a in A_e``) and the consumer's by the input spec and gradient
spec they need (``b in B_e``); ``c_e(a, b)`` is the resharding time forward plus the
gradient's way back.

Variables: ``x[r, j]`` binary (root r uses strategy j); ``z[e, a, b] >= 0`` continuous.

Objective (estimated training step time, seconds)::

    minimize  sum_r sum_j cost_r(j) x[r, j]  +  sum_e sum_{a, b} c_e(a, b) z[e, a, b]

``cost_r(j)`` holds compute (forward and backward), optimizer step, the merged followers'
and leaves' costs and the folded edges' resharding (see ``solver.graph``).

Named constraints::

    one_strategy[r]:    sum_j x[r, j] = 1
    edge_src[e, a]:     sum_b z[e, a, b] = sum_{j : out(j) = a} x[u, j]
    edge_dst[e, b]:     sum_a z[e, a, b] = sum_{k : in(k) = b} x[v, k]
    memory_budget:      sum_r sum_j mem_r(j) x[r, j] <= budget        (when a budget is given)

``edge_src``/``edge_dst`` make ``z[e]`` a transport plan between two one-hot marginals, so
``z[e, a, b] = X_a Y_b`` exactly at integer points; the formulation is tight, so the LP
relaxation is usually integral. An edge whose producer (or consumer) side has a single group
needs no ``z``: its cost is linear in the other side's ``x``. The memory term is the
per-device sum of parameter, gradient and optimizer-state bytes plus every saved activation
(the peak of a training step without recomputation).
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
from autopar.solver.graph import EdgeUse, StrategyGraph, grad_spec


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
    a_of = [src.strategies[src.pick[j]].out for j in range(len(g.root_cost_s[src.root]))]
    b_strats = [dst.strategies[dst.pick[k]] for k in range(len(g.root_cost_s[dst.root]))]
    b_of = [(s.ins[e.arg], grad_spec(s, e.arg)) for s in b_strats]
    a_keys = list(dict.fromkeys(a_of))
    b_keys = list(dict.fromkeys(b_of))
    rep = {b: s for b, s in zip(b_of, b_strats)}
    cost = {(a, b): g.edge_cost_s(e, a, rep[b]) for a in a_keys for b in b_keys}
    return a_of, b_of, a_keys, b_keys, cost


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
    x = {
        r: [pulp.LpVariable(f"x_{i}_{j}", cat="Binary") for j in range(len(g.root_cost_s[r]))]
        for i, r in enumerate(g.roots)
    }
    mem_expr = pulp.lpSum(m * v for r in g.roots for m, v in zip(g.root_memory_bytes[r], x[r]))
    if objective == "memory":
        terms = [mem_expr]
    else:
        terms = [pulp.lpSum(c * v for r in g.roots for c, v in zip(g.root_cost_s[r], x[r]))]
    for r in g.roots:
        prob += pulp.lpSum(x[r]) == 1, f"one_strategy_{r}"
    if objective == "time":
        for ei, e in enumerate(g.edges):
            terms.append(_edge_terms(g, e, ei, x, prob))
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
    choice = {r: max(range(len(x[r])), key=lambda j: x[r][j].value() or 0.0) for r in g.roots}
    return Solution(choice, evaluate(g, choice), status, gap, time.perf_counter() - t0, name, n_vars)


def _edge_terms(g: StrategyGraph, e: EdgeUse, ei: int, x, prob: pulp.LpProblem):
    src, dst = g.nodes[e.src], g.nodes[e.dst]
    a_of, b_of, a_keys, b_keys, cost = _edge_groups(g, e)
    xs, xd = x[src.root], x[dst.root]
    if len(a_keys) == 1:
        return pulp.lpSum(cost[(a_keys[0], b)] * v for b, v in zip(b_of, xd))
    if len(b_keys) == 1:
        return pulp.lpSum(cost[(a, b_keys[0])] * v for a, v in zip(a_of, xs))
    z = {
        (ai, bi): pulp.LpVariable(f"z_{ei}_{ai}_{bi}", lowBound=0)
        for ai in range(len(a_keys))
        for bi in range(len(b_keys))
    }
    for ai, a in enumerate(a_keys):
        prob += (
            pulp.lpSum(z[ai, bi] for bi in range(len(b_keys)))
            == pulp.lpSum(v for aa, v in zip(a_of, xs) if aa == a),
            f"edge_src_{ei}_{ai}",
        )
    for bi, b in enumerate(b_keys):
        prob += (
            pulp.lpSum(z[ai, bi] for ai in range(len(a_keys)))
            == pulp.lpSum(v for bb, v in zip(b_of, xd) if bb == b),
            f"edge_dst_{ei}_{bi}",
        )
    return pulp.lpSum(
        cost[(a, b)] * z[ai, bi]
        for ai, a in enumerate(a_keys)
        for bi, b in enumerate(b_keys)
        if cost[(a, b)] > 0
    )


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
    """Enumerate every assignment of the roots; the reference the ILP is tested against."""
    t0 = time.perf_counter()
    roots = g.roots
    best, best_choice = math.inf, {}
    for combo in itertools.product(*(range(len(g.root_cost_s[r])) for r in roots)):
        choice = dict(zip(roots, combo))
        v = evaluate(g, choice)
        if v < best:
            best, best_choice = v, choice
    return Solution(best_choice, best, "brute_force", 0.0, time.perf_counter() - t0, "enumeration")
