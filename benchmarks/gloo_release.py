"""How late gloo releases a finished collective's buffers on this machine's CPU mesh.

On 4 gloo processes, each all-gathers a 32 KiB tensor ``--calls`` times through the
functional collectives (as DTensor does) and, after each wait returns, watches the result's
storage: while gloo's worker thread still holds the finished work, the storage has more
owners than the caller. Prints, per rank, how many calls were released late and how late.
This is the noise ``runtime.measure`` takes the smallest step peak to avoid.

Run: python benchmarks/gloo_release.py [--calls 200]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from autopar.runtime.local_mesh import run_gloo

WATCH_S = 0.1


def _owners(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def _rank(rank: int, calls: int, out: str) -> None:
    wait = torch.ops._c10d_functional.wait_tensor
    gather = torch.ops._c10d_functional.all_gather_into_tensor
    group = dist.group.WORLD.group_name
    x = torch.randn(1024, 8)
    y = wait(gather(x, 4, group))
    time.sleep(0.05)
    released = _owners(y)  # the owners of a result whose work is long gone
    late_s = []
    for _ in range(calls):
        y = wait(gather(x, 4, group))
        t0 = time.perf_counter()
        if _owners(y) > released:
            while _owners(y) > released and time.perf_counter() - t0 < WATCH_S:
                pass
            late_s.append(time.perf_counter() - t0)
    Path(out, f"{rank}.json").write_text(json.dumps(late_s))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=200)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_gloo(_rank, (a.calls, tmp), world_size=4)
        print(f"4 gloo ranks, {a.calls} all-gathers of 32 KiB each; released after the wait returned:")
        for rank in range(4):
            late = sorted(json.loads(Path(tmp, f"{rank}.json").read_text()))
            worst = ""
            if late:
                worst = f", up to {late[-1] * 1e3:.1f} ms, median {late[len(late) // 2] * 1e3:.1f} ms"
            print(f"  rank {rank}: {len(late)} of {a.calls} late ({len(late) / a.calls:.0%}){worst}")


if __name__ == "__main__":
    main()
