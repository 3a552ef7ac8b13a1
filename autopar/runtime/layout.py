"""Layout operations the emitted graph calls; each is autograd-aware.

- :func:`reshard` changes a DTensor's layout (``"S0R"`` -> ``"RR"``...). Its backward is the
  transpose: all-gather <-> reduce-scatter / slice, all-reduce <-> identity (DTensor's
  redistribute), so gradient synchronization follows from the forward layout.
- :func:`sync_grad` wraps a parameter: identity forward; backward turns the accumulated
  gradient into the parameter's own layout (partial sums are all-reduced or reduce-scattered),
  so ``p.grad`` has ``p``'s placements when ``backward()`` returns.
- :func:`distribute_input` takes this rank's shard of a global input every rank passes.

Ops that run on local shards instead of through DTensor are in ``runtime.local_ops``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from autopar.errors import ShardingError
from autopar.solver.specs import Spec, parse, replicated


class MeshContext(nn.Module):
    """Holds the device mesh for the emitted graph (no parameters, no state)."""

    def __init__(self, mesh: DeviceMesh) -> None:
        super().__init__()
        self.mesh = mesh

    def extra_repr(self) -> str:
        return f"mesh={tuple(self.mesh.shape)}"


def local_shard(full: torch.Tensor, spec: Spec, mesh: DeviceMesh) -> torch.Tensor:
    """This rank's piece of ``full`` under ``spec`` (mesh dims applied in order, as DTensor does)."""
    coord = mesh.get_coordinate()
    out = full
    for i, p in enumerate(spec):
        if isinstance(p, Shard):
            out = out.chunk(mesh.size(i), dim=p.dim)[coord[i]]
    return out


def to_dtensor(full: torch.Tensor, spec: Spec, mesh: DeviceMesh) -> DTensor:
    """Wrap a copy of this rank's shard of a tensor every rank holds in full; no communication."""
    return DTensor.from_local(
        local_shard(full, spec, mesh).clone(memory_format=torch.contiguous_format),
        mesh,
        spec,
        run_check=False,
        shape=full.shape,
        stride=full.stride(),
    )


def distribute_input(
    x: Any, ctx: MeshContext, spec: str, name: str, shape: list[int], dtype: torch.dtype
) -> Any:
    """This rank's shard of a global input; a floating input in the traced dtype (mixed
    precision casts it)."""
    if not isinstance(x, torch.Tensor):
        return x
    if x.is_floating_point() and dtype.is_floating_point and x.dtype != dtype:
        x = x.to(dtype)
    if list(x.shape) != list(shape):
        raise ShardingError(
            f"input {name!r} has shape {list(x.shape)} but the plan was made for {shape}; "
            "every rank passes the global inputs of the traced shape (make a new plan for new shapes)"
        )
    return to_dtensor(x, parse(spec), ctx.mesh)


def to_dtype(x: DTensor, dtype: torch.dtype) -> DTensor:
    """A parameter's compute copy under mixed precision (backward casts the gradient back)."""
    return x.to(dtype)


def reshard(x: DTensor, spec: str) -> DTensor:
    """Change ``x``'s layout to ``spec``. Replicated -> partial (a bias added to a partial
    sum) and one partial kind -> another are done locally (``_ToPartial``); DTensor's public
    redistribute does the rest."""
    target = parse(spec)
    mesh = x.device_mesh
    as_sum = tuple(Partial() if p == Partial("avg") and q != p else p for p, q in zip(x.placements, target))
    if as_sum != tuple(x.placements):  # DTensor redistributes no partial average: make it a sum
        x = _ToPartial.apply(x, as_sum)
    step = tuple(
        p if not p.is_partial() else (q if q.is_partial() else Replicate())
        for p, q in zip(target, x.placements)
    )
    if step != tuple(x.placements):
        if not x.to_local().is_contiguous():
            # a collective's result is a new contiguous tensor, but DTensor keeps the input's
            # global strides on it; the gradient then carries strides its local tensor lacks,
            # and a view of it in backward fails. Contiguous first keeps them in step.
            x = x.contiguous()
        x = x.redistribute(mesh, step)
    if step != target:
        x = _ToPartial.apply(x, target)
    return x


class _ToPartial(torch.autograd.Function):
    """Replicated or partial -> another partial kind, locally. Per axis of size ``n``: replicated
    -> partial sum holds ``value / n``; replicated -> partial average holds ``value``; partial
    average -> partial sum divides by ``n``, and back multiplies. The global value is
    unchanged, so backward lays the gradient out as the input was."""

    @staticmethod
    def forward(ctx, x: DTensor, target: Spec) -> DTensor:  # type: ignore[override]
        ctx.placements = x.placements
        factor = 1.0
        for i, (p, q) in enumerate(zip(target, x.placements)):
            n = x.device_mesh.size(i)
            summed_to = p == Partial("sum") and (q.is_replicate() or q == Partial("avg"))
            factor = factor / n if summed_to else factor
            factor = factor * n if p == Partial("avg") and q == Partial("sum") else factor
        local = x.to_local() * factor if factor != 1.0 else x.to_local().view_as(x.to_local())
        return DTensor.from_local(local, x.device_mesh, target, run_check=False)

    @staticmethod
    def backward(ctx, grad: DTensor):  # type: ignore[override]
        # the same global value, so the same gradient, laid out as the input was; a partial
        # input whose gradient is not of its own partial kind gets it replicated (DTensor
        # redistributes to no partial placement)
        want = tuple(
            p if not p.is_partial() or g == p else Replicate()
            for p, g in zip(ctx.placements, grad.placements)
        )
        return grad.redistribute(grad.device_mesh, want), None


def as_replicated(x: torch.Tensor, ctx: MeshContext) -> DTensor:
    return DTensor.from_local(x, ctx.mesh, replicated(ctx.mesh.ndim), run_check=False)


def to_output(x: Any) -> Any:
    """Hand a replicated DTensor back as a plain tensor; a sharded one stays a DTensor."""
    if isinstance(x, DTensor) and all(p.is_replicate() for p in x.placements):
        return x.to_local()
    return x


class _SyncGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p: DTensor) -> DTensor:  # type: ignore[override]
        ctx.placements = p.placements
        return p.view_as(p)

    @staticmethod
    def backward(ctx, grad: DTensor) -> DTensor:  # type: ignore[override]
        return grad.redistribute(grad.device_mesh, ctx.placements)


def sync_grad(p: DTensor) -> DTensor:
    return _SyncGrad.apply(p)
