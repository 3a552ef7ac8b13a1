"""One AdamW step in place, with ``torch.optim.AdamW``'s update (amsgrad and maximize off).

For each parameter ``p`` with gradient ``g`` and moments ``m``, ``v`` (in ``p``'s dtype)::

    p *= 1 - lr * weight_decay
    m += (1 - beta1) * (g - m)                  # = beta1 * m + (1 - beta1) * g, as torch's lerp
    v = beta2 * v + (1 - beta2) * g * g
    p -= lr / (1 - beta1**step) * m / (sqrt(v) / sqrt(1 - beta2**step) + eps)

The Triton kernel reads ``p``, ``g``, ``m``, ``v`` once and writes ``p``, ``m``, ``v`` once,
with fp32 math; one launch per tensor over its flat elements. The torch backend runs the
same ``torch._foreach_*`` sequence as ``torch.optim.AdamW(foreach=True)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from autopar.errors import AutoparError
from autopar.runtime.kernels import jit, resolve, tl, triton

_BLOCK = 1024


@jit
def _adamw_kernel(
    p_ptr,
    g_ptr,
    m_ptr,
    v_ptr,
    n_elements,
    decay,
    beta1,
    beta2,
    step_size,
    bias_correction2_sqrt,
    eps,
    BLOCK: tl.constexpr,
):
    offs = tl.cast(tl.program_id(0), tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p = p * decay
    m = m + (1.0 - beta1) * (g - m)
    v = v * beta2 + (1.0 - beta2) * g * g
    p = p - step_size * (m / (tl.sqrt(v) / bias_correction2_sqrt + eps))
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)


def adamw_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    backend: str = "auto",
) -> None:
    """Update ``params``, ``exp_avgs`` and ``exp_avg_sqs`` in place by one AdamW step; ``step`` is
    the step number after incrementing (1 on the first call)."""
    if not len(params) == len(grads) == len(exp_avgs) == len(exp_avg_sqs):
        raise AutoparError(
            f"adamw_step: {len(params)} params, {len(grads)} grads, {len(exp_avgs)} exp_avgs and "
            f"{len(exp_avg_sqs)} exp_avg_sqs; the lists must be parallel"
        )
    if not params:
        return
    if step < 1:
        raise AutoparError(f"adamw_step: step={step}; it counts from 1 (the step number after incrementing)")
    step_size = lr / (1 - beta1**step)
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    if resolve(backend, params[0].device, "adamw_step") == "torch":
        if weight_decay != 0:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denom, -step_size)
        return
    for i, tensors in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        if any(not t.is_contiguous() or t.numel() != tensors[0].numel() for t in tensors):
            raise AutoparError(
                f"adamw_step: params[{i}] and its grad and moments must be contiguous with the same "
                f"number of elements; shapes {[tuple(t.shape) for t in tensors]}"
            )
        n = tensors[0].numel()
        if n == 0:
            continue
        _adamw_kernel[(triton.cdiv(n, _BLOCK),)](
            *tensors,
            n,
            1 - lr * weight_decay,
            beta1,
            beta2,
            step_size,
            bias_correction2_sqrt,
            eps,
            BLOCK=_BLOCK,
        )
