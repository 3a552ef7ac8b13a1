"""What the ILP turned down: for each decision, its cheapest other strategies and what each
would add to the step, the rest of the plan held fixed.

A decision's change touches only its own cost vector and the edges that meet it; edges that
repeat across identical blocks are priced once with their multiplicity (``ilp.distinct_edges``),
so this is cheap even for deep models. Time only: under a memory budget an alternative may not
fit (``autopar show --explain`` says so).
"""

from __future__ import annotations

from collections import defaultdict

from autopar.solver.graph import StrategyGraph
from autopar.solver.ilp import _decision_costs, distinct_edges
from autopar.solver.specs import short


def alternatives(g: StrategyGraph, choice: dict[str, int], k: int = 5) -> dict[str, list[dict]]:
    """Decision -> up to ``k`` other strategies, cheapest first: the decision root's layout
    (output and inputs) and ``delta_s``, the step time it would add."""
    cost = _decision_costs(g)
    chosen = {g.decision(r): j for r, j in choice.items()}
    touching: dict[str, list] = defaultdict(list)
    for e, weight in distinct_edges(g):
        ds, dd = g.decision(g.nodes[e.src].root), g.decision(g.nodes[e.dst].root)
        touching[ds].append((e, weight))
        if dd != ds:
            touching[dd].append((e, weight))

    def spec(name: str, pick: dict[str, int]):
        nc = g.nodes[name]
        return nc.strategies[nc.pick[pick.get(g.decision(nc.root), chosen[g.decision(nc.root)])]]

    def edges_s(d: str, j: int) -> float:
        pick = {d: j}
        return sum(w * g.edge_cost_s(e, spec(e.src, pick).out, spec(e.dst, pick)) for e, w in touching[d])

    out: dict[str, list[dict]] = {}
    for d, vec in cost.items():
        base = vec[chosen[d]] + edges_s(d, chosen[d])
        root = g.nodes[d]
        seen, rows = {short(root.strategies[root.pick[chosen[d]]].out)}, []
        for j in sorted(range(len(vec)), key=lambda j: vec[j]):
            s = root.strategies[root.pick[j]]
            label = short(s.out) + " <- " + ",".join(short(x) for x in s.ins)
            if j == chosen[d] or label in seen:
                continue
            seen.add(label)
            rows.append(
                {
                    "out": short(s.out),
                    "ins": [short(x) for x in s.ins],
                    "delta_s": vec[j] + edges_s(d, j) - base,
                }
            )
        rows.sort(key=lambda r: r["delta_s"])
        out[d] = rows[:k]
    return out
