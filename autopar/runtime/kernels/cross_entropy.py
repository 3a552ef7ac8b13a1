"""The local pieces of a vocabulary-parallel softmax cross-entropy.

Each rank holds ``logits[N, V_local]``, the vocabulary columns ``[vocab_offset,
vocab_offset + V_local)``; the caller all-reduces between the steps:

1. :func:`row_max`: the local row maxima (the caller takes the max over ranks);
2. :func:`sumexp_and_target`: ``sum_v exp(logits - global_max)`` and the target's logit
   where this rank holds the target's column, else 0 (both summed over ranks);
3. :func:`logits_grad`: ``grad_loss * (softmax - onehot(target))`` for the local columns.

Each Triton program handles one row and loops over the vocabulary in blocks, in fp32;
nothing is saved between the steps except the caller's [N] vectors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from autopar.errors import AutoparError
from autopar.runtime.kernels import jit, resolve, tl, triton

_MAX_BLOCK_VOCAB = 4096


@jit
def _row_max_kernel(logits_ptr, out_ptr, V, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    logits_row = logits_ptr + tl.cast(row, tl.int64) * V
    acc = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(logits_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        acc = tl.maximum(acc, x)
    tl.store(out_ptr + row, tl.max(acc, axis=0))


@jit
def _sumexp_and_target_kernel(
    logits_ptr, row_max_ptr, target_ptr, sumexp_ptr, target_logit_ptr, V, vocab_offset, BLOCK_V: tl.constexpr
):
    row = tl.program_id(0)
    logits_row = logits_ptr + tl.cast(row, tl.int64) * V
    row_max = tl.load(row_max_ptr + row)
    acc = tl.zeros((BLOCK_V,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(logits_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        acc += tl.exp(x - row_max)  # exp(-inf) = 0 past the row's end
    tl.store(sumexp_ptr + row, tl.sum(acc, axis=0))
    local = tl.load(target_ptr + row) - vocab_offset
    here = (local >= 0) & (local < V)
    target_logit = tl.load(logits_row + tl.where(here, local, 0), mask=here, other=0.0).to(tl.float32)
    tl.store(target_logit_ptr + row, target_logit)


@jit
def _logits_grad_kernel(
    logits_ptr,
    row_max_ptr,
    sumexp_ptr,
    target_ptr,
    grad_loss_ptr,
    grad_ptr,
    V,
    vocab_offset,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    row_offset = tl.cast(row, tl.int64) * V
    row_max = tl.load(row_max_ptr + row)
    inv_sumexp = 1.0 / tl.load(sumexp_ptr + row)
    local = tl.load(target_ptr + row) - vocab_offset
    grad_loss = tl.load(grad_loss_ptr + row)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(logits_ptr + row_offset + cols, mask=mask, other=0.0).to(tl.float32)
        softmax = tl.exp(x - row_max) * inv_sumexp
        grad = grad_loss * (softmax - tl.where(cols == local, 1.0, 0.0))
        tl.store(grad_ptr + row_offset + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)


def _block_v(v: int) -> int:
    return min(triton.next_power_of_2(v), _MAX_BLOCK_VOCAB)


def _check(logits: Tensor, kernel: str, **vectors: Tensor) -> None:
    if logits.dim() != 2:
        raise AutoparError(f"{kernel}: logits must be 2-D [N, V_local], got shape {tuple(logits.shape)}")
    for name, t in vectors.items():
        if tuple(t.shape) != (logits.shape[0],):
            raise AutoparError(
                f"{kernel}: {name} of shape {tuple(t.shape)} must be [N] = [{logits.shape[0]}] "
                f"for logits of shape {tuple(logits.shape)}"
            )


def _runs_triton(logits: Tensor, backend: str, kernel: str) -> bool:
    return resolve(backend, logits.device, kernel) == "triton" and logits.numel() > 0


def row_max(logits: Tensor, backend: str = "auto") -> Tensor:
    """The float32 maximum of each row of ``logits[N, V_local]``: shape [N]."""
    _check(logits, "row_max")
    if not _runs_triton(logits, backend, "row_max"):
        return logits.float().amax(dim=-1)
    logits = logits.contiguous()
    n, v = logits.shape
    out = torch.empty(n, dtype=torch.float32, device=logits.device)
    _row_max_kernel[(n,)](logits, out, v, BLOCK_V=_block_v(v))
    return out


def sumexp_and_target(
    logits: Tensor, row_max: Tensor, target: Tensor, vocab_offset: int, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """``(sumexp, target_logit)``, float32 [N]: ``sumexp[n] = sum_v exp(logits[n, v] - row_max[n])``
    with the global ``row_max``, and ``target_logit[n] = logits[n, target[n] - vocab_offset]`` where
    that column is local, else 0 (ignored rows, other ranks' targets)."""
    _check(logits, "sumexp_and_target", row_max=row_max, target=target)
    if not _runs_triton(logits, backend, "sumexp_and_target"):
        x = logits.float()
        sumexp = torch.exp(x - row_max[:, None]).sum(dim=-1)
        local = target - vocab_offset
        here = (local >= 0) & (local < logits.shape[1])
        picked = x.gather(1, torch.where(here, local, 0)[:, None]).squeeze(1)
        return sumexp, torch.where(here, picked, 0.0)
    logits = logits.contiguous()
    n, v = logits.shape
    sumexp = torch.empty(n, dtype=torch.float32, device=logits.device)
    target_logit = torch.empty(n, dtype=torch.float32, device=logits.device)
    _sumexp_and_target_kernel[(n,)](
        logits,
        row_max.float().contiguous(),
        target.contiguous(),
        sumexp,
        target_logit,
        v,
        vocab_offset,
        BLOCK_V=_block_v(v),
    )
    return sumexp, target_logit


def logits_grad(
    logits: Tensor,
    row_max: Tensor,
    sumexp: Tensor,
    target: Tensor,
    vocab_offset: int,
    grad_loss: Tensor,
    backend: str = "auto",
) -> Tensor:
    """``grad_loss[n] * (exp(logits[n, v] - row_max[n]) / sumexp[n] - [v + vocab_offset == target[n]])``,
    [N, V_local] in logits' dtype; ``row_max`` and ``sumexp`` are the global (all-reduced) ones."""
    _check(logits, "logits_grad", row_max=row_max, sumexp=sumexp, target=target, grad_loss=grad_loss)
    if not _runs_triton(logits, backend, "logits_grad"):
        softmax = torch.exp(logits.float() - row_max[:, None]) / sumexp[:, None]
        cols = torch.arange(logits.shape[1], device=logits.device) + vocab_offset
        onehot = cols[None, :] == target[:, None]
        return (grad_loss.float()[:, None] * (softmax - onehot.float())).to(logits.dtype)
    logits = logits.contiguous()
    n, v = logits.shape
    grad = torch.empty_like(logits)
    _logits_grad_kernel[(n,)](
        logits,
        row_max.float().contiguous(),
        sumexp.float().contiguous(),
        target.contiguous(),
        grad_loss.float().contiguous(),
        grad,
        v,
        vocab_offset,
        BLOCK_V=_block_v(v),
    )
    return grad
