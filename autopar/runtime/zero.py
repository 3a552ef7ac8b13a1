"""Runtime of the parameter modes (``solver.zero``) that a layout change alone does not give.

``zero2`` needs nothing here: the parameter is stored sharded and ``layout.reshard`` gathers
it before use (backward reduce-scatters the gradient).

- ``zero3``: the parameter's gather is :func:`gather_for_use`, which tells the forward's
  :class:`Refetch` about the gathered tensor. While the emitted module's forward runs,
  ``Refetch``'s saved-tensor hooks replace every tensor an op keeps for backward that lives in
  a gathered parameter's memory (the copy itself or a view such as its transpose) by a note:
  the stored shard and how to gather it again. So the copy is freed after its forward use and
  backward gathers it when it needs it. In a checkpointed (recomputed) block the checkpoint's
  own hooks are innermost; its re-run gathers again anyway.
- ``offload``: the parameter (its shard) lives in host memory (:func:`host_copy`), so its
  gradient and AdamW moments do, and the optimizer steps on the host. :func:`to_device`
  copies it to the mesh's device in forward and its backward copies the gradient back. On a
  CPU mesh host and device are one memory and both are identities.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.tensor import DTensor

from autopar.runtime.layout import reshard

#: the Refetch of each emitted module's forward in progress, innermost last
_ACTIVE: list[Refetch] = []


def plain(t: torch.Tensor) -> torch.Tensor:
    """A collective's pending result waited for (ops on it see the plain tensor inside)."""
    return t.trigger_wait() if isinstance(t, AsyncCollectiveTensor) else t


def _memory(t: torch.Tensor) -> int:
    """Where ``t``'s storage lives. DTensor runs local ops below autograd, where views do not
    record their ``_base``: a saved transpose of a gathered weight is known by its storage."""
    return plain(t).untyped_storage().data_ptr()


@dataclass
class _Note:
    """Stands in for a saved view of a gathered parameter until backward unpacks it: the
    view's local strides, and its DTensor layout if it was saved as a DTensor (an op run on
    local shards saves the plain local tensor)."""

    shard: DTensor
    spec: str
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    #: (placements, global shape, global stride) of a DTensor view; None for a local one
    dtensor: tuple[tuple, torch.Size, tuple[int, ...]] | None

    def gather(self) -> torch.Tensor:
        with torch.no_grad():
            full = reshard(self.shard, self.spec)
        local = plain(full._local_tensor).as_strided(self.size, self.stride, self.offset)
        if self.dtensor is None:
            return local
        placements, shape, stride = self.dtensor
        return DTensor.from_local(
            local, full.device_mesh, placements, run_check=False, shape=shape, stride=stride
        )


class Refetch:
    """The saved-tensor hooks of one forward pass of an emitted module with ``zero3``
    parameters; installed by :func:`install`."""

    def __init__(self) -> None:
        #: storage address -> (the gathered local tensor, weakly; the shard; the layout)
        self.gathered: dict[int, tuple[weakref.ref, DTensor, str]] = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, _unpack)

    def register(self, full: DTensor, shard: DTensor, spec: str) -> None:
        local = plain(full._local_tensor)
        self.gathered[_memory(local)] = (weakref.ref(local), shard.detach(), spec)

    def pack(self, t: torch.Tensor) -> object:
        is_dtensor = isinstance(t, DTensor)
        local = plain(t._local_tensor if is_dtensor else t)
        hit = self.gathered.get(_memory(local))
        if hit is None or hit[0]() is None:  # while the gathered tensor lives, so does its memory
            return t
        layout = (tuple(t.placements), t.shape, t.stride()) if is_dtensor else None
        return _Note(hit[1], hit[2], tuple(local.size()), local.stride(), local.storage_offset(), layout)


def _unpack(x: object) -> torch.Tensor:
    return x.gather() if isinstance(x, _Note) else x


def gather_for_use(x: DTensor, spec: str) -> DTensor:
    """``reshard`` a ``zero3`` parameter, and let the forward's hooks know the result."""
    full = reshard(x, spec)
    if _ACTIVE:
        _ACTIVE[-1].register(full, x, spec)
    return full


def install(module: nn.Module) -> None:
    """Run ``module``'s forward passes under a fresh :class:`Refetch`."""

    def start(mod, args) -> None:
        r = Refetch()
        r.hooks.__enter__()
        _ACTIVE.append(r)

    def stop(mod, args, out) -> None:
        _ACTIVE.pop().hooks.__exit__(None, None, None)

    module.register_forward_pre_hook(start)
    module.register_forward_hook(stop, always_call=True)


def host_copy(p: DTensor) -> DTensor:
    """The same DTensor with its local shard in (pinned) host memory."""
    local = p._local_tensor
    if local.device.type == "cpu":
        return p
    host = local.to("cpu").pin_memory()
    return DTensor(host, p._spec, requires_grad=False)


class _ToDevice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p: DTensor) -> DTensor:  # type: ignore[override]
        mesh = p.device_mesh
        if p._local_tensor.device.type == mesh.device_type:
            return p.view_as(p)
        local = p._local_tensor.to(mesh.device_type, non_blocking=True)
        shape, stride = p.shape, p.stride()
        return DTensor.from_local(local, mesh, p.placements, run_check=False, shape=shape, stride=stride)

    @staticmethod
    def backward(ctx, grad: DTensor) -> DTensor:  # type: ignore[override]
        local = grad._local_tensor
        if local.device.type == "cpu":
            return grad
        return DTensor(local.to("cpu"), grad._spec, requires_grad=False)


def to_device(p: DTensor) -> DTensor:
    """An offloaded parameter on the mesh's device; its gradient goes back to the host."""
    return _ToDevice.apply(p)
