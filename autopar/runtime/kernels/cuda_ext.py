"""The CUDA C++ kernels of ``cuda_ext/`` (fused AdamW; LayerNorm forward and backward).

:func:`load` returns the extension module: ``autopar._cuda_ext`` where it was built at install
time (``BUILD_EXT=1 pip install --no-build-isolation .``), else one built on first use from the ``cuda_ext/``
sources of a source (or editable) checkout with ``torch.utils.cpp_extension.load`` into torch's
extensions directory. Where neither can be had (torch without CUDA, no nvcc, no sources, a
failing build) it raises :class:`autopar.KernelError` saying why.

:func:`cuda_adamw_step` has :func:`autopar.runtime.kernels.cpu_adam.cpu_adamw_step`'s
signature; :func:`cuda_layer_norm` normalizes over the last dimension and is differentiable.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch

from autopar.errors import KernelError
from autopar.runtime.kernels.cpu_adam import build_extension, load_once

#: the sources in a checkout: the repository root holds both ``autopar/`` and ``cuda_ext/``
SOURCE_DIR = Path(__file__).resolve().parents[3] / "cuda_ext"


def _build() -> ModuleType:
    try:
        return importlib.import_module("autopar._cuda_ext")
    except ImportError:
        pass
    if torch.version.cuda is None:
        raise KernelError(
            f"cuda_ext: this torch ({torch.__version__}) is built without CUDA (torch.version.cuda is None); "
            "install a CUDA build of torch, or pass backend='torch'"
        )
    sources = sorted(SOURCE_DIR.glob("*.cu")) + [SOURCE_DIR / "bindings.cpp"]
    if not sources[-1].is_file():
        raise KernelError(
            f"cuda_ext: the CUDA sources are not at {SOURCE_DIR} and autopar._cuda_ext is not installed; "
            "install from a source checkout, or BUILD_EXT=1 pip install --no-build-isolation ., "
            "or pass backend='torch'"
        )
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None or not (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        raise KernelError(
            "cuda_ext: nvcc not found (set CUDA_HOME to a CUDA toolkit matching torch's CUDA "
            f"{torch.version.cuda}); or pass backend='torch'"
        )
    return build_extension("cuda_ext", "autopar_cuda_ext", sources, extra_cuda_cflags=["-O3"])


#: the extension module, loaded or built on the first call in a process
load = load_once(_build)


def cuda_adamw_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step of all ``params`` (contiguous CUDA tensors of one dtype: fp32, fp16 or
    bf16; gradients and moments in the same dtype), in place, with fp32 math; ``step`` is the
    step number after incrementing."""
    load().adamw_step(
        list(params), list(grads), list(exp_avgs), list(exp_avg_sqs),
        int(step), float(lr), float(beta1), float(beta2), float(eps), float(weight_decay),
    )  # fmt: skip


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
    ) -> torch.Tensor:
        rows, weight = x.reshape(-1, x.shape[-1]).contiguous(), weight.contiguous()
        bias = None if bias is None else bias.contiguous()
        y, mean, rstd = load().layer_norm_fwd(rows, weight, bias, float(eps))
        ctx.save_for_backward(rows, weight, mean, rstd)
        ctx.has_bias = bias is not None
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        rows, weight, mean, rstd = ctx.saved_tensors
        dy_rows = dy.reshape(rows.shape).contiguous()
        dx, dweight, dbias = load().layer_norm_bwd(dy_rows, rows, weight, mean, rstd)
        return dx.view(dy.shape), dweight, dbias if ctx.has_bias else None, None


def cuda_layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5
) -> torch.Tensor:
    """``F.layer_norm(x, x.shape[-1:], weight, bias, eps)`` with the CUDA kernels (fp32 math;
    ``x``, ``weight`` and ``bias`` of one dtype: fp32, fp16 or bf16)."""
    return _LayerNorm.apply(x, weight, bias, eps)
