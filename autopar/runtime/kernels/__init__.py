"""Fused kernels the emitted module calls (``passes.fuse``) and the optimizer steps with.

Every kernel has a torch implementation with the same numbers; which one runs is a
*backend*:

- ``"triton"``: Triton kernels, on CUDA tensors, or on CPU tensors when
  ``TRITON_INTERPRET=1`` (the tests run them so);
- ``"torch"``: plain torch ops, anywhere;
- ``"auto"``: Triton where it can run on the tensor's device, else torch.

Asking for ``"triton"`` where it cannot run is a :class:`autopar.KernelError` that says why.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from autopar.errors import KernelError

BACKENDS = ("auto", "triton", "torch")


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


if triton_installed():
    import triton
    import triton.language as tl

    jit = triton.jit
else:  # only backend="torch" can run: resolve() never picks the kernels, which stay plain functions
    triton = tl = None

    def jit(fn):
        return fn


#: whether Triton runs its kernels in the CPU interpreter: ``@triton.jit`` decides when a kernel
#: is defined (when this package is imported), so setting ``TRITON_INTERPRET`` later changes nothing
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def triton_runs_on(device: torch.device) -> bool:
    """Whether Triton kernels can run on tensors of ``device``."""
    if not triton_installed():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and INTERPRETED


def resolve(backend: str, device: torch.device, kernel: str) -> str:
    """The backend that runs ``kernel`` on ``device``: ``"triton"`` or ``"torch"``."""
    if backend not in BACKENDS:
        raise KernelError(f"{kernel}: unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return "torch"
    if triton_runs_on(device):
        return "triton"
    if backend == "auto":
        return "torch"
    why = (
        "triton is not installed (pip install triton)"
        if not triton_installed()
        else f"Triton runs on CUDA tensors, or on CPU ones with TRITON_INTERPRET=1; these are on {device}"
    )
    raise KernelError(f"{kernel}: backend='triton' cannot run here: {why}; or pass backend='torch'")
