"""``autopar demo``: plan a small GPT for a 2x2 mesh, train it on 4 CPU processes (gloo) for a
few AdamW steps, and print each step's loss next to single-process training."""

from __future__ import annotations

import copy
import sys

import torch

from autopar.models import GPT, GPTConfig
from autopar.runtime.local_mesh import run_gloo

MESH = (2, 2)


def _train(rank: int, steps: int, strategy: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from autopar import autoparallelize

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab=256, max_seq=32, hidden=64, heads=4, layers=2))
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 256, (8, 32))
    labels = torch.roll(ids, -1, dims=1)
    mesh = init_device_mesh("cpu", MESH, mesh_dim_names=("dp", "tp"))
    pmodel = autoparallelize(
        model, (), mesh, example_kwargs={"input_ids": ids, "labels": labels}, strategy=strategy
    )
    if rank == 0:
        print(pmodel.plan.report(), "\n", flush=True)
        print(f"{'step':>4}  {'autopar, 4 ranks':>16}  {'single process':>14}  {'|difference|':>12}")
    opt = torch.optim.AdamW(pmodel.parameters(), lr=1e-3)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    for step in range(steps):
        opt.zero_grad()
        _, loss = pmodel(input_ids=ids, labels=labels)
        loss.backward()
        opt.step()
        ref_opt.zero_grad()
        _, ref_loss = reference(ids, labels)
        ref_loss.backward()
        ref_opt.step()
        if rank == 0:
            a, b = loss.item(), ref_loss.item()
            print(f"{step:>4}  {a:>16.6f}  {b:>14.6f}  {abs(a - b):>12.2e}", flush=True)


def run_demo(steps: int = 5, strategy: str = "auto") -> int:
    print(
        f"autopar demo: a 2-layer GPT on a {MESH[0]}x{MESH[1]} mesh of 4 CPU processes (gloo)\n", flush=True
    )
    try:
        run_gloo(_train, (steps, strategy), world_size=4)
    except RuntimeError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    return 0
