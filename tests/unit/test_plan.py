"""Plans are data: JSON round trip, report, fallback ops."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from autopar import load_plan, make_plan
from autopar.models import GPT, GPTConfig
from autopar.solver.plan import FORMAT_VERSION


def _gpt_plan(mesh=(2, 2), strategy="auto"):
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab=128, max_seq=32, hidden=64, heads=4, layers=2))
        ids = torch.randint(0, 128, (8, 32))
    return make_plan(
        model,
        (),
        mesh,
        example_kwargs={"input_ids": ids, "labels": ids.clone()},
        gpu="cpu",
        strategy=strategy,
    )


def test_plan_json_round_trip(tmp_path):
    plan = _gpt_plan()
    path = tmp_path / "p.json"
    plan.save(path)
    data = json.loads(path.read_text())
    assert data["format_version"] == FORMAT_VERSION == 4 and data["mesh_shape"] == [2, 2]
    again = load_plan(path)
    assert again == plan


def test_report_lists_layers_layouts_and_costs():
    plan = _gpt_plan(strategy="megatron")
    text = plan.report()
    # column-parallel q and a row-parallel second MLP linear (which of the near-equal layouts
    # attn.proj takes is within the solver's gap on this tiny model)
    rows = {line.split()[0]: line for line in text.splitlines() if line.strip()}
    assert "q.weight=RS0" in rows["blocks.0.attn"] and "weight=RS1" in rows["blocks.0.fc2"]
    assert "compute ms" in text and "fallback ops" in text
    assert plan.fallback_ops == []


class Unusual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.erfinv(torch.tanh(self.lin(x)) * 0.5).sum()


def test_op_without_rule_is_replicated_warned_and_listed():
    with torch.device("meta"):
        model, x = Unusual(), torch.randn(8, 16)
    with pytest.warns(UserWarning, match="aten.erfinv.default"):
        plan = make_plan(model, (x,), (4,))
    assert plan.fallback_ops == ["aten.erfinv.default"]
    assert plan.node("erfinv").spec == "R"
    assert "aten.erfinv.default" in plan.report()


class EllipsisEinsum(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...ij,...jk->...ik", a, b).sum()


def test_einsum_the_rule_does_not_cover_takes_the_fallback_path():
    with torch.device("meta"):
        a, b = torch.randn(4, 8, 8), torch.randn(4, 8, 8)
    with pytest.warns(UserWarning, match="aten.einsum.default"):
        plan = make_plan(EllipsisEinsum(), (a, b), (4,))
    assert plan.fallback_ops == ["aten.einsum.default"]
