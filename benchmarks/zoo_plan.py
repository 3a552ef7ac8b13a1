"""Plan every zoo model at its real size on meshes (8,), (2, 4) and (8, 8) with H100 prices.

Built on the meta device (nothing allocated, nothing downloaded); batch and sequence per
model below. Prints one row per (model, mesh): plan time (trace + strategies + solve), the
ILP's size, solver status, estimated step time, estimated peak memory per device, and the
number of fallback ops (ops replicated for lack of a rule; the target is zero).

Run: python benchmarks/zoo_plan.py [--models gpt2-124m,llama3-8b] [--meshes 8,2x4,8x8]
     [--time-limit 120]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from autopar.api import make_plan
from autopar.models import zoo

#: (batch, seq) per model: global batch of sequences, or of images / samples
SHAPES = {
    "gpt2-124m": (8, 1024),
    "gpt2-1.5b": (8, 1024),
    "gpt3-6.7b": (8, 2048),
    "gpt3-175b": (64, 2048),
    "llama3-8b": (8, 4096),
    "llama3-70b": (32, 4096),
    "mixtral-8x7b": (8, 4096),
    "bert-large": (64, 512),
    "opt-13b": (16, 2048),
    "vit-large": (64, 0),
    "resnet-50": (256, 0),
    "palm-8b": (16, 2048),
    "dlrm": (8192, 0),
}


def _mesh(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("x"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(zoo.names()))
    ap.add_argument("--meshes", default="8,2x4,8x8")
    ap.add_argument("--time-limit", type=float, default=120.0, help="solver limit per plan, seconds")
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    print(
        f"{'model':14} {'mesh':5} {'plan_s':>7} {'solve_s':>7} {'vars':>8} {'status':10} "
        f"{'step_ms':>9} {'mem_GiB':>8} {'fallback':>8}"
    )
    for name in a.models.split(","):
        batch, seq = SHAPES[name]
        for mesh_text in a.meshes.split(","):
            mesh = _mesh(mesh_text)
            with torch.device("meta"):
                model, inputs = zoo.build(name, "real", batch=batch, seq=seq or 1)
            t0 = time.perf_counter()
            plan = make_plan(model, (), mesh, example_kwargs=inputs, gpu="h100", time_limit_s=a.time_limit)
            plan_s = time.perf_counter() - t0
            print(
                f"{name:14} {mesh_text:5} {plan_s:7.1f} {plan.timings_s['solve_s']:7.1f} "
                f"{plan.solver['variables']:8d} {plan.solver['status']:10} "
                f"{plan.estimated_step_s * 1e3:9.2f} {plan.peak_memory_bytes / 2**30:8.2f} "
                f"{len(plan.fallback_ops):8d}",
                flush=True,
            )


if __name__ == "__main__":
    main()
