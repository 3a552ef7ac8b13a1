"""The profiler's clock: what one call costs a training step, measured the same on every rank.

On a GPU that is its kernels' time on the stream, read by CUDA events with the GPU kept busy
while the call is queued (``GPU_COVER_CYCLES``): the launch is hidden, as in a step that
keeps the GPU busy, and so is host time (Python, dispatch) shorter than the cover, which a
step whose host runs behind the GPU would pay instead. On a CPU host with a core for every
rank, it is the call's wall time. On a CPU host whose ranks outnumber its cores
(``core_share``), the ranks take turns on the cores, and a call costs the step its CPU time
over each rank's share of a core. The ranks agree on how many calls each measurement gets
(the slowest rank's warm-up decides), and each measurement keeps the mean over the ranks
(``rank_mean``).

Not the slowest rank's: which rank is slowest differs from one op to the next (on the CPU
mesh one op's slowest rank read a median 1.26x its median rank), and a step pays the slowest
rank's *sum* of ops, not the sum of each op's slowest. Over GPT-2 tiny's ops on the 2x2 CPU
mesh, the sum of per-op maxima was 1.28x the mean rank's sum, the slowest rank's sum 1.02x.
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

T = TypeVar("T")

#: a measurement's calls stop at this much time (after one): a slow op needs fewer repeats
ENOUGH_S = 0.025
#: GPU clock cycles of work queued before each timed call (about 0.5 ms on H100-class GPUs):
#: the call's kernels are queued behind it, so their launch costs no GPU time
GPU_COVER_CYCLES = 1_000_000


class Clock:
    """Seconds of one call of ``fn`` as a training step would pay it.

    On a GPU the kernels' time on the stream (CUDA events, the call queued behind
    ``GPU_COVER_CYCLES`` of GPU work); elsewhere wall time. On a CPU mesh whose ranks
    outnumber this host's cores (``core_share``), the ranks take turns on the cores: a call
    costs the step its CPU time (this thread's, which no other rank's turn inflates) over the
    share of a core each rank gets. Wall time there would mostly read a call that ran
    uninterrupted, and now and then one that waited out other ranks' turns."""

    def __init__(self, device: torch.device, core_share: float | None = None) -> None:
        self.device = device
        self.now = time.thread_time if core_share else time.perf_counter
        self.scale = 1.0 / core_share if core_share else 1.0

    def elapsed(self, fn: Callable[[], object]) -> float:
        return self.phases(fn, _nothing)[0]

    def phases(self, first: Callable[[], T], then: Callable[[T], object]) -> tuple[float, float]:
        """Seconds of ``first()`` and of ``then`` called on its result right after, in one go
        (an op's forward and its backward, as a step runs them)."""
        if self.device.type == "cuda":
            return _cuda_phases(first, then)
        t0 = self.now()
        out = first()
        t1 = self.now()
        then(out)
        return (t1 - t0) * self.scale, (self.now() - t1) * self.scale

    def calls(self, warm_s: list[float], repeats: int, enough_s: float = ENOUGH_S) -> list[int]:
        """How many timed calls each measurement gets: as many as fit in ``enough_s`` by the
        slowest rank's warm-up call (at least one, at most ``repeats``), the same on every
        rank (an op may communicate inside). Every rank calls it (it lines the ranks up)."""
        return [max(1, min(repeats, int(enough_s / max(w, 1e-9)))) for w in slowest(warm_s, self.device)]

    def __call__(self, fn: Callable[[], object], repeats: int, enough_s: float = ENOUGH_S) -> float:
        """A warm-up call, then the median of up to ``repeats`` calls of ``fn``."""
        return statistics.median(self.times(fn, repeats, enough_s))

    def times(self, fn: Callable[[], object], repeats: int, enough_s: float = ENOUGH_S) -> list[float]:
        """The seconds of each timed call of ``fn`` (see ``__call__``)."""
        (calls,) = self.calls([self.elapsed(fn)], repeats, enough_s)
        return [self.elapsed(fn) for _ in range(calls)]


def _nothing(_: object) -> None:
    return None


def _cuda_phases(first: Callable[[], T], then: Callable[[T], object] = _nothing) -> tuple[float, float]:
    start, mid, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
    torch.cuda.synchronize()
    torch.cuda._sleep(GPU_COVER_CYCLES)
    start.record()
    out = first()
    mid.record()
    then(out)
    end.record()
    end.synchronize()
    return start.elapsed_time(mid) / 1e3, mid.elapsed_time(end) / 1e3


def reference_s(device: torch.device) -> float:
    """Seconds of a fixed workload on ``device``: how fast it runs at this moment. On a CPU
    this thread's CPU time of small matrix products and elementwise ops (2-3 ms on a 2-core
    CI machine); on a GPU a bf16 matrix product's time by CUDA events."""
    if device.type == "cuda":
        a = torch.ones(4096, 4096, device=device, dtype=torch.bfloat16)
        return _cuda_phases(lambda: a @ a)[0]
    a, v = torch.ones(128, 128), torch.ones(1000)
    t0 = time.thread_time()
    for _ in range(10):
        a @ a
        for _ in range(20):
            v.add(1.0).mul(2.0)
    return time.thread_time() - t0


class HostSpeed:
    """``reference_s`` sampled through a measurement, on every rank: a shared host runs 20-35%
    slower or faster for seconds at a time (the same work's CPU time moves, not only its wall
    time), and what is measured in a slow spell reads high. ``spread`` says how steady the
    host was: the 90th percentile of the samples over the 10th, less one."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.samples_s: list[float] = []

    def sample(self) -> None:
        self.samples_s.append(reference_s(self.device))

    def summary(self) -> tuple[float, float]:
        """(median seconds, spread), each the mean over the ranks (every rank calls it)."""
        s = self.samples_s
        deciles = statistics.quantiles(s, n=10) if len(s) > 1 else [s[0]] * 9
        median_s, spread = rank_mean([statistics.median(s), deciles[-1] / deciles[0] - 1], self.device)
        return median_s, spread


def core_share(mesh: DeviceMesh) -> float | None:
    """The share of a core each rank of a CPU mesh gets when the ranks on this host outnumber
    its cores (None otherwise). Every rank calls it (it gathers each rank's host name)."""
    hosts: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    here = hosts.count(socket.gethostname())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores / here if mesh.device_type == "cpu" and here > cores else None


def busy(cpu_s: float) -> Callable[[], None]:
    """A call that computes (small matmuls) for ``cpu_s`` seconds of this thread's CPU time."""
    a = torch.randn(64, 64)

    def compute() -> None:
        t0 = time.thread_time()
        while time.thread_time() - t0 < cpu_s:
            a @ a

    return compute


def interquartile_mean(times: list[float]) -> float:
    """The mean of the middle half of ``times`` (all of them when there are fewer than 4)."""
    times = sorted(times)
    cut = len(times) // 4
    return statistics.fmean(times[cut : len(times) - cut])


def slowest(values: list[float], device: torch.device) -> list[float]:
    """Each value's largest over the ranks (every rank calls it)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def rank_mean(values: list[float], device: torch.device) -> list[float]:
    """Each value's mean over the ranks (every rank calls it)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / dist.get_world_size()).tolist()
