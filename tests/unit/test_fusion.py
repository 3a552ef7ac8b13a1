"""Which chains fuse, how fused plans and vocabulary-parallel losses are priced (no ranks)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from autopar import AutoparError, Plan, PlanFormatError, make_plan
from autopar.cost.comm import collective_time_s
from autopar.cost.hardware import get_hardware
from autopar.cost.memory import Saved
from autopar.cost.pricing import FUSED_BACKWARD_OVER_FORWARD, Pricing, out_bytes
from autopar.models import zoo
from autopar.passes.fuse import fuse_kernels
from autopar.solver.fusion import find_fusions, planned
from autopar.solver.graph import build
from autopar.solver.memory import kept_by
from autopar.solver.rules.base import Strategy
from autopar.solver.rules.loss import inner_collectives
from autopar.solver.specs import parse
from autopar.tracer import trace

H100 = get_hardware("h100")


class BiasGelu(nn.Module):
    """``gelu(x @ w + b)`` written out, and a second GELU whose sum is also read elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 32))
        self.b = nn.Parameter(torch.randn(32))
        self.c = nn.Parameter(torch.randn(32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(x @ self.w + self.b)
        s = h + self.c  # read by the GELU and by the sum below: not fusable
        return (F.gelu(s, approximate="tanh") + s).sum()


def _traced(name: str):
    model, kwargs = zoo.build(name, "tiny", batch=2, seq=8)
    return trace(model, (), kwargs)


def test_hf_chains_are_found_whole():
    gpt2 = find_fusions(_traced("gpt2-124m").gm.graph)
    kinds = sorted(f.kind for f in gpt2)
    assert kinds == ["gelu"] * 2 + ["layer_norm"] * 5
    gelu = next(f for f in gpt2 if f.kind == "gelu")
    assert len(gelu.nodes) == 8 and gelu.consts == {"approximate": "tanh"} and gelu.params == (None,)
    llama = find_fusions(_traced("llama3-8b").gm.graph)
    assert [f.kind for f in llama] == ["rms_norm"] * 5
    for f in llama:  # pow, mean, + eps, rsqrt, mul, the cast back, the weight
        assert len(f.nodes) >= 7 and f.params[0].endswith("norm_weight") and f.consts == {"eps": 1e-6}


def test_a_bias_gelu_fuses_and_a_chain_read_elsewhere_does_not():
    gm = trace(BiasGelu(), (torch.randn(4, 16),)).gm
    fusions = find_fusions(gm.graph)
    assert len(fusions) == 1
    f = fusions[0]
    assert (
        f.kind == "gelu" and f.params == ("b",) and f.consts == {"approximate": "none"} and len(f.nodes) == 2
    )


def test_fused_plans_price_each_chain_as_its_kernel():
    model, kwargs = zoo.build("gpt2-124m", "tiny", batch=8, seq=32)
    fused = make_plan(model, (), (2, 2), example_kwargs=kwargs, gpu="h100", kernels="fused")
    eager = make_plan(model, (), (2, 2), example_kwargs=kwargs, gpu="h100", kernels="eager")
    assert eager.fusions == [] and len(fused.fusions) == 7
    nodes = {n.name: n for n in trace(model, (), kwargs).gm.graph.nodes}
    for f in fused.fusions:
        for name in f["nodes"][:-1]:
            assert fused.node(name).compute_s == 0.0
        tail = fused.node(f["nodes"][-1])
        local_bytes = out_bytes(nodes[tail.name], parse(tail.spec), (2, 2))
        fwd_s = 2 * local_bytes / H100.hbm_bytes_per_s  # one read of the input, one write
        assert tail.compute_s == pytest.approx(fwd_s * (1 + FUSED_BACKWARD_OVER_FORWARD))
    assert fused.estimated_step_s < eager.estimated_step_s
    assert "fused kernels: 7 chains of 21 ops (gelu x2, layer_norm x5)" in fused.report()
    assert "fused kernels: none" in eager.report()


def test_kernels_follow_the_hardware_and_bad_values_are_refused():
    model, kwargs = zoo.build("llama3-8b", "tiny", batch=2, seq=8)
    assert make_plan(model, (), (2, 2), example_kwargs=kwargs, gpu="cpu").fusions == []
    assert len(make_plan(model, (), (2, 2), example_kwargs=kwargs, gpu="h100").fusions) == 5
    with pytest.raises(AutoparError, match="kernels='triton'"):
        make_plan(model, (), (2, 2), example_kwargs=kwargs, kernels="triton")


def test_a_chain_whose_layout_changes_inside_is_planned_unfused():
    model, kwargs = zoo.build("llama3-8b", "tiny", batch=4, seq=16, overrides={"vocab_size": 4096})
    plan = make_plan(
        model, (), (2, 2), example_kwargs=kwargs, gpu="cpu", strategy="megatron", kernels="fused"
    )
    # this plan gathers the first norm's batch-sharded row means inside the chain: it runs unfused
    assert plan.node("mean").spec == "S0R" and plan.node("add_3").input_specs == ["RR"]
    assert len(plan.fusions) == 4 and all("mul_4" not in f["nodes"] for f in plan.fusions)
    assert plan.node("pow_1").compute_s > 0  # priced as the op it is, not as part of a kernel


def test_vocabulary_parallel_loss_declares_and_prices_its_all_reduces():
    model, kwargs = zoo.build("llama3-8b", "tiny", batch=4, seq=16, overrides={"vocab_size": 4096})
    plan = make_plan(model, (), (2, 2), example_kwargs=kwargs, gpu="cpu", strategy="megatron")
    ce = next(n for n in plan.nodes if "cross_entropy" in n.op)
    assert ce.input_specs == ["S0S1", "S0R"]  # batch on the data axis, vocabulary on the other
    node = next(n for n in trace(model, (), kwargs).gm.graph.nodes if n.name == ce.name)
    rows = node.args[0].meta["val"].shape[0]
    s = Strategy(parse(ce.spec), tuple(parse(x) for x in ce.input_specs))
    # on the vocabulary axis: the row maxima, then the sums of exponentials with the target logits
    assert inner_collectives(node, s, (2, 2)) == [
        ("all_reduce", 1, 4 * rows // 2),
        ("all_reduce", 1, 8 * rows // 2),
    ]
    both = Strategy(parse("RR"), (parse("S1S1"), parse("RR")))
    assert [c[1] for c in inner_collectives(node, both, (2, 2))] == [0, 0, 1, 1]
    link = get_hardware("cpu").axis_links((2, 2))[1]
    inner_s = sum(collective_time_s("all_reduce", b, 2, link) for b in (2 * rows, 4 * rows))
    assert Pricing(get_hardware("cpu")).inner_s(node, s, (2, 2)) == pytest.approx(inner_s)
    assert ce.compute_s > inner_s  # the op's own work comes on top


def test_fused_chains_keep_what_their_kernels_keep():
    model, kwargs = zoo.build("gpt2-124m", "tiny", batch=8, seq=32)
    fused = make_plan(model, (), (2, 2), example_kwargs=kwargs, gpu="h100", kernels="fused")
    eager = make_plan(model, (), (2, 2), example_kwargs=kwargs, gpu="h100", kernels="eager")
    # eager, the GELU chain keeps its input, x^3, the tanh and more; fused, only its input
    assert fused.memory["activation_bytes"] < eager.memory["activation_bytes"]
    traced = trace(model, (), kwargs)
    fusions = planned(traced.gm.graph, "fused", hw_fuses=False)
    g = build(traced.gm, (2, 2), H100, traced.trainable)
    gelu = next(f for f in fusions if f.kind == "gelu")
    assert all(kept_by(g, g.nodes[n]) == Saved((), False, 0) for n in gelu.nodes[:-1])
    assert kept_by(g, g.nodes[gelu.tail]) == Saved((), False, 0, others=(gelu.x,))
    norm = next(f for f in fusions if f.kind == "layer_norm")
    rows = 8 * 32
    assert kept_by(g, g.nodes[norm.tail]) == Saved((1, 2), False, 4 * 2 * rows, others=(norm.x,))


def test_a_plan_file_naming_an_unknown_kernel_or_node_is_refused():
    model, kwargs = zoo.build("gpt2-124m", "tiny", batch=2, seq=8)
    plan = make_plan(model, (), (2, 2), example_kwargs=kwargs, gpu="h100")
    for change, says in (
        ({"kind": "softmax"}, "'softmax' is not a known kernel"),
        ({"nodes": ["nope"]}, "nope"),
    ):
        edited = Plan.from_json(plan.to_json())
        edited.fusions[0].update(change)
        with pytest.raises(PlanFormatError, match=says):
            fuse_kernels(trace(model, (), kwargs).gm, edited)
