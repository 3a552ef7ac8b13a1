"""The profiler's clock on a CUDA device: a call's kernels' time on the stream, its launch and
host time hidden as in a busy step. Skipped without CUDA."""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from autopar.cost.clock import Clock

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CUDA = torch.device("cuda")


def _queued_s(fn, calls: int = 50) -> float:
    """One call's share of ``calls`` calls queued back to back (the GPU never waits for the host)."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / calls


def test_a_matmul_reads_its_time_in_a_queue_of_calls():
    a = torch.randn(4096, 4096, device=CUDA, dtype=torch.bfloat16)
    clock = Clock(CUDA)
    timed = statistics.median(clock.elapsed(lambda: a @ a) for _ in range(11))
    assert timed == pytest.approx(_queued_s(lambda: a @ a), rel=0.1)


def test_host_time_shorter_than_the_cover_is_hidden():
    x = torch.randn(1024, device=CUDA)

    def slow_host_small_kernel() -> None:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 1e-4:  # 0.1 ms of host work (Python, dispatch)
            pass
        x.add_(1.0)

    clock = Clock(CUDA)
    clock.elapsed(slow_host_small_kernel)
    assert statistics.median(clock.elapsed(slow_host_small_kernel) for _ in range(11)) < 5e-5
