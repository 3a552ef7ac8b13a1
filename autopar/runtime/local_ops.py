"""Ops that run on each rank's local shards instead of through DTensor's dispatcher.

That is every op but the few DTensor runs (``rules.DISPATCHED``: views and factories, whose
arguments are global sizes, dropout and in-place writes), and every op with no rule
(replicated). A strategy is exactly a statement that the op on local shards gives this rank's
piece of the result, so :func:`local_call` unwraps, calls, and wraps in the planned layout.

Why not DTensor's dispatcher: it would compute the same forward, but in backward it picks
its own layouts for the gradient ops and redistributes their arguments itself, issuing
collectives the plan neither chose nor priced (an all-gather inside a matmul's backward, a
reduce-scatter inside a product's). On local shards the backward is the local op's backward,
and every collective of a step is a layout change the plan made or its gradient.

Two lookups need more than the plain op: when the table is sharded along the dim being
looked up (row-wise embedding, vocab-parallel embedding), each rank looks up only the
indices that fall in its rows, writes zeros for the rest, and the result is a partial sum.
Cross entropy over vocabulary-sharded logits runs ``runtime.vocab_parallel``.

Gradients follow the strategy, as in ``solver.graph.grad_spec``: an input replicated along a
mesh axis that divides the op's work gets a partial-sum gradient; a partial-sum input gets the
whole (replicated) gradient; a partial-average output passes ``1/n`` of its gradient to each
rank's local result.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Partial, Shard
from torch.utils._pytree import tree_leaves, tree_map

from autopar.runtime import vocab_parallel
from autopar.solver.graph import grad_spec
from autopar.solver.rules.base import Strategy
from autopar.solver.specs import Spec, parse

aten = torch.ops.aten


Unwrap = Callable[[Any], Any]


def _unwrapper(out: Spec, dtensors: list[DTensor]) -> Unwrap:
    """Local shard of a DTensor argument, with the gradient placements the strategy implies
    (``solver.graph.grad_spec`` of the strategy the arguments and ``out`` make up)."""
    strategy = Strategy(out, tuple(tuple(d.placements) for d in dtensors))
    position = {id(d): k for k, d in enumerate(dtensors)}

    def local(a: Any) -> Any:
        if not isinstance(a, DTensor):
            return a
        return _GradLikeInput.apply(a.to_local(grad_placements=grad_spec(strategy, position[id(a)])))

    return local


class _GradLikeInput(torch.autograd.Function):
    """Identity; the gradient gets the input's strides. A local kernel may return its input
    gradients in another layout (CPU attention does), but the DTensor ``to_local`` makes of
    them carries the input's strides, and a later view by those strides would fail."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.stride = x.stride()
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if grad.stride() == ctx.stride or 0 in ctx.stride:  # an expanded input keeps its gradient
            return grad
        return torch.empty_strided(grad.shape, ctx.stride, dtype=grad.dtype, device=grad.device).copy_(grad)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:  # type: ignore[override]
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad * ctx.factor, None


def _shard_range(t: DTensor, dim: int) -> tuple[int, int]:
    """(global offset, length) of this rank's slice of ``t`` along ``dim`` (even shards)."""
    size, offset = t.shape[dim], 0
    coord = t.device_mesh.get_coordinate()
    for i, p in enumerate(t.placements):
        if isinstance(p, Shard) and p.dim % t.dim() == dim:
            size //= t.device_mesh.size(i)
            offset += coord[i] * size
    return offset, size


def _masked(index: torch.Tensor, offset: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices shifted into this rank's rows (out-of-range ones set to 0), and the in-range mask."""
    local = index - offset
    inside = (local >= 0) & (local < rows)
    return torch.where(inside, local, torch.zeros_like(local)), inside


def _embedding(
    local: Unwrap, weight: DTensor, indices: DTensor, padding_idx: int = -1, *flags: bool
) -> torch.Tensor:
    offset, rows = _shard_range(weight, 0)
    w, idx = local(weight), local(indices)
    if rows == weight.shape[0]:
        return aten.embedding.default(w, idx, padding_idx, *flags)
    local_idx, inside = _masked(idx, offset, rows)
    pad = padding_idx - offset if 0 <= padding_idx - offset < rows else -1
    out = aten.embedding.default(w, local_idx, pad, *flags)
    return out * inside.unsqueeze(-1).to(out.dtype)


def _gather(local: Unwrap, table: DTensor, dim: int, index: DTensor, **kwargs: Any) -> torch.Tensor:
    dim %= table.dim()
    offset, rows = _shard_range(table, dim)
    t, idx = local(table), local(index)
    if rows == table.shape[dim]:
        return aten.gather.default(t, dim, idx, **kwargs)
    local_idx, inside = _masked(idx, offset, rows)
    return aten.gather.default(t, dim, local_idx, **kwargs) * inside.to(t.dtype)


def _cross_entropy(
    local: Unwrap,
    logits: DTensor,
    target: DTensor,
    weight: DTensor | None = None,
    reduction: int = 1,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Vocabulary-sharded logits: ``runtime.vocab_parallel`` (the loss rule offers that layout
    only without weights and smoothing, with a sum or no reduction); else the op on shards."""
    if not vocab_parallel.vocab_axes(logits):
        args = (local(weight), reduction, ignore_index, label_smoothing)
        return aten.cross_entropy_loss.default(local(logits), local(target), *args)
    offset, _ = _shard_range(logits, 1)
    return vocab_parallel.cross_entropy(local(logits), local(target), logits, offset, reduction, ignore_index)


_LOCAL_IMPLS = {
    aten.embedding.default: _embedding,
    aten.gather.default: _gather,
    aten.cross_entropy_loss.default: _cross_entropy,
}


def local_call(op, spec: str, *args: Any, **kwargs: Any) -> Any:
    """Run ``op`` on the local shards of its DTensor arguments; wrap outputs as ``spec``."""
    dtensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, DTensor)]
    mesh = dtensors[0].device_mesh
    placements = parse(spec)
    local = _unwrapper(placements, dtensors)
    impl = _LOCAL_IMPLS.get(op)
    if impl is not None:
        out = impl(local, *args, **kwargs)
    else:
        out = op(*tree_map(local, args), **tree_map(local, kwargs))
    n_avg = math.prod(mesh.size(i) for i, p in enumerate(placements) if p == Partial("avg"))

    def wrap(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        # a kernel may lay out its local result differently from the traced one (CPU attention
        # returns heads-inner strides); DTensor views gradients by the global strides
        t = t.contiguous()
        if n_avg > 1 and t.requires_grad:
            t = _ScaleGrad.apply(t, 1.0 / n_avg)
        return DTensor.from_local(t, mesh, placements, run_check=False)

    return tree_map(wrap, out)
