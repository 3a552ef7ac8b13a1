"""Memory-aware plans on a GPT-2 1.5B-wide model (meta device, H100s): the budget sweep's known
answers (recomputation, ZeRO stages, offload), the infeasible budget's floor, GPT-2 1.5B on one
24 GB device, the pinned ZeRO strategies, and the probe of what ops keep for backward."""

from __future__ import annotations

import pytest
import torch

from autopar import AutoparError, InfeasibleBudgetError, make_plan
from autopar.cost.hardware import get_hardware
from autopar.cost.memory import saved_for_backward
from autopar.models import zoo
from autopar.solver.graph import build
from autopar.solver.ilp import solve
from autopar.solver.rules.base import tensor_args
from autopar.solver.zero import add_param_modes
from autopar.tracer import trace


@pytest.fixture(scope="module")
def gpt():
    with torch.device("meta"):
        return zoo.build("gpt2-1.5b", batch=4, seq=256, overrides={"n_layer": 4})


def _plan(gpt, budget=None):
    model, inputs = gpt
    return make_plan(model, (), (4,), example_kwargs=inputs, gpu="h100", memory_budget=budget)


def _modes(plan) -> set[str]:
    return set(plan.param_modes().values())


def test_budget_sweep_known_answers(gpt):
    free = _plan(gpt)
    assert free.recompute == [] and not any(n.recompute for n in free.nodes)
    assert not _modes(free) & {"zero3", "offload"}
    with pytest.raises(InfeasibleBudgetError) as err:
        _plan(gpt, 1)
    floor = err.value.min_budget_bytes
    assert floor < 0.8 * free.peak_memory_bytes
    huge = _plan(gpt, "1TiB")
    assert huge.estimated_step_s == pytest.approx(free.estimated_step_s)
    assert huge.recompute == [] and not _modes(huge) & {"zero3", "offload"}
    previous = free.estimated_step_s
    plans = []
    for f in (1.0, 0.6, 0.3, 0.0):
        budget = int(floor + f * (free.peak_memory_bytes - floor)) + 1
        plan = _plan(gpt, budget)
        assert plan.peak_memory_bytes <= budget
        assert plan.estimated_step_s >= previous * (1 - 1e-4)  # less memory never buys time (solver gap 1e-4)
        previous = plan.estimated_step_s
        plans.append(plan)
    assert plans[0].recompute == [] and "offload" not in _modes(plans[0])
    # offload (the host link is the slowest way to free memory) comes last: only where
    # recomputation is already on
    assert all(p.recompute for p in plans if "offload" in _modes(p))
    tight = plans[-1]
    assert tight.recompute == [f"transformer.h.{i}" for i in range(4)]  # every layer, at the floor
    assert "offload" in _modes(tight) and "host memory" in tight.report()
    flagged = {n.recompute for n in tight.nodes if n.recompute}
    assert flagged == {f"transformer.h.{i}" for i in range(4)}
    assert tight.estimated_step_s > free.estimated_step_s
    assert tight.memory["peak_bytes"] == tight.peak_memory_bytes
    assert "recompute in backward: transformer.h.{0-3} (4 of 4 blocks)" in tight.report()
    # the number of recomputed layers grows as the budget shrinks, earliest layers first
    counts = [len(p.recompute) for p in plans]
    assert counts == sorted(counts)
    assert all(p.recompute == [f"transformer.h.{i}" for i in range(len(p.recompute))] for p in plans)


def test_zero3_before_recomputation_when_weights_dominate():
    """Data parallel over 2 x 4 with big weights: a budget 22% under the free plan's peak is met
    by gathering weights again in backward (ZeRO-3), not by recomputing; 45% under needs
    kinds of trade, and neither plan is faster than the free one."""
    with torch.device("meta"):
        model, inputs = zoo.build("gpt2-1.5b", batch=16, seq=256, overrides={"n_layer": 4})

    def plan(budget):
        return make_plan(model, (), (2, 4), example_kwargs=inputs, gpu="h100", memory_budget=budget)

    free = plan(None)
    zero3 = plan(int(0.78 * free.peak_memory_bytes))
    assert "zero3" in _modes(zero3) and zero3.recompute == []
    assert zero3.peak_memory_bytes <= 0.78 * free.peak_memory_bytes
    assert zero3.estimated_step_s >= free.estimated_step_s
    both = plan(int(0.55 * free.peak_memory_bytes))
    assert both.recompute and both.recompute[0] == "transformer.h.0"
    assert both.estimated_step_s >= zero3.estimated_step_s
    gathered_again = [n for n in zero3.nodes if n.mode == "zero3"]
    assert all(n.kind == "param" for n in gathered_again)


def test_gpt2_1_5b_fits_one_24gb_device_only_with_offload_and_recompute():
    with torch.device("meta"):
        model, inputs = zoo.build("gpt2-1.5b", batch=8, seq=1024)
    budget = 24 * 2**30
    plan = make_plan(model, (), (1,), example_kwargs=inputs, gpu="a10", memory_budget=budget)
    assert plan.peak_memory_bytes <= budget
    assert plan.recompute and "offload" in _modes(plan)
    report = plan.report()
    assert "recompute in backward: transformer.h.{0-" in report
    assert "host memory, AdamW step on the CPU" in report
    # why both: with nothing in host memory no plan fits (memory is priced alike on every
    # kind of device; "cpu" has no host memory to offload to) ...
    with pytest.raises(InfeasibleBudgetError):
        make_plan(model, (), (1,), example_kwargs=inputs, gpu="cpu", memory_budget=budget)
    # ... and without recomputation the saved activations alone exceed the device
    free = make_plan(model, (), (1,), example_kwargs=inputs, gpu="a10")
    assert free.memory["activation_bytes"] > budget


def test_pinned_zero_strategies():
    with torch.device("meta"):
        model, inputs = zoo.build("gpt2-1.5b", batch=8, seq=128, overrides={"n_layer": 2})
    for strategy, mode in (("zero2", "zero2"), ("zero3", "zero3"), ("zero-offload", "offload")):
        plan = make_plan(model, (), (4,), example_kwargs=inputs, gpu="h100", strategy=strategy)
        params = [n for n in plan.nodes if n.kind == "param"]
        # every op reads its weights whole; the big ones are stored in the strategy's mode
        big = [n for n in params if "c_fc.weight" in n.target or "c_proj.weight" in n.target]
        assert big and all(n.mode == mode for n in big), [(n.target, n.mode) for n in big]
    with pytest.raises(AutoparError, match="zero-offload"):
        make_plan(model, (), (4,), example_kwargs=inputs, gpu="cpu", strategy="zero-offload")


def test_budget_below_the_floor_names_the_smallest_budget(gpt):
    with pytest.raises(InfeasibleBudgetError) as err:
        _plan(gpt, "1MiB")
    floor = err.value.min_budget_bytes
    assert f"{floor} bytes" in str(err.value) and "recomputing" in str(err.value)
    assert _plan(gpt, floor + 1).peak_memory_bytes <= floor + 1


def test_a_budget_the_fastest_plan_meets_is_solved_without_the_liveness_rows():
    """The ILP without the memory rows is a relaxation of the budgeted one: where its optimum
    fits the budget, that is the budgeted optimum; one byte less and the rows decide."""
    with torch.device("meta"):
        model, inputs = zoo.build("gpt2-1.5b", batch=8, seq=128, overrides={"n_layer": 2})
    traced = trace(model, (), inputs)
    g = build(traced.gm, (4,), get_hardware("h100"), traced.trainable)
    add_param_modes(g)
    free = solve(g)
    peak = int(free.memory["peak_bytes"])
    fits = solve(g, memory_budget_bytes=peak)
    assert fits.choice == free.choice and fits.recomputed == set()
    assert fits.n_variables == free.n_variables  # no recompute, kept or peak variables
    tight = solve(g, memory_budget_bytes=peak - 1)
    assert tight.n_variables > free.n_variables and tight.memory["peak_bytes"] <= peak - 1
    assert tight.objective_s >= free.objective_s * (1 - 1e-4)  # within the solver gap


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


def test_mixed_precision_prices_what_runs(gpt):
    model, inputs = gpt
    fp32 = _plan(gpt)
    bf16 = make_plan(model, (), (4,), example_kwargs=inputs, gpu="h100", mixed_precision="bf16")
    assert bf16.mixed_precision == "bf16" and "bf16 compute with master weights" in bf16.report()
    # master weights and AdamW moments stay fp32: 12 bytes a parameter element, as without it
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert bf16.memory["resident_bytes"] >= 12 * n_params / 4 * 0.99
    assert bf16.memory["activation_bytes"] < 0.75 * fp32.memory["activation_bytes"]
    assert bf16.estimated_step_s < 0.5 * fp32.estimated_step_s  # bf16 math peaks 15x fp32 on H100
    with pytest.raises(AutoparError, match="fp8"):
        make_plan(model, (), (4,), example_kwargs=inputs, mixed_precision="fp8")
