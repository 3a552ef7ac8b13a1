"""Repeated blocks share decisions: the ILP's size is flat in depth, the optimum is kept on
uniform stacks, and only identical blocks with more than one decision are tied."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from autopar import make_plan
from autopar.cost.hardware import get_hardware
from autopar.models import GPT, GPTConfig, zoo
from autopar.solver.graph import build
from autopar.solver.ilp import evaluate, solve
from autopar.solver.repeats import find_repeats
from autopar.tracer import trace


def _traced(family: str, layers: int):
    with torch.device("meta"):
        if family == "gpt":
            model = GPT(GPTConfig(96, 64, 32, 4, layers))
            ids = torch.randint(0, 96, (8, 16))
            kwargs = {"input_ids": ids, "labels": ids.clone()}
        else:
            model, kwargs = zoo.build(
                "llama3-8b", "tiny", batch=8, seq=16, overrides={"num_hidden_layers": layers}
            )
    return trace(model, (), kwargs)


@pytest.mark.parametrize("family", ["gpt", "llama"])
@pytest.mark.parametrize("mesh", [(4,), (2, 2)])
def test_shared_decisions_flat_in_depth_and_optimal(family, mesh):
    hw = get_hardware("h100")
    shallow, deep = _traced(family, 2), _traced(family, 4)
    g2 = build(shallow.gm, mesh, hw, shallow.trainable)
    g4 = build(deep.gm, mesh, hw, deep.trainable)
    block_of = find_repeats(deep.gm.graph).block
    s2, s4 = solve(g2), solve(g4)
    assert s4.n_variables == s2.n_variables
    assert len({g4.decision(r) for r in g4.roots}) == len({g2.decision(r) for r in g2.roots})
    # every shared root lies in a later block and takes a root of block 0 with the same choices
    prefix = "blocks" if family == "gpt" else "model.layers"
    assert {block_of[r] for r in g4.shared} == {(prefix, i) for i in range(1, 4)}
    for r, t in g4.shared.items():
        assert block_of[t] == (prefix, 0)
        assert g4.nodes[r].strategies == g4.nodes[t].strategies
        assert s4.choice[r] == s4.choice[t]
    assert g4.shared_blocks == [f"{prefix}.{{1-3}} share the decisions of {prefix}.0"]
    # the objective is exact for the tied choice, and tying costs nothing on a uniform stack
    assert evaluate(g4, s4.choice) == pytest.approx(s4.objective_s, rel=1e-12)
    free = solve(build(deep.gm, mesh, hw, deep.trainable, share_blocks=False))
    assert free.n_variables > 2 * s4.n_variables
    assert s4.objective_s == pytest.approx(free.objective_s, rel=1e-9)


def test_strategies_computed_once_per_distinct_node():
    hw = get_hardware("h100")
    counts = []
    for layers in (2, 6):
        t = _traced("llama", layers)
        g = build(t.gm, (2, 2), hw, t.trainable)
        counts.append(len({id(nc.strategies) for nc in g.nodes.values()}))
    assert counts[0] == counts[1]


class _Block(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.relu(self.up(x)))


class _Stack(nn.Module):
    def __init__(self, width: int, hiddens: list[int]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Block(width, h) for h in hiddens)
        self.lin = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return self.lin(x).sum()


def test_only_identical_multi_decision_blocks_share():
    t = trace(_Stack(16, [32, 64, 32, 64, 48]), (torch.randn(8, 16),))
    g = build(t.gm, (2, 2), get_hardware("cpu"), t.trainable)
    block_of = find_repeats(t.gm.graph).block
    tied = {(block_of[r], block_of[s]) for r, s in g.shared.items()}
    # blocks 2 and 3 repeat blocks 0 and 1; block 4 (hidden 48) is unlike any; the Sequential's
    # single linear layers (one decision each) stay free to alternate layouts
    assert tied == {(("blocks", 2), ("blocks", 0)), (("blocks", 3), ("blocks", 1))}
    assert sorted(g.shared_blocks) == [
        "blocks.{2} share the decisions of blocks.0",
        "blocks.{3} share the decisions of blocks.1",
    ]


def test_plan_lists_shared_blocks():
    with torch.device("meta"):
        model = GPT(GPTConfig(96, 64, 32, 4, 3))
        ids = torch.randint(0, 96, (8, 16))
    plan = make_plan(model, (), (2, 2), example_kwargs={"input_ids": ids, "labels": ids.clone()})
    assert plan.solver["shared_blocks"] == ["blocks.{1-2} share the decisions of blocks.0"]
    assert "blocks.{1-2} share the decisions of blocks.0" in plan.report()
