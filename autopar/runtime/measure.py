"""Measure the peak memory of a training step on this process, with the allocator's own count.

``torch.profiler`` with ``profile_memory=True`` records every allocation and free of the
CPU allocator. :func:`step_peak_bytes` runs a warm-up step and the measured step inside one
profile (so every block the measured step frees was allocated, and counted, inside it), and
returns the bytes live when the measured step starts plus the largest rise of the running
total during it. This is how the memory model (``solver.memory``) is checked on the CPU mesh.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable

import torch
from torch._C._profiler import _EventType
from torch.distributed.tensor import DTensor
from torch.profiler import ProfilerActivity, profile, record_function

_MARK = "autopar.measured_step"


def live_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a DTensor counts its local shard)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, DTensor):
            t = t.to_local()
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            seen[st._cdata] = st.nbytes()
    return sum(seen.values())


def step_peak_bytes(step: Callable[[], None], between: Callable[[], None], live: Callable[[], int]) -> int:
    """Peak bytes of the second of two ``step()`` calls; ``between()`` runs after the first
    (``opt.zero_grad``) and ``live()`` then counts the bytes live as the second starts. The
    garbage collector is paused, so freeing does not depend on when Python collects."""
    gc.collect()
    gc.disable()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
            between()
            start_bytes = live()
            with record_function(_MARK):
                step()
    finally:
        gc.enable()
    allocations, window = [], None
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation:
            allocations.append((e.start_time_ns, e.extra_fields.alloc_size))
        elif e.name == _MARK:
            window = (e.start_time_ns, e.end_time_ns)
        stack.extend(e.children)
    if window is None:
        raise RuntimeError("the profiler recorded no measured step")
    total = base = rise = 0
    for t, size in sorted(allocations):
        if t < window[0]:
            base = total = total + size
        elif t <= window[1]:
            total += size
            rise = max(rise, total - base)
    return start_bytes + rise
