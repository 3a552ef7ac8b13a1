"""Collective times (alpha-beta, ring algorithms) and the redistribution planner.

A spec change is planned as a sequence of named steps, one per mesh axis whose placement
changes, then priced; the steps are data, so a plan report can show them:

==============  =========================  ==========================================
from -> to      step                       time on an axis of n devices
==============  =========================  ==========================================
P -> R          all_reduce(B)              2 alpha + 2 (n-1)/n B / bw
P -> S(d)       reduce_scatter(B in)       alpha + (n-1)/n B / bw
S(d) -> R       all_gather(B out)          alpha + (n-1)/n B / bw
S(d) -> S(e)    all_to_all(B)              alpha + (n-1)/n B / bw
R -> S(d)       local slice                0
R -> P          local (zero or scale)      0
==============  =========================  ==========================================

``B`` is the local size of the tensor at that step, so gathering on one axis makes the next
axis move more bytes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from torch.distributed.tensor import Partial, Replicate, Shard

from autopar.cost.hardware import Link
from autopar.solver.specs import Spec, local_numel


@dataclass(frozen=True)
class CommStep:
    kind: str  # all_reduce | reduce_scatter | all_gather | all_to_all | slice | local
    mesh_dim: int
    bytes: int
    time_s: float


#: the steps of a layout change (the table above)
MOVE_KINDS = ("all_reduce", "reduce_scatter", "all_gather", "all_to_all", "slice", "local")
#: the steps that move no data between devices: each device computes alone
LOCAL_KINDS = ("slice", "local")


def collective_time_s(kind: str, nbytes: float, n: int, link: Link) -> float:
    """The link's fitted line for ``kind`` where one was measured (a profile: it holds the
    runtime's own cost of the local steps too), else ring alpha-beta (local steps free)."""
    if n <= 1:
        return 0.0
    for k, alpha_s, s_per_byte in link.fitted:
        if k == kind:
            return alpha_s + s_per_byte * nbytes
    if kind in LOCAL_KINDS:
        return 0.0
    frac = (n - 1) / n
    if kind == "all_reduce":
        return 2 * link.alpha_s + 2 * frac * nbytes / link.bytes_per_s
    return link.alpha_s + frac * nbytes / link.bytes_per_s


def sent_bytes(kind: str, nbytes: float, n: int) -> float:
    """Bytes each device sends for one collective of ``nbytes`` on an axis of ``n`` (ring)."""
    if n <= 1 or kind in LOCAL_KINDS:
        return 0.0
    return (2 if kind == "all_reduce" else 1) * (n - 1) / n * nbytes


def copy_time_s(nbytes: float, link: Link) -> float:
    """One copy over a point-to-point link (device <-> host)."""
    return link.alpha_s + nbytes / link.bytes_per_s


def plan_redistribute(
    src: Spec,
    dst: Spec,
    shape: Sequence[int],
    itemsize: int,
    mesh_shape: Sequence[int],
    links: Sequence[Link],
) -> list[CommStep]:
    """The steps that turn a tensor laid out as ``src`` into ``dst``, axis by axis."""
    steps: list[CommStep] = []
    cur = list(src)
    # Gathers and reductions first (they need the other axes' layout as it is), then slices.
    order = sorted(range(len(src)), key=lambda i: isinstance(dst[i], Shard) and isinstance(src[i], Replicate))
    for i in order:
        a, b = cur[i], dst[i]
        if a == b or (isinstance(a, Partial) and isinstance(b, Partial)):
            continue
        n, link = mesh_shape[i], links[i]
        nbytes = local_numel(shape, tuple(cur), mesh_shape) * itemsize
        if isinstance(a, Partial):
            kind = "all_reduce" if isinstance(b, Replicate) else "reduce_scatter"
        elif isinstance(a, Shard):
            if isinstance(b, Shard):
                kind = "all_to_all"
            else:
                kind = "all_gather"
                nbytes *= n
        else:
            kind = "slice" if isinstance(b, Shard) else "local"
        steps.append(CommStep(kind, i, nbytes, collective_time_s(kind, nbytes, n, link)))
        cur[i] = b
    return steps


@functools.lru_cache(maxsize=1 << 18)
def redistribute_bytes(
    src: Spec, dst: Spec, shape: tuple[int, ...], itemsize: int, mesh_shape: tuple[int, ...]
) -> float:
    """Bytes each device sends for :func:`plan_redistribute`'s steps."""
    if src == dst:
        return 0.0
    links = tuple(Link(0.0, 1.0) for _ in mesh_shape)
    steps = plan_redistribute(src, dst, shape, itemsize, mesh_shape, links)
    return sum(sent_bytes(s.kind, s.bytes, mesh_shape[s.mesh_dim]) for s in steps)


@functools.lru_cache(maxsize=1 << 18)
def redistribute_time_s(
    src: Spec,
    dst: Spec,
    shape: tuple[int, ...],
    itemsize: int,
    mesh_shape: tuple[int, ...],
    links: tuple[Link, ...],
) -> float:
    """Time of :func:`plan_redistribute`'s steps (cached: the solver asks many times)."""
    if src == dst:
        return 0.0
    return sum(s.time_s for s in plan_redistribute(src, dst, shape, itemsize, mesh_shape, links))
