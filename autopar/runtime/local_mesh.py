"""Run a function on N local CPU processes joined over gloo: the stand-in for a GPU mesh
used by the demo and the distributed tests.

Each worker computes on one thread (``torch.set_num_threads(1)``): the ranks share the
machine's cores, and more threads than cores makes every timing and every collective's
latency erratic. Each worker keeps the memory it frees for reuse (``_keep_freed_memory``).
Each worker ends with barrier, ``destroy_process_group``, flushed output and ``os._exit``:
gloo processes can abort at interpreter exit otherwise. A failing rank's traceback is
raised in the parent (the first to fail: the others' collectives fail after it), and the
other ranks are ended at once (one still at work would run on to its end). The workers are
forked from one launcher process (``run_gloo``), so this module works only where ``os.fork``
does (Linux, macOS).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import logging
import os
import platform
import signal
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_gloo(
    fn: Callable[..., None],
    args: tuple = (),
    world_size: int = 4,
    timeout_s: int = 120,
    prepare: Callable[[], object] | None = None,
    start_method: str = "spawn",
) -> None:
    """Call ``fn(rank, *args)`` on ``world_size`` CPU processes sharing a gloo process group;
    with ``prepare``, ``fn(rank, prepare(), *args)``.

    The ranks are forked from one launcher process, itself started fresh (``spawn``: no
    state of the caller, no threads): it imports what ``fn`` and ``args`` need once and calls
    ``prepare`` once (work every rank would repeat: building and tracing a model), and every
    rank starts with what it did. On a 2-core host, four processes each importing torch and
    autopar took 10 s before the first rank could start, then 7 s more each importing
    transformers to build GPT-2, and 8 s tracing it at once.

    ``start_method="fork"`` makes the launcher a copy of the caller instead, which saves its
    start and imports (GPT-2 small's ``autopar profile``: 10.0 s outside the profile itself
    spawned, 7.6 s forked, the means of 3 and 4 runs). It is only for a caller that has
    imported modules and done nothing else: no threads of its own, no process group, no solver
    run (HiGHS keeps a thread pool). The ``autopar profile`` command is one."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            mp.start_processes(
                _launch,
                args=(fn, args, prepare, tmp, world_size, timeout_s),
                nprocs=1,
                start_method=start_method,
            )
        except Exception as exc:
            # the first rank to fail: the others may fail after it (a collective's peer gone)
            errors = sorted(Path(tmp).glob("error*.txt"), key=lambda p: p.stat().st_mtime_ns)
            detail = errors[0].read_text() if errors else str(exc)
            raise RuntimeError(f"a rank failed:\n{detail}") from None


def _launch(
    _: int, fn: Callable, args: tuple, prepare: Callable | None, tmp: str, world: int, timeout_s: int
) -> None:
    """Fork the ranks and wait for them; when one fails, end the others and fail."""
    if prepare is not None:
        args = (prepare(), *args)
    sys.stdout.flush()
    sys.stderr.flush()
    ranks = {}
    for rank in range(world):
        pid = os.fork()
        if pid == 0:
            _worker(rank, fn, args, tmp, world, timeout_s)  # never returns
        ranks[pid] = rank
    failed = []
    while ranks:
        pid, status = os.wait()
        rank = ranks.pop(pid)
        if os.waitstatus_to_exitcode(status) != 0:
            failed.append(rank)
            for other in ranks:
                os.kill(other, signal.SIGKILL)
    if failed:
        raise RuntimeError(f"rank {failed[0]} failed (exit status in {tmp})")


#: glibc ``mallopt`` parameters and the values a worker sets (the defaults adapt to the
#: process's history; fixed values keep every run alike)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_TRIM_THRESHOLD_BYTES = 256 << 20
_MMAP_THRESHOLD_BYTES = 32 << 20  # the most the default adapts up to on 64-bit


def _keep_freed_memory() -> None:
    """On glibc, fix malloc's thresholds: memory freed at the top of the heap stays there (up to
    ``_TRIM_THRESHOLD_BYTES``), and blocks under 32 MiB come from the heap. By default glibc
    adapts both to what the process has freed so far, and after some histories it hands a
    freed buffer back to the OS on every call and page-faults it in on the next: after the
    ops of a profile, one rank of the 2x2 CPU mesh took 500-1000 page faults per call of a 4
    MiB all-gather or all-to-all in each of 3 launches, and the all-to-all read 21.6-25.7 ms;
    with these thresholds fixed, no faults and 18.3-22.3 ms (16-20 ms in a fresh process).
    Elsewhere (another C library) it does nothing."""
    if platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)
    libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)


def _worker(rank: int, fn: Callable[..., None], args: tuple, tmp: str, world: int, timeout_s: int) -> None:
    # DTensor notes that a 2-D mesh gathers axis by axis; expected on CPU meshes.
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    code = 0
    torch.set_num_threads(1)
    _keep_freed_memory()
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{tmp}/store",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        fn(rank, *args)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        Path(tmp, f"error{rank}.txt").write_text(traceback.format_exc())
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
