"""Which collectives a training step of a plan issues, and who issued each one.

Plans a tiny zoo model on a 2x2 CPU mesh under each strategy and runs one training step
(forward, backward, AdamW) on 4 gloo processes. It counts every functional collective the
step issues (``torch.ops._c10d_functional``), by kind and by where it came from:

- ``layout change``: a layout change the plan chose (``runtime.layout.reshard``, forward);
- ``its gradient``: the backward of such a change, or a parameter's gradient laid out as
  the parameter (``sync_grad``); the plan prices these with the layout change;
- ``inside <op>``: DTensor redistributing an op's arguments itself, because its own sharding
  rule for the op wanted other layouts (listed with the layouts). Mostly in backward ops,
  whose layouts the plan does not choose: one may be a gradient move the plan prices on an
  edge (a partial gradient made replicated), done inside the op instead of before it, or
  one the plan prices nowhere;
- ``local op``: the declared collectives of an op run on local shards (vocabulary-parallel
  cross entropy);
- ``other``: anything else (DTensor's ``from_local`` / ``to_local`` backward, ...).

The ``inside`` rows are where a step's collectives can differ from the plan's.

Run: python benchmarks/collective_count.py [--model llama3-8b] [--strategies auto,dp,megatron]
     [--profile PATH]   (plans priced from a profile database, as ``benchmarks/cost_model.py``)
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import warnings
from pathlib import Path

from autopar.cli import _model
from autopar.runtime.local_mesh import run_gloo

KINDS = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single")
MESH = (2, 2)


def _origin() -> str:
    """Who issued the collective being called: the innermost frame that says."""
    f = sys._getframe(2)
    while f is not None:
        name, path = f.f_code.co_name, f.f_code.co_filename
        if name == "redistribute_local_args":
            info, schema = f.f_locals.get("op_info"), f.f_locals.get("suggested_input_schema")
            op = (info.schema if info is not None and info.schema is not None else schema).op
            src, dst = f.f_locals.get("arg_spec"), f.f_locals.get("reshard_arg_spec")
            have = "".join(map(str, src.placements)) if src is not None else "?"
            want = "".join(map(str, dst.placements)) if dst is not None else "?"
            return f"inside {op}: {have} -> {want}"
        if path.endswith("vocab_parallel.py"):
            return "local op"
        gradient_code = path.endswith(("_redistribute.py", "layout.py"))
        if name in ("_redistribute_backward", "backward") and gradient_code:
            return "its gradient"
        if name == "reshard" and path.endswith("layout.py"):
            return "layout change"
        f = f.f_back
    return "other"


def _rank(rank: int, plans: list[str], name: str, out: str) -> None:
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    from autopar.api import autoparallelize
    from autopar.solver.plan import Plan

    counts: collections.Counter = collections.Counter()
    ns = torch.ops._c10d_functional
    for kind in KINDS:
        op = getattr(ns, kind)

        def counted(*args, _op=op, _kind=kind, **kwargs):
            counts[(_kind, _origin())] += 1
            return _op(*args, **kwargs)

        setattr(ns, kind, counted)
    mesh = init_device_mesh("cpu", MESH)
    per_plan = []
    for text in plans:
        torch.manual_seed(0)
        model, inputs = _model(name, 8, 32, "tiny", "cpu")
        pm = autoparallelize(model, (), mesh, example_kwargs=inputs, plan=Plan.from_json(text))
        opt = torch.optim.AdamW(pm.parameters(), lr=1e-4)
        for _ in range(2):  # the first step fills caches; the second is counted
            counts.clear()
            pm(**inputs).loss.backward()
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
        unplanned = sum(n for _, o, n in counts if o.startswith("inside"))
        print(f"{a.model} {strategy}: {total} collectives per step, {unplanned} issued by DTensor inside ops")
        for kind, origin, n in counts:
            print(f"  {n:4d}  {kind:<24} {origin}")


if __name__ == "__main__":
    main()
