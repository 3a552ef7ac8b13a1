"""LayerNorm and RMSNorm over the last dimension, forward and backward, one row per program.

``layer_norm`` has ``F.layer_norm``'s numbers; ``rms_norm`` has HuggingFace ``LlamaRMSNorm``'s:
the row is normalized in fp32, cast to the input's dtype, then multiplied by ``weight``
(promoting dtypes as torch does). A row wider than one block is looped over in column
blocks. Forward saves the input, ``weight`` and the per-row fp32 statistics (``mean`` and
``rstd`` for LayerNorm, ``rstd`` for RMSNorm). Backward computes ``dx`` row by row; each
program walks a strided set of rows and keeps its own fp32 partial sums of ``dweight``
and ``dbias``, reduced afterwards. All math is fp32; results are cast on store.
The torch backend is the plain torch formula with torch's autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from autopar.errors import AutoparError
from autopar.runtime.kernels import jit, resolve, tl, triton

_MAX_BLOCK_COLS = 4096
_MAX_BWD_PROGRAMS = 256  # backward: programs over rows, each owning one row of dweight/dbias partial sums


@jit
def _layer_norm_fwd_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    mean_ptr,
    rstd_ptr,
    N,
    eps,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0)
    offset = tl.cast(row, tl.int64) * N
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for c0 in range(0, N, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        acc += tl.load(x_ptr + offset + cols, mask=cols < N, other=0.0).to(tl.float32)
    mean = tl.sum(acc, axis=0) / N
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for c0 in range(0, N, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        mask = cols < N
        x = tl.load(x_ptr + offset + cols, mask=mask, other=0.0).to(tl.float32)
        centered = tl.where(mask, x - mean, 0.0)
        acc += centered * centered
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / N + eps)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)
    for c0 in range(0, N, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        mask = cols < N
        x = tl.load(x_ptr + offset + cols, mask=mask, other=0.0).to(tl.float32)
        y = (x - mean) * rstd
        if HAS_WEIGHT:
            y *= tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + offset + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@jit
def _layer_norm_bwd_kernel(
    dy_ptr,
    x_ptr,
    w_ptr,
    mean_ptr,
    rstd_ptr,
    dx_ptr,
    dw_partial_ptr,
    db_partial_ptr,
    M,
    N,
    n_programs,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    partial_offset = tl.cast(pid, tl.int64) * N
    for row in range(pid, M, n_programs):
        offset = tl.cast(row, tl.int64) * N
        mean = tl.load(mean_ptr + row)
        rstd = tl.load(rstd_ptr + row)
        # dx = rstd * (w*dy - mean(xhat * w*dy) * xhat - mean(w*dy))
        acc_xhat_wdy = tl.zeros((BLOCK_N,), tl.float32)
        acc_wdy = tl.zeros((BLOCK_N,), tl.float32)
        for c0 in range(0, N, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N)
            mask = cols < N
            x = tl.load(x_ptr + offset + cols, mask=mask, other=0.0).to(tl.float32)
            wdy = tl.load(dy_ptr + offset + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_WEIGHT:
                wdy *= tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            acc_xhat_wdy += (x - mean) * rstd * wdy  # wdy is 0 past the row's end
            acc_wdy += wdy
        c_xhat = tl.sum(acc_xhat_wdy, axis=0) / N
        c_one = tl.sum(acc_wdy, axis=0) / N
        for c0 in range(0, N, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N)
            mask = cols < N
            x = tl.load(x_ptr + offset + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offset + cols, mask=mask, other=0.0).to(tl.float32)
            xhat = (x - mean) * rstd
            wdy = dy
            if HAS_WEIGHT:
                wdy = dy * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                dw = tl.load(dw_partial_ptr + partial_offset + cols, mask=mask, other=0.0)
                tl.store(dw_partial_ptr + partial_offset + cols, dw + dy * xhat, mask=mask)
            if HAS_BIAS:
                db = tl.load(db_partial_ptr + partial_offset + cols, mask=mask, other=0.0)
                tl.store(db_partial_ptr + partial_offset + cols, db + dy, mask=mask)
            dx = (wdy - (xhat * c_xhat + c_one)) * rstd
            tl.store(dx_ptr + offset + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@jit
def _rms_norm_fwd_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr, N, eps, HAS_WEIGHT: tl.constexpr, BLOCK_N: tl.constexpr
):
    row = tl.program_id(0)
    offset = tl.cast(row, tl.int64) * N
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for c0 in range(0, N, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        x = tl.load(x_ptr + offset + cols, mask=cols < N, other=0.0).to(tl.float32)
        acc += x * x
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / N + eps)
    tl.store(rstd_ptr + row, rstd)
    for c0 in range(0, N, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        mask = cols < N
        x = tl.load(x_ptr + offset + cols, mask=mask, other=0.0).to(tl.float32)
        y = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)  # HF casts to x's dtype before weight
        if HAS_WEIGHT:
            y *= tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + offset + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@jit
def _rms_norm_bwd_kernel(
    dy_ptr,
    x_ptr,
    w_ptr,
    rstd_ptr,
    dx_ptr,
    dw_partial_ptr,
    M,
    N,
    n_programs,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    partial_offset = tl.cast(pid, tl.int64) * N
    for row in range(pid, M, n_programs):
        offset = tl.cast(row, tl.int64) * N
        rstd = tl.load(rstd_ptr + row)
        # with xhat = x * rstd and g = w*dy: dx = rstd * (g - xhat * mean(g * xhat))
        acc = tl.zeros((BLOCK_N,), tl.float32)
        for c0 in range(0, N, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N)
            mask = cols < N
            x = tl.load(x_ptr + offset + cols, mask=mask, other=0.0).to(tl.float32)
            wdy = tl.load(dy_ptr + offset + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_WEIGHT:
                wdy *= tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            acc += wdy * x * rstd
        c_xhat = tl.sum(acc, axis=0) / N
        for c0 in range(0, N, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N)
            mask = cols < N
            x = tl.load(x_ptr + offset + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offset + cols, mask=mask, other=0.0).to(tl.float32)
            xhat = x * rstd
            wdy = dy
            if HAS_WEIGHT:
                wdy = dy * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                y = xhat.to(x_ptr.dtype.element_ty).to(tl.float32)  # the forward's rounded output
                dw = tl.load(dw_partial_ptr + partial_offset + cols, mask=mask, other=0.0)
                tl.store(dw_partial_ptr + partial_offset + cols, dw + dy * y, mask=mask)
            dx = (wdy - xhat * c_xhat) * rstd
            tl.store(dx_ptr + offset + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _block_n(n: int) -> int:
    return min(triton.next_power_of_2(n), _MAX_BLOCK_COLS)


def _rows(x: Tensor) -> Tensor:
    """``x`` as a contiguous [rows, last dim] matrix."""
    return x.contiguous().view(-1, x.shape[-1])


def _partials(n_programs: int, x2: Tensor) -> Tensor:
    """Zeroed fp32 per-program partial sums of a [last dim] gradient."""
    return torch.zeros((n_programs, x2.shape[1]), dtype=torch.float32, device=x2.device)


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
        x2 = _rows(x)
        m, n = x2.shape
        weight = None if weight is None else weight.contiguous()
        y = torch.empty_like(x2)
        mean = torch.empty(m, dtype=torch.float32, device=x.device)
        rstd = torch.empty(m, dtype=torch.float32, device=x.device)
        _layer_norm_fwd_kernel[(m,)](
            x2,
            x2 if weight is None else weight,
            x2 if bias is None else bias.contiguous(),
            y,
            mean,
            rstd,
            n,
            eps,
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None,
            BLOCK_N=_block_n(n),
        )
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, ...]:
        x2, weight, mean, rstd = ctx.saved_tensors
        m, n = x2.shape
        n_programs = min(m, _MAX_BWD_PROGRAMS)
        dx = torch.empty_like(x2)
        dw_partial = None if weight is None else _partials(n_programs, x2)
        db_partial = None if ctx.bias_dtype is None else _partials(n_programs, x2)
        _layer_norm_bwd_kernel[(n_programs,)](
            _rows(dy),
            x2,
            x2 if weight is None else weight,
            mean,
            rstd,
            dx,
            x2 if dw_partial is None else dw_partial,
            x2 if db_partial is None else db_partial,
            m,
            n,
            n_programs,
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=db_partial is not None,
            BLOCK_N=_block_n(n),
        )
        dweight = None if dw_partial is None else dw_partial.sum(0).to(weight.dtype)
        dbias = None if db_partial is None else db_partial.sum(0).to(ctx.bias_dtype)
        return dx.view(dy.shape), dweight, dbias, None


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
        x2 = _rows(x)
        m, n = x2.shape
        weight = None if weight is None else weight.contiguous()
        out_dtype = x.dtype if weight is None else torch.promote_types(weight.dtype, x.dtype)
        y = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
        rstd = torch.empty(m, dtype=torch.float32, device=x.device)
        _rms_norm_fwd_kernel[(m,)](
            x2,
            x2 if weight is None else weight,
            y,
            rstd,
            n,
            eps,
            HAS_WEIGHT=weight is not None,
            BLOCK_N=_block_n(n),
        )
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, ...]:
        x2, weight, rstd = ctx.saved_tensors
        m, n = x2.shape
        n_programs = min(m, _MAX_BWD_PROGRAMS)
        dx = torch.empty_like(x2)
        dw_partial = None if weight is None else _partials(n_programs, x2)
        _rms_norm_bwd_kernel[(n_programs,)](
            _rows(dy),
            x2,
            x2 if weight is None else weight,
            rstd,
            dx,
            x2 if dw_partial is None else dw_partial,
            m,
            n,
            n_programs,
            HAS_WEIGHT=weight is not None,
            BLOCK_N=_block_n(n),
        )
        dweight = None if dw_partial is None else dw_partial.sum(0).to(weight.dtype)
        return dx.view(dy.shape), dweight, None


def _check_param(kernel: str, name: str, p: Tensor | None, x: Tensor) -> None:
    if p is not None and tuple(p.shape) != (x.shape[-1],):
        raise AutoparError(
            f"{kernel}: {name} of shape {tuple(p.shape)} must be 1-D of size {x.shape[-1]}, "
            f"the last dimension of the input {tuple(x.shape)}"
        )


def layer_norm(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, backend: str = "auto"
) -> Tensor:
    """``F.layer_norm(x, (x.shape[-1],), weight, bias, eps)``, differentiable in all three."""
    _check_param("layer_norm", "weight", weight, x)
    _check_param("layer_norm", "bias", bias, x)
    if resolve(backend, x.device, "layer_norm") == "torch" or x.numel() == 0:
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return _LayerNorm.apply(x, weight, bias, eps)


def rms_norm(x: Tensor, weight: Tensor | None, eps: float, backend: str = "auto") -> Tensor:
    """HuggingFace ``LlamaRMSNorm``: ``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)``, the norm
    in fp32, differentiable in ``x`` and ``weight``."""
    _check_param("rms_norm", "weight", weight, x)
    if resolve(backend, x.device, "rms_norm") == "torch" or x.numel() == 0:
        h = x.to(torch.float32)
        out = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
        return out if weight is None else weight * out
    return _RMSNorm.apply(x, weight, eps)
