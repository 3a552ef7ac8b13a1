"""Memory-aware plans on a GPT-2 1.5B-wide model (4 layers, meta device, 4 H100s): the budget
sweep's known answers, the recompute flags, the infeasible budget's floor, and the probe of
what ops keep for backward."""

from __future__ import annotations

import pytest
import torch

from autopar import InfeasibleBudgetError, make_plan
from autopar.cost.memory import saved_for_backward
from autopar.models import zoo
from autopar.solver.rules.base import tensor_args
from autopar.tracer import trace


@pytest.fixture(scope="module")
def gpt():
    with torch.device("meta"):
        return zoo.build("gpt2-1.5b", batch=4, seq=256, overrides={"n_layer": 4})


def _plan(gpt, budget=None):
    model, inputs = gpt
    return make_plan(model, (), (4,), example_kwargs=inputs, gpu="h100", memory_budget=budget)


def test_budget_sweep_known_answers(gpt):
    free = _plan(gpt)
    assert free.recompute == [] and not any(n.recompute for n in free.nodes)
    with pytest.raises(InfeasibleBudgetError) as err:
        _plan(gpt, 1)
    floor = err.value.min_budget_bytes
    assert floor < 0.8 * free.peak_memory_bytes
    assert _plan(gpt, "1TiB").estimated_step_s == pytest.approx(free.estimated_step_s)
    previous = free.estimated_step_s
    plans = []
    for f in (1.0, 0.6, 0.3, 0.0):
        budget = int(floor + f * (free.peak_memory_bytes - floor)) + 1
        plan = _plan(gpt, budget)
        assert plan.peak_memory_bytes <= budget
        assert plan.estimated_step_s >= previous * (1 - 1e-4)  # less memory never buys time (solver gap 1e-4)
        previous = plan.estimated_step_s
        plans.append(plan)
    assert plans[0].recompute == []
    tight = plans[-1]
    assert tight.recompute == ["transformer.h.0"]  # the class of the four identical layers
    flagged = {n.recompute for n in tight.nodes if n.recompute}
    assert flagged == {f"transformer.h.{i}" for i in range(4)}
    assert tight.estimated_step_s > free.estimated_step_s
    assert tight.memory["peak_bytes"] == tight.peak_memory_bytes
    assert "recompute" in tight.report() and "transformer.h.0" in tight.report()


def test_budget_below_the_floor_names_the_smallest_budget(gpt):
    with pytest.raises(InfeasibleBudgetError) as err:
        _plan(gpt, "1MiB")
    floor = err.value.min_budget_bytes
    assert f"{floor} bytes" in str(err.value) and "recomputing" in str(err.value)
    assert _plan(gpt, floor + 1).peak_memory_bytes <= floor + 1


def test_probe_finds_what_ops_keep():
    model, inputs = zoo.build("gpt2-124m", "tiny", batch=2, seq=8)
    gm = trace(model, (), inputs).gm
    by_op = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and str(node.target) not in by_op:
            args = tensor_args(node)
            by_op[str(node.target)] = saved_for_backward(node, args, [True] * len(args))
    assert by_op["aten.addmm.default"].inputs == (1, 2)  # the input and the weight, not the bias
    assert by_op["aten.tanh.default"].output and by_op["aten.tanh.default"].inputs == ()
    assert by_op["aten.layer_norm.default"].extra_bytes > 0  # per-row mean and reciprocal std
    sdpa = by_op["aten.scaled_dot_product_attention.default"]
    assert sdpa.output and 0 in sdpa.inputs
