"""Roofline compute time: an op takes max(FLOPs / peak, bytes moved / HBM bandwidth)."""

from __future__ import annotations

import torch

from autopar.cost.hardware import Hardware

# Backward costs about twice the forward (two matmuls per matmul; the same for memory-bound ops).
BACKWARD_OVER_FORWARD = 2.0
# An AdamW step reads param, grad, two moments and writes param and two moments.
ADAMW_ACCESSES_PER_ELEMENT = 7


def roofline_s(flops: float, nbytes: float, dtype: torch.dtype, hw: Hardware) -> float:
    return max(flops / hw.peak_flops(dtype), nbytes / hw.hbm_bytes_per_s)


def optimizer_step_s(local_numel: int, itemsize: int, hw: Hardware) -> float:
    return local_numel * itemsize * ADAMW_ACCESSES_PER_ELEMENT / hw.hbm_bytes_per_s


def host_optimizer_step_s(local_numel: int, itemsize: int, hw: Hardware) -> float:
    """An AdamW step on the host CPU, for offloaded states (memory-bound there too)."""
    return local_numel * itemsize * ADAMW_ACCESSES_PER_ELEMENT / hw.host_bytes_per_s
