"""End-to-end plan time against model depth and mesh size: a LLaMA-3-8B-shaped model.

HF LlamaForCausalLM at LLaMA-3-8B's widths (hidden 4096, 32 heads, 8 KV heads, FFN 14336,
vocab 128256), batch 16, sequence 8192, built on the meta device, at several depths; planned
for meshes of 8, 64 and 1024 H100s. Each row is one whole run: trace (torch.export), strategies
(rules, costs, merging, repeated blocks), solve (ILP), codegen (emitting the distributed
module on a fake process group of the mesh's size, in this one process).

Run: python benchmarks/plan_scaling.py [--depths 2,8,32,80] [--meshes 8,8x8,128x8]
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.testing._internal.distributed.fake_pg import FakeStore

from autopar.models import zoo
from autopar.passes import apply_plan
from autopar.solver.planner import plan_traced
from autopar.tracer import trace


def plan_once(layers: int, mesh_shape: tuple[int, ...], batch: int, seq: int) -> dict:
    with torch.device("meta"):
        model, inputs = zoo.build("llama3-8b", batch=batch, seq=seq, overrides={"num_hidden_layers": layers})
    t0 = time.perf_counter()
    traced = trace(model, (), inputs)
    trace_s = time.perf_counter() - t0
    plan = plan_traced(traced, mesh_shape, gpu="h100")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=math.prod(mesh_shape))
    try:
        t0 = time.perf_counter()
        apply_plan(traced.gm, plan, init_device_mesh("cpu", mesh_shape))
        codegen_s = time.perf_counter() - t0
    finally:
        dist.destroy_process_group()
    t = plan.timings_s
    return {
        "trace_s": trace_s,
        "strategies_s": t["strategies_s"],
        "solve_s": t["solve_s"],
        "codegen_s": codegen_s,
        "total_s": trace_s + t["strategies_s"] + t["solve_s"] + codegen_s,
        "nodes": len(plan.nodes),
        "decisions": plan.solver["decision_nodes"],
        "variables": plan.solver["variables"],
        "status": plan.solver["status"],
        "step_ms": plan.estimated_step_s * 1e3,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depths", default="2,8,32,80")
    ap.add_argument("--meshes", default="8,8x8,128x8")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=8192)
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    print(f"LLaMA-3-8B shape, batch {a.batch}, seq {a.seq}, h100 prices; seconds on this machine")
    print(
        f"{'layers':>6} {'mesh':>6} {'trace':>6} {'strat':>6} {'solve':>6} {'codegen':>7} "
        f"{'total':>6} {'nodes':>6} {'decis':>5} {'vars':>6} {'status':8} {'step_ms':>9}"
    )
    for mesh_text in a.meshes.split(","):
        mesh = tuple(int(x) for x in mesh_text.split("x"))
        for layers in (int(d) for d in a.depths.split(",")):
            r = plan_once(layers, mesh, a.batch, a.seq)
            print(
                f"{layers:>6} {mesh_text:>6} {r['trace_s']:6.2f} {r['strategies_s']:6.2f} "
                f"{r['solve_s']:6.2f} {r['codegen_s']:7.2f} {r['total_s']:6.2f} {r['nodes']:6d} "
                f"{r['decisions']:5d} {r['variables']:6d} {r['status']:8} {r['step_ms']:9.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
