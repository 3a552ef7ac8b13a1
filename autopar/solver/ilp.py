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
folded edges' resharding (see ``solver.graph``). Under a budget a decision's strategies
include its parameters' modes (``solver.zero``: ZeRO-2, ZeRO-3, offload), each priced in
``cost_d`` and in the memory terms below, so they need no variables of their own.

Named constraints::

    one_strategy[d]:    sum_j x[d, j] = 1
    edge_src[e, a]:     sum_b z[e, a, b] = sum_{j : out(j) = a} x[d(u), j]
    edge_dst[e, b]:     sum_a z[e, a, b] = sum_{k : in(k) = b} x[d(v), k]

With a memory budget (or ``objective="memory"``, which minimizes ``peak`` instead), the
liveness model of ``solver.memory`` enters: segments ``k`` of the forward pass in execution
order, each with saved-activation bytes ``A_k``, gradient bytes ``G_k``, block-input bytes
``I_k`` and forward time ``F_k`` (all linear in ``x``); ``rc[k]`` binary per segment ``k``
that is a repeated block (recompute it in backward); ``U(.)`` an upper bound of an expression
over all strategies; continuous ``kept_k``, ``B_k``, ``H_k``, ``peak``, ``t_k >= 0``::

    earliest_first[k]:  rc[k'] >= rc[k]   (k' the block of k's class before k: what an earlier
                                           block keeps is live longer, and the blocks are alike)
    kept_saved[k]:      kept_k >= A_k - U(A_k) rc[k]           (a block's segment; else kept_k = A_k)
    kept_inputs[k]:     kept_k >= I_k
    kept_before[k]:     B_k = B_{k-1} + kept_{k-1},  B_0 = 0   (what earlier segments keep)
    grads_from[k]:      H_k = H_{k+1} + G_k                    (gradients alive at k's backward)
    transient[k, n]:    T_k >= T_n   (n in segment k: gradients while op n's backward runs,
                                      or the buffer a layout change into segment k allocates)
    liveness[k]:        peak >= resident + H_k + B_k + A_k + T_k   (backward of segment k)
    optimizer_step:     peak >= resident + H_0
    recompute_time[k]:  t_k >= F_k - U(F_k) (1 - rc[k])
    memory_budget:      peak <= budget

and the objective adds ``sum_k t_k``. ``resident`` sums the decisions' resident bytes
(weights, AdamW moments, buffers, inputs). At integer points ``kept_k`` and ``t_c`` are pushed
to their bounds only when that matters, so every constraint holds for the true values.

Without the rows from ``earliest_first`` down, the budgeted problem is relaxed (``rc = 0``
adds no time, and every plan stays a candidate): where the relaxation's optimum fits the
budget, it is the budgeted optimum too, and ``solve`` returns it without building those rows,
which make the problem far harder (LLaMA 3 8B on a 2x4 mesh, the budget at its free plan's
peak: 140 s with them, 26 s without; 21 s with no budget).

``edge_src``/``edge_dst`` make ``z[e]`` a transport plan between two one-hot marginals, so
``z[e, a, b] = X_a Y_b`` exactly at integer points; the formulation is tight, so the LP
relaxation is usually integral. An edge whose producer (or consumer) side has a single group
needs no ``z``: its cost is linear in the other side's ``x``. Shared decisions make the ILP's
size independent of the model's depth; the objective stays exact, since each member's costs
are summed into its decision.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import sys
import time
from dataclasses import dataclass, field

import pulp

from autopar.errors import InfeasibleBudgetError, SolverTimeLimitError
from autopar.solver.graph import EdgeUse, StrategyGraph, edge_key, grad_spec
from autopar.solver.linear import weighted_sum
from autopar.solver.memory import MemoryModel, build_memory_model, copy_bytes, value


@dataclass
class Solution:
    choice: dict[str, int]  # root -> strategy index
    objective_s: float
    status: str  # optimal | time_limit | brute_force
    gap: float
    solve_s: float
    solver: str
    n_variables: int = 0
    #: the repeated blocks ("model.layers.3") recomputed in backward
    recomputed: set = field(default_factory=set)
    #: peak bytes per device and its parts (``MemoryModel.evaluate``)
    memory: dict = field(default_factory=dict)
    #: the graph nodes that run again in backward -> their block instance
    recomputed_nodes: dict = field(default_factory=dict)


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


def edge_identity(g: StrategyGraph, e: EdgeUse) -> tuple:
    """Edges with equal identities connect the same two decisions with the same group maps and
    prices (repeated blocks): the ILP prices them with one set of variables."""
    src, dst = g.nodes[e.src], g.nodes[e.dst]
    key = (g.decision(src.root), g.decision(dst.root), id(src.strategies), id(src.pick))
    return key + (id(dst.strategies), id(dst.pick), e.arg, edge_key(src, dst))


def distinct_edges(g: StrategyGraph) -> list[tuple[EdgeUse, int]]:
    """The ILP's edges with their multiplicities."""
    count: dict[tuple, list] = {}
    for e in g.edges:
        count.setdefault(edge_identity(g, e), [e, 0])[1] += 1
    return [(e, n) for e, n in count.values()]


def _decision_costs(g: StrategyGraph) -> dict[str, list[float]]:
    """cost_d: the sum over each decision's roots."""
    cost: dict[str, list[float]] = {}
    for r in g.roots:
        acc = cost.setdefault(g.decision(r), [0.0] * len(g.root_cost_s[r]))
        for j, c in enumerate(g.root_cost_s[r]):
            acc[j] += c
    return cost


def evaluate(g: StrategyGraph, choice: dict[str, int]) -> float:
    """The objective of a complete assignment (the same sum the ILP minimizes)."""
    total = sum(g.root_cost_s[r][choice[r]] for r in g.roots)
    for e in g.edges:
        total += g.edge_cost_s(e, g.spec_of(e.src, choice).out, g.spec_of(e.dst, choice))
    return total


def solve(
    g: StrategyGraph,
    *,
    memory_budget_bytes: int | None = None,
    time_limit_s: float | None = None,
    solver: str = "highs",
    objective: str = "time",
) -> Solution:
    """Solve the ILP; with a time limit, return the best plan found and its gap. The memory
    constraints (and recomputation choices) enter only with a budget or ``objective="memory"``.
    Under a budget the time-only problem is solved first, and its plan kept if it fits (the
    relaxation, in the module docstring)."""
    t0, limit_s = time.perf_counter(), time_limit_s
    if memory_budget_bytes is not None and objective == "time":
        try:
            free = solve(g, time_limit_s=time_limit_s, solver=solver)
        except SolverTimeLimitError as exc:
            raise _no_plan(exc.n_vars, g, memory_budget_bytes, limit_s) from None
        if free.memory["peak_bytes"] <= memory_budget_bytes:
            return free
        if time_limit_s is not None:
            time_limit_s = max(time_limit_s - free.solve_s, 1.0)
    prob = pulp.LpProblem("autopar", pulp.LpMinimize)
    cost = _decision_costs(g)
    x = {
        d: [pulp.LpVariable(f"x_{i}_{j}", cat="Binary") for j in range(len(cost[d]))]
        for i, d in enumerate(cost)
    }
    for i, d in enumerate(x):
        prob += pulp.lpSum(x[d]) == 1, f"one_strategy_{i}"
    mm = build_memory_model(g)
    edges = _Transport(g, x, prob)
    rc: dict = {}
    terms = []
    if memory_budget_bytes is not None or objective == "memory":
        peak, rc, recompute_s = mm.constrain(prob, x, edges.copy_bytes, lambda e: edge_identity(g, e))
        terms = [peak] if objective == "memory" else recompute_s
        if memory_budget_bytes is not None:
            prob += peak <= memory_budget_bytes / mm.unit_bytes, "memory_budget"
    if objective == "time":
        terms.append(weighted_sum((c, v) for d in x for c, v in zip(cost[d], x[d])))
        for e, weight in distinct_edges(g):
            terms.append(edges.time_s(e, weight))
    prob += pulp.lpSum(terms)
    n_vars = len(prob.variables())
    status, gap, name = _run(prob, solver, time_limit_s)
    if status == "no_solution":
        raise _no_plan(n_vars, g, memory_budget_bytes, limit_s)
    if status == "infeasible" and memory_budget_bytes is not None:
        need = solve(g, objective="memory", solver=solver, time_limit_s=time_limit_s).memory["peak_bytes"]
        raise InfeasibleBudgetError(
            f"no plan fits memory_budget={memory_budget_bytes} bytes per device on mesh "
            f"{g.mesh_shape}; the smallest plan needs {need:.0f} bytes ({need / 2**30:.2f} GiB), "
            "recomputing repeated blocks and sharding or offloading parameters as far as that helps. "
            "Raise the budget or use more devices.",
            int(math.ceil(need)),
        )
    chosen = {d: max(range(len(x[d])), key=lambda j: x[d][j].value() or 0.0) for d in x}
    choice = {r: chosen[g.decision(r)] for r in g.roots}
    recomputed = {mm.segments[k].name for k, v in rc.items() if (v.value() or 0.0) > 0.5}
    objective_s = evaluate(g, choice) + recompute_time_s(mm, choice, recomputed)
    sol = Solution(choice, objective_s, status, gap, time.perf_counter() - t0, name, n_vars)
    sol.recomputed, sol.memory = recomputed, mm.evaluate(choice, recomputed)
    sol.recomputed_nodes = {n: s.name for s in mm.segments if s.name in recomputed for n in s.nodes}
    return sol


def _no_plan(
    n_vars: int, g: StrategyGraph, budget_bytes: int | None, limit_s: float | None
) -> SolverTimeLimitError:
    budget = "" if budget_bytes is None else f" under memory_budget={budget_bytes} bytes"
    return SolverTimeLimitError(
        f"the ILP ({n_vars} variables) found no plan for mesh {g.mesh_shape}{budget} within "
        f"time_limit_s={limit_s}: raise time_limit_s, or leave it unset to solve to the optimum",
        n_vars,
    )


def recompute_time_s(mm: MemoryModel, choice: dict[str, int], recomputed: set) -> float:
    """Forward time of the recomputed blocks, spent again in backward."""
    return sum(value(s.forward_s, choice) for s in mm.segments if s.name in recomputed)


class _Transport:
    """Per distinct edge: its layout pairs ``(a, b)`` and, for each, the ILP expression that is 1
    when the edge carries ``a -> b``: a transport variable ``z[e, a, b]`` when both sides have
    several groups (``edge_src``/``edge_dst``), else the other side's ``x`` of that group. Shared
    by the time objective and the memory constraints."""

    def __init__(self, g: StrategyGraph, x: dict[str, list], prob: pulp.LpProblem) -> None:
        self.g, self.x, self.prob = g, x, prob
        self.cache: dict[tuple, tuple[list, dict]] = {}

    def pairs(self, e: EdgeUse) -> tuple[list, dict]:
        key = edge_identity(self.g, e)
        if key not in self.cache:
            self.cache[key] = self._build(e, len(self.cache))
        return self.cache[key]

    def _build(self, e: EdgeUse, ei: int) -> tuple[list, dict]:
        g = self.g
        src, dst = g.nodes[e.src], g.nodes[e.dst]
        a_of, b_of, a_keys, b_keys, cost = _edge_groups(g, e)
        xs, xd = self.x[g.decision(src.root)], self.x[g.decision(dst.root)]
        src_x, dst_x = _grouped(a_of, a_keys, xs), _grouped(b_of, b_keys, xd)
        if len(a_keys) == 1:
            return [(a_keys[0], b, pulp.lpSum(v)) for b, v in zip(b_keys, dst_x)], cost
        if len(b_keys) == 1:
            return [(a, b_keys[0], pulp.lpSum(v)) for a, v in zip(a_keys, src_x)], cost
        z = {
            (ai, bi): pulp.LpVariable(f"z_{ei}_{ai}_{bi}", lowBound=0)
            for ai in range(len(a_keys))
            for bi in range(len(b_keys))
        }
        for ai in range(len(a_keys)):
            self.prob += (
                pulp.lpSum(z[ai, bi] for bi in range(len(b_keys))) == pulp.lpSum(src_x[ai]),
                f"edge_src_{ei}_{ai}",
            )
        for bi in range(len(b_keys)):
            self.prob += (
                pulp.lpSum(z[ai, bi] for ai in range(len(a_keys))) == pulp.lpSum(dst_x[bi]),
                f"edge_dst_{ei}_{bi}",
            )
        return [(a, b, z[ai, bi]) for ai, a in enumerate(a_keys) for bi, b in enumerate(b_keys)], cost

    def time_s(self, e: EdgeUse, weight: int):
        pairs, cost = self.pairs(e)
        return weighted_sum((weight * cost[(a, b)], v) for a, b, v in pairs if cost[(a, b)] > 0)

    def copy_bytes(self, e: EdgeUse, scale: float):
        """Bytes of the resharded copy ``e``'s consumer keeps for backward (times ``scale``)."""
        pairs, _ = self.pairs(e)
        src = self.g.nodes[e.src]
        size: dict = {}  # bytes of the copy in the layout read (whatever the layout it came in)
        for a, b, _ in pairs:
            if a != b[0] and b[0] not in size:
                size[b[0]] = copy_bytes(self.g, src, a, b[0])
        return weighted_sum((scale * size[b[0]], v) for a, b, v in pairs if a != b[0])


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
    """(status, gap, solver name). ``no_solution``: the time limit ran out before any plan was
    found, and the variables' values mean nothing."""
    if solver == "highs" and pulp.HiGHS().available():
        import highspy  # present: pulp's HiGHS is available

        with _quiet_stdout():
            prob.solve(pulp.HiGHS(msg=False, timeLimit=time_limit_s))
        h = prob.solverModel
        model_status = h.modelStatusToString(h.getModelStatus()).lower()
        if "infeasible" in model_status:
            return "infeasible", math.inf, "highs"
        if h.getInfo().primal_solution_status != highspy.SolutionStatus.kSolutionStatusFeasible:
            return "no_solution", math.inf, "highs"
        gap = h.getInfo().mip_gap
        status = "optimal" if model_status == "optimal" else "time_limit"
        return status, (0.0 if status == "optimal" or gap > 1e30 else float(gap)), "highs"
    prob.solve(pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s))
    st = pulp.LpStatus[prob.status].lower()
    if st == "infeasible":
        return "infeasible", math.inf, "cbc"
    if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        return "no_solution", math.inf, "cbc"
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
