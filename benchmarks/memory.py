"""Budget sweep: what the planner chooses as the memory per device shrinks.

For a zoo model at real size (meta device) on a mesh of H100s: the free plan (no budget), the
smallest budget any plan fits (``InfeasibleBudgetError.min_budget_bytes``), and budgets in
between. Each row: budget -> estimated step time, predicted peak per device and its parts
(resident weights and AdamW moments, gradients, saved activations at the peak), and the
choices: how many parameters are stored sharded (any layout but replicated), how many are in
each mode (ZeRO-2, ZeRO-3, offloaded to the host), which repeated blocks are recomputed.

Run: python benchmarks/memory.py [--model llama3-8b] [--mesh 8] [--gpu h100] [--batch 8]
     [--seq 8192] [--budgets 80GiB,...]   (default: an even sweep between the floor and the
     free peak). GPT-2 1.5B on one 24 GB device:
     python benchmarks/memory.py --model gpt2-1.5b --mesh 1 --gpu a10 --seq 1024 --budgets 24GiB
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from autopar import InfeasibleBudgetError, make_plan
from autopar.cost.units import parse_bytes
from autopar.models import zoo

GIB = 2**30


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--mesh", default="8")
    ap.add_argument("--gpu", default="h100")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--budgets", default="", help="comma-separated sizes; default: a sweep")
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    mesh = tuple(int(x) for x in a.mesh.split("x"))
    with torch.device("meta"):
        model, inputs = zoo.build(a.model, batch=a.batch, seq=a.seq)

    def plan(budget):
        return make_plan(model, (), mesh, example_kwargs=inputs, gpu=a.gpu, memory_budget=budget)

    free = plan(None)
    try:
        plan(1)
        floor = 1
    except InfeasibleBudgetError as exc:
        floor = exc.min_budget_bytes
    print(f"{a.model}, batch {a.batch}, seq {a.seq}, mesh {a.mesh} of {a.gpu} (fp32 weights and AdamW)")
    print(f"free plan: peak {free.peak_memory_bytes / GIB:.2f} GiB; smallest plan: {floor / GIB:.2f} GiB")
    if a.budgets:
        budgets = [parse_bytes(b) for b in a.budgets.split(",")]
    else:
        budgets = [int(floor + f * (free.peak_memory_bytes - floor)) + 1 for f in (1.0, 0.75, 0.5, 0.25, 0.0)]
    print(
        f"{'budget_GiB':>10} {'step_ms':>9} {'peak_GiB':>8} {'resid':>7} {'grads':>7} {'activ':>7} "
        f"{'sharded':>7} {'zero2':>5} {'zero3':>5} {'offl':>5} {'plan_s':>6}  recompute"
    )
    for budget in budgets:
        t0 = time.perf_counter()
        try:
            p = plan(budget)
        except InfeasibleBudgetError as exc:
            print(f"{budget / GIB:10.2f} infeasible: needs {exc.min_budget_bytes / GIB:.2f} GiB")
            continue
        m = {k: v / GIB for k, v in p.memory.items() if k.endswith("_bytes")}
        sharded = sum(n.kind == "param" and set(n.spec) != {"R"} for n in p.nodes)
        params = sum(n.kind == "param" for n in p.nodes)
        modes = list(p.param_modes().values())
        counts = " ".join(f"{modes.count(m):5d}" for m in ("zero2", "zero3", "offload"))
        print(
            f"{budget / GIB:10.2f} {p.estimated_step_s * 1e3:9.1f} {p.peak_memory_bytes / GIB:8.2f} "
            f"{m['resident_bytes']:7.2f} {m['gradient_bytes']:7.2f} {m['activation_bytes']:7.2f} "
            f"{sharded:>3}/{params:<3} {counts} {time.perf_counter() - t0:6.1f}  "
            f"{p.recompute_summary()}",
            flush=True,
        )


if __name__ == "__main__":
    main()
