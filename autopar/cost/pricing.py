"""The prices the strategy graph asks for: an op under a strategy, a parameter's optimizer step,
each mesh axis's links. From the hardware table (roofline, alpha-beta), or, given a profile
database (``cost.profile_db``), from what was measured on the device, with the roofline
fitted to the measurements for the rest. The plan records which were measured."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.distributed.tensor import Shard

from autopar.cost.comm import collective_time_s
from autopar.cost.compute import BACKWARD_OVER_FORWARD, optimizer_step_s, roofline_s
from autopar.cost.hardware import Hardware, Link
from autopar.cost.profile_db import Profile, op_signature
from autopar.solver import rules
from autopar.solver.rules.base import Strategy, out_tensors, tensor_args
from autopar.solver.specs import local_numel

#: a fused kernel's backward moves 3 tensors to its forward's 2
FUSED_BACKWARD_OVER_FORWARD = 1.5


@dataclass
class Pricing:
    hw: Hardware
    profile: Profile | None = None

    @functools.cached_property
    def _fallback(self) -> tuple[float, float]:
        return self.profile.fallback(self.hw) if self.profile else (0.0, 1.0)

    def links(self, mesh_shape: Sequence[int]) -> tuple[Link, ...]:
        if self.profile is None:
            return self.hw.axis_links(mesh_shape)
        return self.profile.axis_links(mesh_shape, self.hw)

    def optimizer_s(self, numel: int, itemsize: int, mesh_shape: Sequence[int]) -> float:
        """One parameter's AdamW step (``numel`` elements of ``itemsize`` bytes on this device)."""
        measured = self.profile.optimizer_s(mesh_shape, numel * itemsize) if self.profile else None
        return measured if measured is not None else optimizer_step_s(numel, itemsize, self.hw)

    def op_s(
        self,
        node: fx.Node,
        s: Strategy,
        grads: Sequence[bool],
        requires_grad: bool,
        out_bytes: int,
        mesh_shape: Sequence[int],
    ) -> float:
        """Forward (and, when a gradient flows, backward) time of ``node`` under ``s``."""
        if self.profile is not None:
            hit = self.profile.op_s(op_signature(node, s.ins, grads, mesh_shape))
            if hit is not None:
                fwd, bwd = hit
                return fwd + (bwd or 0.0) if requires_grad else fwd
        flops, nbytes, dtype = work(node, s, out_bytes, mesh_shape)
        overhead_s, efficiency = self._fallback
        fwd = overhead_s + roofline_s(flops, nbytes, dtype, self.hw) / efficiency
        return (fwd * (1 + BACKWARD_OVER_FORWARD) if requires_grad else fwd) + self.inner_s(
            node, s, mesh_shape
        )

    def fused_s(self, out_bytes: int, requires_grad: bool) -> float:
        """A fused chain's kernel (``solver.fusion``), priced at its tail: memory-bound, it
        reads the chain's input and writes its result once (weights are small); backward reads
        the input and the output's gradient and writes the input's."""
        overhead_s, efficiency = self._fallback
        fwd = overhead_s + 2 * out_bytes / self.hw.hbm_bytes_per_s / efficiency
        return fwd * (1 + FUSED_BACKWARD_OVER_FORWARD) if requires_grad else fwd

    def inner_s(self, node: fx.Node, s: Strategy, mesh_shape: Sequence[int]) -> float:
        """The collectives ``s`` runs inside the op (a measured op's time includes them)."""
        inner = rules.INNER_COLLECTIVES.get(node.target)
        if inner is None:
            return 0.0
        links = self.links(tuple(mesh_shape))
        return sum(
            collective_time_s(kind, nbytes, mesh_shape[axis], links[axis])
            for kind, axis, nbytes in inner(node, s, mesh_shape)
        )


def out_bytes(node: fx.Node, spec, mesh_shape: Sequence[int]) -> int:
    """Bytes of one device's share of ``node``'s outputs laid out as ``spec``."""
    return sum(local_numel(t.shape, spec, mesh_shape) * t.element_size() for t in out_tensors(node))


def work(
    node: fx.Node, s: Strategy, out_bytes: int, mesh_shape: Sequence[int]
) -> tuple[float, int, torch.dtype]:
    """(FLOPs, bytes read and written, dtype) of one device's share of ``node`` under ``s``."""
    shard_axes = {i for spec in (s.out,) + s.ins for i, p in enumerate(spec) if isinstance(p, Shard)}
    flops = rules.forward_flops(node) / math.prod(mesh_shape[i] for i in shard_axes)
    in_bytes = sum(
        local_numel(a.meta["val"].shape, spec, mesh_shape) * a.meta["val"].element_size()
        for a, spec in zip(tensor_args(node), s.ins)
    )
    v = node.meta["val"]
    dtype = v.dtype if isinstance(v, torch.Tensor) else v[0].dtype
    return flops, in_bytes + out_bytes, dtype
