"""Measure a training step on this process: its peak memory, and the collectives it issues.

**Collectives** (:func:`count_collectives`): every functional collective called while the
context is open, by kind and by who issued it: ``"layout change"`` (a layout change the plan
made, ``runtime.layout.reshard``), ``"its gradient"`` (its backward: a gradient laid out as
the plan prices it, made whole where an op on local shards hands it back, or laid out as
its parameter), ``"local op"`` (the declared collectives of an op on local shards,
``runtime.vocab_parallel``), ``"inside an op"`` (DTensor giving an op's arguments layouts of
its own choosing) or ``"other"``. The first three are the plan's (``PLANNED_ORIGINS``); the
last two are collectives the plan neither chose nor priced.

**Peak memory** is measured with the allocator's own count.

``torch.profiler`` with ``profile_memory=True`` records every allocation and free of the
CPU allocator. :func:`step_peak_bytes` runs a warm-up step and then measured steps inside one
profile (so every block a measured step frees was allocated, and counted, inside it); a step's
peak is the bytes live when it starts plus the largest rise of the running total during it.

The measure is the *smallest* of the measured steps' peaks. The bytes a step allocates for
itself are the same in every step (the same plan, the same program); on top of them comes a
part that only adds: a collective's buffers (its input, gloo's flat copies, the result) are
freed when gloo's worker thread drops the finished work, and on 4 processes sharing 2 cores
that thread is often descheduled right after it wakes the waiting rank. Measured here, 10-16%
of all-gathers on a 4-rank group are released 1-15 ms after their wait returns, and a tiny
model's step peak then rises by up to a quarter from one step to the next. The smallest peak
is the step with the least of that scheduling noise; it is never below what the step itself
allocates, so a memory model that under-counts is still caught. This is how the memory model
(``solver.memory``) is checked on the CPU mesh.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import os
import sys
from collections.abc import Callable, Iterable, Iterator

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


def step_peak_bytes(
    step: Callable[[], None], between: Callable[[], None], live: Callable[[], int], repeats: int = 5
) -> int:
    """The smallest peak bytes of ``repeats`` ``step()`` calls after a warm-up one; ``between()``
    runs before each measured step (``opt.zero_grad``) and ``live()`` then counts the bytes live
    as it starts. The garbage collector is paused, so freeing does not depend on when Python
    collects."""
    gc.collect()
    gc.disable()
    start_bytes = []
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
            for _ in range(repeats):
                between()
                start_bytes.append(live())
                with record_function(_MARK):
                    step()
    finally:
        gc.enable()
    allocations, windows = [], []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation:
            allocations.append((e.start_time_ns, e.extra_fields.total_allocated))
        elif e.name == _MARK:
            windows.append((e.start_time_ns, e.end_time_ns))
        stack.extend(e.children)
    if len(windows) != repeats:
        raise RuntimeError(f"the profiler recorded {len(windows)} of {repeats} measured steps")
    windows.sort()
    allocations.sort()
    peaks = [start + _largest_rise(allocations, w) for start, w in zip(start_bytes, windows)]
    return min(peaks)


def _largest_rise(allocations: list[tuple[int, int]], window: tuple[int, int]) -> int:
    """The largest rise of the allocator's running total within ``window`` above its value when
    the window opens. ``allocations``: ``(time, running total after the event)``, sorted by
    time; the allocator keeps the total under its lock, so it is exact where events of
    several threads (gloo's workers free buffers too) carry nearly equal times."""
    base = rise = 0
    for t, total in allocations:
        if t < window[0]:
            base = total
        elif t <= window[1]:
            rise = max(rise, total - base)
        else:
            break
    return rise


KINDS = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single")
#: the origins :func:`count_collectives` names that a plan prices (see the module docstring)
PLANNED_ORIGINS = frozenset({"layout change", "its gradient", "local op"})
#: the frame of DTensor's dispatcher that redistributes an op's arguments
_DTENSOR_REDISTRIBUTES = "redistribute_local_args"


def _origin() -> str:
    """Who issued the collective being called: the innermost frame that says."""
    f = sys._getframe(2)
    while f is not None:
        name, path = f.f_code.co_name, f.f_code.co_filename
        if name == _DTENSOR_REDISTRIBUTES:
            return "inside an op"
        if path.endswith("vocab_parallel.py"):
            return "local op"
        gradient_code = path.endswith(("_redistribute.py", "layout.py", f"tensor{os.sep}_api.py"))
        if name in ("_redistribute_backward", "backward") and gradient_code:
            return "its gradient"
        if name == "reshard" and path.endswith("layout.py"):
            return "layout change"
        f = f.f_back
    return "other"


@contextlib.contextmanager
def count_collectives() -> Iterator[collections.Counter]:
    """Count the functional collectives called inside: ``counter[(kind, origin)]``."""
    from torch.distributed.tensor._dispatch import OpDispatcher  # private: imported only here

    if not hasattr(OpDispatcher, _DTENSOR_REDISTRIBUTES):  # else "inside an op" could never show
        raise RuntimeError(f"this torch's DTensor has no OpDispatcher.{_DTENSOR_REDISTRIBUTES}")
    counts: collections.Counter = collections.Counter()
    ns = torch.ops._c10d_functional
    originals = {kind: getattr(ns, kind) for kind in KINDS}

    def counted(kind: str) -> Callable:
        def call(*args, **kwargs):
            counts[(kind, _origin())] += 1
            return originals[kind](*args, **kwargs)

        return call

    for kind in KINDS:
        setattr(ns, kind, counted(kind))
    try:
        yield counts
    finally:
        for kind, op in originals.items():
            setattr(ns, kind, op)
