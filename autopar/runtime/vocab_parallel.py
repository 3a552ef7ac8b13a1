"""Softmax cross entropy over vocabulary-sharded logits, without gathering them.

Each rank holds ``logits[rows, V / n]``, the columns ``[offset, offset + V / n)`` of the
vocabulary, and every target. For each row (fp32 throughout):

1. ``m``: the row's maximum over the local columns, all-reduced (max) over the sharded axes;
2. ``s``: the sum of ``exp(logit - m)`` over the local columns, and ``t``: the target's logit
   where the target falls in this rank's columns (else 0); both all-reduced (sum) in one call;
3. ``loss = log(s) + m - t`` (0 for ``ignore_index`` rows).

Backward needs no communication: ``d logits = grad * (exp(logit - m) / s - onehot(target))``
on the local columns, from the saved logits and the two ``[rows]`` statistics. The local
pieces are kernels (``runtime.kernels.cross_entropy``: Triton where it runs, else torch).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from autopar.runtime.kernels import cross_entropy as ce

#: ``reduction`` codes of ``aten.cross_entropy_loss`` (a mean reaches here as a sum: ``tracer.lowerings``)
REDUCTIONS = {0: "none", 2: "sum"}


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, offset, groups, reduction, ignore_index, backend):  # type: ignore[override]
        row_max = ce.row_max(logits, backend)
        for g in groups:
            dist.all_reduce(row_max, dist.ReduceOp.MAX, group=g)
        sumexp, target_logit = ce.sumexp_and_target(logits, row_max, target, offset, backend)
        both = torch.stack([sumexp, target_logit])
        for g in groups:
            dist.all_reduce(both, group=g)
        sumexp = both[0]
        counted = target != ignore_index
        rows = torch.where(counted, sumexp.log() + row_max - both[1], torch.zeros_like(sumexp))
        ctx.save_for_backward(logits, row_max, sumexp, target, counted)
        ctx.offset, ctx.reduction, ctx.backend = offset, reduction, backend
        return (rows if reduction == "none" else rows.sum()).to(logits.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        logits, row_max, sumexp, target, counted = ctx.saved_tensors
        grad_rows = grad.float().expand(target.shape) if ctx.reduction != "none" else grad.float()
        grad_rows = torch.where(counted, grad_rows, torch.zeros_like(grad_rows))
        d_logits = ce.logits_grad(logits, row_max, sumexp, target, ctx.offset, grad_rows, ctx.backend)
        return d_logits, None, None, None, None, None, None


def vocab_axes(logits: DTensor) -> list[int]:
    """The mesh axes along which ``logits[rows, vocab]`` is sharded by vocabulary."""
    return [i for i, p in enumerate(logits.placements) if isinstance(p, Shard) and p.dim % 2 == 1]


def cross_entropy(
    local_logits: torch.Tensor,
    local_target: torch.Tensor,
    logits: DTensor,
    offset: int,
    reduction: int = 2,
    ignore_index: int = -100,
    backend: str = "auto",
) -> torch.Tensor:
    """This rank's loss from its vocabulary columns (``logits`` gives the mesh and layout;
    ``offset`` is its first column): the whole loss, the same on every rank of the axes."""
    mesh = logits.device_mesh
    groups = [mesh.get_group(i) for i in vocab_axes(logits)]
    target = local_target.contiguous()
    return _VocabParallelCE.apply(
        local_logits.contiguous(), target, offset, groups, REDUCTIONS[reduction], ignore_index, backend
    )
