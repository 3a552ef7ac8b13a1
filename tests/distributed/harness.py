"""Run a check function on 4 CPU processes over gloo, once per test module.

The check runs on every rank (collectives need all of them) and returns a JSON-able dict;
rank 0's dict comes back to the test. A failure on any rank comes back as its traceback.
Workers end with barrier, destroy_process_group, flush and ``os._exit`` (gloo can abort at
interpreter exit otherwise).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 4


def _worker(rank: int, check: Callable[[], dict], tmp: str, world: int) -> None:
    code = 0
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{tmp}/store",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=120),
        )
        result = check()
        if rank == 0:
            Path(tmp, "result.json").write_text(json.dumps(result))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        Path(tmp, f"error{rank}.txt").write_text(traceback.format_exc())
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_on_mesh(check: Callable[[], dict], world: int = WORLD_SIZE) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            mp.start_processes(_worker, args=(check, tmp, world), nprocs=world, start_method="spawn")
        except Exception as exc:
            errors = sorted(Path(tmp).glob("error*.txt"))
            detail = "\n".join(p.read_text() for p in errors[:1]) or str(exc)
            raise AssertionError(f"distributed check failed:\n{detail}") from None
        return json.loads(Path(tmp, "result.json").read_text())
