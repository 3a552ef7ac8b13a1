"""Sharding specs: one DTensor placement per mesh dimension, and their short names.

A spec is a tuple of ``torch.distributed.tensor`` placements, one per mesh dimension:
``(Shard(0), Replicate())`` shards tensor dim 0 over mesh dim 0 and replicates over mesh dim 1.
The short name writes one token per mesh dimension: ``S<d>`` (shard tensor dim d), ``R``
(replicate), ``P`` (partial sum), ``Pavg`` (partial average). ``(Shard(0), Replicate())`` is
``S0R``; ``(Replicate(), Shard(1))`` is ``RS1``; ``(Shard(0), Shard(1))`` is ``S0S1``;
``(Partial(), Replicate())`` is ``PR``.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence

from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import Placement

Spec = tuple[Placement, ...]

R = Replicate()
P = Partial()
PAVG = Partial("avg")

_TOKEN = re.compile(r"R|S\d+|Pavg|Pmax|Pmin|P")


def short(spec: Spec) -> str:
    """``(Shard(0), Replicate())`` -> ``"S0R"``."""
    return "".join(_token(p) for p in spec)


def _token(p: Placement) -> str:
    if isinstance(p, Shard):
        return f"S{p.dim}"
    if isinstance(p, Partial):
        return "P" if p.reduce_op == "sum" else f"P{p.reduce_op}"
    return "R"


def parse(name: str) -> Spec:
    """``"S0R"`` -> ``(Shard(0), Replicate())``; the inverse of :func:`short`."""
    tokens = _TOKEN.findall(name)
    if "".join(tokens) != name:
        raise ValueError(f"not a sharding spec: {name!r} (tokens are R, S<dim>, P, Pavg)")
    out: list[Placement] = []
    for t in tokens:
        if t == "R":
            out.append(Replicate())
        elif t.startswith("S"):
            out.append(Shard(int(t[1:])))
        else:
            out.append(Partial("sum" if t == "P" else t[1:]))
    return tuple(out)


def replicated(ndim_mesh: int) -> Spec:
    return (R,) * ndim_mesh


def no_partial(spec: Spec) -> Spec:
    """``spec`` with partial sums replaced by replication (how a value is handed on)."""
    return tuple(Replicate() if isinstance(p, Partial) else p for p in spec)


def shard_factor(spec: Spec, mesh_shape: Sequence[int], dim: int) -> int:
    """How many pieces tensor dim ``dim`` is cut into under ``spec``."""
    return math.prod(n for p, n in zip(spec, mesh_shape) if isinstance(p, Shard) and p.dim == dim)


def divides(spec: Spec, shape: Sequence[int], mesh_shape: Sequence[int]) -> bool:
    """True when every sharded dim exists and splits evenly."""
    for p in spec:
        if isinstance(p, Shard) and not 0 <= p.dim < len(shape):
            return False
    return all(shape[d] % shard_factor(spec, mesh_shape, d) == 0 for d in range(len(shape)))


def local_shape(shape: Sequence[int], spec: Spec, mesh_shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(s // shard_factor(spec, mesh_shape, d) for d, s in enumerate(shape))


def local_numel(shape: Sequence[int], spec: Spec, mesh_shape: Sequence[int]) -> int:
    return _local_numel(tuple(shape), spec, tuple(mesh_shape))


@functools.lru_cache(maxsize=1 << 16)
def _local_numel(shape: tuple[int, ...], spec: Spec, mesh_shape: tuple[int, ...]) -> int:
    return math.prod(local_shape(shape, spec, mesh_shape))
