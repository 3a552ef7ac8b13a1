"""Linear expressions for the ILP, built term by term into one pulp expression.

``pulp.lpSum(c * v for ...)`` makes an expression for every product and then merges each
into the sum; the ILP's edge and memory terms run to hundreds of thousands of products, and
building them that way took as long as HiGHS's solve (resnet-50, tiny, on a 2x2 mesh with
``memory_budget="min"``: 7.5 s against 9.8 s). ``weighted_sum`` adds the coefficients straight
into one expression, in the same order, so the model HiGHS receives is the same.
"""

from __future__ import annotations

from collections.abc import Iterable

import pulp

Term = pulp.LpVariable | pulp.LpAffineExpression


def weighted_sum(terms: Iterable[tuple[float, Term]]) -> pulp.LpAffineExpression:
    """``sum(c * t for c, t in terms)``: ``t`` a variable or an expression (with its constant)."""
    out = pulp.LpAffineExpression()
    constant = 0.0
    for c, t in terms:
        if isinstance(t, pulp.LpVariable):
            out[t] = out.get(t, 0.0) + c
            continue
        for v, a in t.items():
            out[v] = out.get(v, 0.0) + c * a
        constant += c * t.constant
    out.constant = constant
    return out
