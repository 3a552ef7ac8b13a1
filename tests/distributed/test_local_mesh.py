"""``run_gloo``: the ranks, the launcher's ``prepare`` step they share, and a failing rank.

The ranks are forked from one launcher; ``prepare`` runs there once and every rank starts
with its result. The launcher is a fresh process, or with ``start_method="fork"`` a copy of
the caller, with what it has imported and set. A rank that fails brings its traceback back
to the caller, and the other ranks are ended then, not waited for.
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from autopar.runtime.local_mesh import run_gloo

#: how long the ranks that do not fail work on (the test waits that long if they are not ended)
LONG_S = 60

#: set by the caller before it runs the ranks: a forked launcher has it, a spawned one not
_CALLER_STATE: list[str] = []


def _prepare(tmp: str) -> dict:
    with open(Path(tmp, "prepared.txt"), "a") as f:  # one line per call
        f.write(f"{os.getpid()}\n")
    return {"launcher": os.getpid(), "caller_state": list(_CALLER_STATE)}


def _report(rank: int, prepared: dict, tmp: str) -> None:
    dist.barrier()
    seen = {"rank": dist.get_rank(), "world": dist.get_world_size(), "pid": os.getpid(), **prepared}
    Path(tmp, f"rank{rank}.json").write_text(json.dumps(seen))


def _fail_on_rank_2(rank: int, tmp: str, then: str) -> None:
    if rank == 2:
        raise ValueError("rank 2 cannot go on")
    if then == "wait":  # in a collective with rank 2: it fails when rank 2's process is gone
        dist.barrier()
    else:  # still at work when rank 2 fails
        time.sleep(LONG_S)
    Path(tmp, f"finished{rank}").touch()


@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_every_rank_starts_from_the_launchers_prepare_step(tmp_path, start_method):
    _CALLER_STATE[:] = [start_method]
    prepare = functools.partial(_prepare, str(tmp_path))
    run_gloo(_report, (str(tmp_path),), world_size=4, prepare=prepare, start_method=start_method)
    calls = Path(tmp_path, "prepared.txt").read_text().split()
    ranks = [json.loads(Path(tmp_path, f"rank{r}.json").read_text()) for r in range(4)]
    assert len(calls) == 1  # prepared once, in the launcher
    assert [r["rank"] for r in ranks] == [0, 1, 2, 3] and {r["world"] for r in ranks} == {4}
    assert len({r["pid"] for r in ranks}) == 4 and str(ranks[0]["launcher"]) == calls[0]
    assert all(r["launcher"] == ranks[0]["launcher"] != r["pid"] for r in ranks)
    assert {tuple(r["caller_state"]) for r in ranks} == {("fork",) if start_method == "fork" else ()}


@pytest.mark.parametrize("then", ["work", "wait"])
def test_a_failing_rank_raises_its_traceback_and_ends_the_others(tmp_path, then):
    """The traceback is the first failure's, not that of a rank whose collective lost it."""
    with pytest.raises(RuntimeError, match="rank 2 cannot go on"):
        run_gloo(_fail_on_rank_2, (str(tmp_path), then), world_size=4, timeout_s=60)
    assert not list(tmp_path.glob("finished*"))  # ended, not waited for
