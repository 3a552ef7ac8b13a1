"""Passes apply a Plan to the traced graph; none makes a sharding decision of its own."""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

from autopar.passes.fuse import fuse_kernels
from autopar.passes.layouts import insert_layouts
from autopar.passes.recompute import wrap_recomputed
from autopar.passes.shard_params import shard_parameters
from autopar.runtime import zero
from autopar.solver.plan import Plan


def apply_plan(
    gm: fx.GraphModule, plan: Plan, mesh: DeviceMesh, weights: nn.Module | None = None
) -> fx.GraphModule:
    """Shard parameters, insert every planned layout change, swap in the fused kernels, and
    checkpoint the recomputed blocks; returns the emitted module (whose forward gathers
    ``zero3`` parameters again in backward, ``runtime.zero``). Parameters and buffers take
    their values from ``weights`` (the user's model) where it has them, else from ``gm``."""
    plan.check_matches(gm, tuple(mesh.shape))
    gm = shard_parameters(gm, plan, mesh, weights)
    gm = insert_layouts(gm, plan, mesh)
    gm = fuse_kernels(gm, plan)
    gm = wrap_recomputed(gm, plan)
    if "zero3" in plan.param_modes().values():
        zero.install(gm)
    gm.plan = plan
    return gm


__all__ = ["apply_plan"]
