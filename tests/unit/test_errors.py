"""Bad input gets an AutoparError subclass that names the node, op or dimension."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from autopar import (
    AutoparError,
    InfeasibleBudgetError,
    ShardingError,
    StalePlanError,
    TraceError,
    UnknownGPUError,
    load_plan,
    make_plan,
)
from autopar.models import MLP
from autopar.tracer import trace


def _meta_mlp(hidden: int = 64, batch: int = 8):
    with torch.device("meta"):
        return MLP(hidden, 4 * hidden), (torch.randn(batch, hidden), torch.randn(batch, hidden))


def test_pinned_layout_that_does_not_divide_names_the_input_and_dim():
    model, inputs = _meta_mlp(batch=6)
    with pytest.raises(ShardingError, match=r"input 'x'.*shape \(6, 64\).*\(4,\)"):
        make_plan(model, inputs, (4,), strategy="dp")


def test_unknown_gpu():
    model, inputs = _meta_mlp()
    with pytest.raises(UnknownGPUError, match="'b300'.*a100, cpu, h100, h200"):
        make_plan(model, inputs, (2,), gpu="b300")


def test_unknown_strategy():
    model, inputs = _meta_mlp()
    with pytest.raises(AutoparError, match="'zero9'.*auto, dp, megatron"):
        make_plan(model, inputs, (2,), strategy="zero9")


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * 2


class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: not exportable
            return x
        return -x


def test_untraceable_model_names_module_and_line():
    with pytest.raises(TraceError) as err:
        trace(Branchy(), (torch.randn(4, 4),))
    msg = str(err.value)
    assert "inner (Gate)" in msg
    assert "test_errors.py:" in msg and "forward" in msg


def test_stale_plan_is_refused_with_the_first_difference(tmp_path):
    model, inputs = _meta_mlp(hidden=64)
    path = tmp_path / "plan.json"
    make_plan(model, inputs, (2,), gpu="h100").save(path)
    other, other_inputs = _meta_mlp(hidden=32)
    plan = load_plan(path)
    with pytest.raises(StalePlanError, match=r"node 0 differs.*fc1.weight \[256, 64\].*\[128, 32\]"):
        plan.check_matches(trace(other, other_inputs).gm, (2,))
    with pytest.raises(StalePlanError, match="mesh"):
        plan.check_matches(trace(model, inputs).gm, (4,))


def test_plan_file_with_another_format_version_is_refused(tmp_path):
    model, inputs = _meta_mlp()
    plan = make_plan(model, inputs, (2,))
    plan.format_version = 999
    path = tmp_path / "old.json"
    plan.save(path)
    with pytest.raises(StalePlanError, match="format version 999"):
        load_plan(path)


def test_infeasible_budget_reports_the_smallest_budget_that_fits():
    model, inputs = _meta_mlp(hidden=256)
    with pytest.raises(InfeasibleBudgetError) as err:
        make_plan(model, inputs, (4,), memory_budget="64KiB")
    need = err.value.min_budget_bytes
    assert need > 64 * 1024
    plan = make_plan(model, inputs, (4,), memory_budget=need)
    assert plan.peak_memory_bytes <= need
