"""Bias + GELU: ``gelu(x + bias)`` in one pass, exact (erf) or tanh-approximated.

Forward reads ``x`` and ``bias`` and writes the output; ``x + bias`` never exists in
memory. Backward saves only the inputs (``x``, ``bias``) and recomputes ``x + bias`` from
them, writing ``dx`` and per-program fp32 partial column sums of ``dx`` that are reduced
afterwards into ``dbias``. All math is in fp32; results are cast to the tensors' dtypes
on store. The torch backend runs the same recomputing backward with ``aten.gelu_backward``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from autopar.errors import AutoparError
from autopar.runtime.kernels import jit, resolve, tl, triton

APPROXIMATIONS = ("none", "tanh")
_TILE_ELEMENTS = 4096  # elements one program handles per row tile
_MAX_BLOCK_COLS = 1024
_MAX_ROW_PROGRAMS = 128  # backward: programs along rows, each owning one row of dbias partial sums


@jit
def _tanh(u):
    # tanh from exp: saturates to +-1 without overflow problems (exp -> inf gives 1, exp -> 0 gives -1)
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@jit
def _gelu(h, TANH: tl.constexpr):
    if TANH:
        # 0.7978845608028654 = sqrt(2 / pi)
        y = 0.5 * h * (1.0 + _tanh(0.7978845608028654 * (h + 0.044715 * h * h * h)))
    else:
        # 0.7071067811865476 = 1 / sqrt(2)
        y = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    return y


@jit
def _gelu_grad(h, TANH: tl.constexpr):
    if TANH:
        t = _tanh(0.7978845608028654 * (h + 0.044715 * h * h * h))
        dt = (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * h * h)
        d = 0.5 * (1.0 + t) + 0.5 * h * dt
    else:
        # 0.3989422804014327 = 1 / sqrt(2 pi): Phi(h) + h * phi(h)
        d = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476)) + h * 0.3989422804014327 * tl.exp(-0.5 * h * h)
    return d


@jit
def _bias_gelu_fwd_kernel(
    x_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    HAS_BIAS: tl.constexpr,
    TANH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    offs = rows[:, None].to(tl.int64) * N + cols[None, :]
    h = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        h += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs, _gelu(h, TANH).to(y_ptr.dtype.element_ty), mask=mask)


@jit
def _bias_gelu_bwd_kernel(
    grad_ptr,
    x_ptr,
    bias_ptr,
    dx_ptr,
    dbias_partial_ptr,
    M,
    N,
    n_row_tiles,
    n_row_programs,
    HAS_BIAS: tl.constexpr,
    TANH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    dbias = tl.zeros((BLOCK_N,), tl.float32)
    for tile in range(pid_m, n_row_tiles, n_row_programs):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        offs = rows[:, None].to(tl.int64) * N + cols[None, :]
        h = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            h += bias[None, :]
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dx = g * _gelu_grad(h, TANH)  # 0 where masked, since g is
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dbias += tl.sum(dx, axis=0)
    if HAS_BIAS:
        tl.store(dbias_partial_ptr + pid_m * N + cols, dbias, mask=cols < N)


def _blocks(n_rows: int, n_cols: int) -> tuple[int, int]:
    block_n = min(triton.next_power_of_2(n_cols), _MAX_BLOCK_COLS)
    block_m = min(triton.next_power_of_2(n_rows), max(1, _TILE_ELEMENTS // block_n))
    return block_m, block_n


def _triton_forward(x: Tensor, bias: Tensor | None, approximate: str) -> Tensor:
    n = x.shape[-1]
    x2 = x.contiguous().view(-1, n)
    out_dtype = x.dtype if bias is None else torch.promote_types(x.dtype, bias.dtype)
    y = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    block_m, block_n = _blocks(x2.shape[0], n)
    grid = (triton.cdiv(x2.shape[0], block_m), triton.cdiv(n, block_n))
    _bias_gelu_fwd_kernel[grid](
        x2,
        x2 if bias is None else bias.contiguous(),
        y,
        x2.shape[0],
        n,
        HAS_BIAS=bias is not None,
        TANH=approximate == "tanh",
        BLOCK_M=block_m,
        BLOCK_N=block_n,
    )
    return y.view(x.shape)


def _triton_backward(
    grad: Tensor, x: Tensor, bias: Tensor | None, approximate: str
) -> tuple[Tensor, Tensor | None]:
    n = x.shape[-1]
    x2 = x.contiguous().view(-1, n)
    m = x2.shape[0]
    dx = torch.empty_like(x2)
    block_m, block_n = _blocks(m, n)
    n_row_tiles = triton.cdiv(m, block_m)
    n_row_programs = min(n_row_tiles, _MAX_ROW_PROGRAMS)
    dbias_partial = torch.empty((n_row_programs, n), dtype=torch.float32, device=x.device)
    _bias_gelu_bwd_kernel[(n_row_programs, triton.cdiv(n, block_n))](
        grad.contiguous().view(-1, n),
        x2,
        x2 if bias is None else bias.contiguous(),
        dx,
        dbias_partial,
        m,
        n,
        n_row_tiles,
        n_row_programs,
        HAS_BIAS=bias is not None,
        TANH=approximate == "tanh",
        BLOCK_M=block_m,
        BLOCK_N=block_n,
    )
    dbias = None if bias is None else dbias_partial.sum(0).to(bias.dtype)
    return dx.view(x.shape), dbias


def _torch_forward(x: Tensor, bias: Tensor | None, approximate: str) -> Tensor:
    return F.gelu(x if bias is None else x + bias, approximate=approximate)


def _torch_backward(
    grad: Tensor, x: Tensor, bias: Tensor | None, approximate: str
) -> tuple[Tensor, Tensor | None]:
    h = x if bias is None else x + bias
    dh = torch.ops.aten.gelu_backward(grad, h, approximate=approximate)
    dbias = None if bias is None else dh.reshape(-1, x.shape[-1]).sum(0).to(bias.dtype)
    return dh.to(x.dtype), dbias


class _BiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, bias: Tensor | None, approximate: str, backend: str) -> Tensor:
        ctx.save_for_backward(x, bias)
        ctx.approximate = approximate
        ctx.backend = backend
        forward = _triton_forward if backend == "triton" else _torch_forward
        return forward(x, bias, approximate)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, bias = ctx.saved_tensors
        backward = _triton_backward if ctx.backend == "triton" else _torch_backward
        dx, dbias = backward(grad, x, bias, ctx.approximate)
        return dx, dbias, None, None


def bias_gelu(x: Tensor, bias: Tensor | None, approximate: str = "none", backend: str = "auto") -> Tensor:
    """``F.gelu(x + bias, approximate=approximate)`` (``bias`` of size ``x.shape[-1]``, or None),
    differentiable in ``x`` and ``bias``; backward recomputes ``x + bias`` instead of saving it."""
    if approximate not in APPROXIMATIONS:
        raise AutoparError(f"bias_gelu: approximate={approximate!r}; use one of {', '.join(APPROXIMATIONS)}")
    if bias is not None and tuple(bias.shape) != (x.shape[-1],):
        raise AutoparError(
            f"bias_gelu: bias of shape {tuple(bias.shape)} does not match the last dimension of x "
            f"{tuple(x.shape)}; it must be 1-D of size {x.shape[-1]}"
        )
    chosen = resolve(backend, x.device, "bias_gelu")
    if x.numel() == 0:
        chosen = "torch"  # nothing to launch a kernel for
    return _BiasGelu.apply(x, bias, approximate, chosen)
