"""Plan time for a 12-layer GPT-2 small (batch 8, sequence 1024) on a 2x4 mesh of H100s.

Prints the seconds spent in each phase: trace, strategies (rules, costs, merging), solve,
and codegen (emitting the distributed graph on a fake 8-rank mesh, in one process).
Run: python benchmarks/plan_time.py [--layers N] [--mesh 2x4]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.testing._internal.distributed.fake_pg import FakeStore

from autopar.models import GPT, GPTConfig, gpt_config
from autopar.passes import apply_plan
from autopar.solver.planner import plan_traced
from autopar.tracer import trace


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--mesh", default="2x4")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    a = ap.parse_args()
    mesh_shape = tuple(int(x) for x in a.mesh.split("x"))
    base = gpt_config("gpt2")
    cfg = GPTConfig(base.vocab, base.max_seq, base.hidden, base.heads, a.layers)
    with torch.device("meta"):
        model = GPT(cfg)
        ids = torch.randint(0, cfg.vocab, (a.batch, a.seq))
    t0 = time.perf_counter()
    traced = trace(model, (), {"input_ids": ids, "labels": ids.clone()})
    t_trace = time.perf_counter() - t0
    plan = plan_traced(traced, mesh_shape, gpu="h100")
    world = 1
    for n in mesh_shape:
        world *= n
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    mesh = init_device_mesh("cpu", mesh_shape)
    t0 = time.perf_counter()
    apply_plan(traced.gm, plan, mesh)
    t_codegen = time.perf_counter() - t0
    dist.destroy_process_group()
    n_nodes = len(plan.nodes)
    print(f"GPT-2 small shape, {a.layers} layers, batch {a.batch}, seq {a.seq}, mesh {a.mesh}, h100")
    print(
        f"graph nodes {n_nodes}, decision nodes {plan.solver['decision_nodes']}, "
        f"edges {plan.solver['edges']}, ILP variables {plan.solver['variables']}"
    )
    print(f"trace      {t_trace:7.2f} s")
    print(f"strategies {plan.timings_s['strategies_s']:7.2f} s")
    status = f"({plan.solver['status']}, gap {plan.solver['gap']:.2%})"
    print(f"solve      {plan.timings_s['solve_s']:7.2f} s  {status}")
    print(f"codegen    {t_codegen:7.2f} s")
    total = t_trace + plan.timings_s["strategies_s"] + plan.timings_s["solve_s"] + t_codegen
    print(f"total      {total:7.2f} s   estimated step {plan.estimated_step_s * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
