"""Which collectives a training step of a plan issues, and who issued each one.

Plans a tiny zoo model on a 2x2 CPU mesh under each strategy and runs one training step
(forward, backward, AdamW) on 4 gloo processes. It counts every functional collective the
step issues, by kind and by where it came from (``runtime.measure.count_collectives``):
a layout change the plan made, its gradient, the declared collectives of an op on local
shards, or one the plan did not make (DTensor redistributing an op's arguments itself:
"inside an op"; or "other"). Every op but views and factories runs on local shards, so the
last should be none.

Run: python benchmarks/collective_count.py [--model llama3-8b] [--strategies auto,dp,megatron]
     [--profile PATH]   (plans priced from a profile database, as ``benchmarks/cost_model.py``)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path

from autopar.cli import _model
from autopar.runtime.local_mesh import run_gloo
from autopar.runtime.measure import PLANNED_ORIGINS

MESH = (2, 2)


def _rank(rank: int, plans: list[str], name: str, out: str) -> None:
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    from autopar.api import autoparallelize
    from autopar.bench import _loss
    from autopar.runtime.measure import count_collectives
    from autopar.solver.plan import Plan

    mesh = init_device_mesh("cpu", MESH)
    per_plan = []
    for text in plans:
        torch.manual_seed(0)
        model, inputs = _model(name, 8, 32, "tiny", "cpu")
        pm = autoparallelize(model, (), mesh, example_kwargs=inputs, plan=Plan.from_json(text))
        opt = torch.optim.AdamW(pm.parameters(), lr=1e-4)
        for _ in range(2):  # the first step fills caches; the second is counted
            with count_collectives() as counts:
                _loss(pm(**inputs)).backward()
                opt.step()
            opt.zero_grad(set_to_none=True)
        per_plan.append([[k, o, n] for (k, o), n in sorted(counts.items(), key=lambda kv: -kv[1])])
    if rank == 0:
        Path(out).write_text(json.dumps(per_plan))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--strategies", default="auto,dp,megatron")
    ap.add_argument("--profile", default=None)
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    from autopar import bench

    model, kwargs = _model(a.model, 8, 32, "tiny", "cpu")
    strategies = a.strategies.split(",")
    rows = bench.compare(model, kwargs, MESH, strategies, gpu="cpu", profile=a.profile)
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/counts.json"
        run_gloo(_rank, ([r.plan_json for r in rows], a.model, out))
        per_plan = json.loads(Path(out).read_text())
    for strategy, counts in zip(strategies, per_plan):
        total = sum(n for _, _, n in counts)
        unplanned = sum(n for _, o, n in counts if o not in PLANNED_ORIGINS)
        print(f"{a.model} {strategy}: {total} collectives per step, {unplanned} the plan did not make")
        for kind, origin, n in counts:
            print(f"  {n:4d}  {kind:<24} {origin}")


if __name__ == "__main__":
    main()
