"""Classic layouts pinned through the same ILP: a pin only narrows the choices.

- ``"auto"``: no restriction.
- ``"dp"``: data parallel: every input sharded on its batch dim (dim 0) over every mesh axis,
  every parameter and buffer replicated; gradients are all-reduced.
- ``"megatron"``: the last mesh axis is the tensor-parallel axis, the others data parallel.
  On the tensor axis the weight of every linear layer is sharded by rows or columns (the ILP
  pairs them as Megatron's column-then-row layout, which needs one all-reduce per pair),
  a linear bias goes with its weight, other parameters and the inputs are replicated.
- ``"megatron-sp"``: Megatron's weights, with the inputs also split along the sequence (dim 1)
  on the tensor-parallel axis, as sequence parallelism keeps the residual stream; the ILP keeps
  activations sequence-sharded where that pays (Megatron-SP's layout is among its choices).
- ``"2d"``: 2-D tensor parallelism on a 2-axis mesh: every linear weight sharded over both axes
  (rows on one, columns on the other), everything else replicated.
- ``"zero2"``, ``"zero3"``, ``"zero-offload"``: data parallel compute (inputs sharded on their
  batch dim, every op reads parameters whole), each parameter stored in that mode
  (``solver.zero``): sharded over every axis and gathered once, sharded and gathered again in
  backward, or in host memory with the optimizer step on the CPU (DeepSpeed's ZeRO-Offload).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.distributed.tensor import Replicate, Shard

from autopar.errors import AutoparError
from autopar.solver.graph import NodeChoices, Pin
from autopar.solver.rules import matmul
from autopar.solver.rules.base import Strategy, tensor_args

aten = torch.ops.aten
STRATEGIES = ("auto", "dp", "megatron", "megatron-sp", "2d", "zero2", "zero3", "zero-offload")
#: the parameter modes a strategy allows (``solver.zero``); ``auto`` allows all of them
PARAM_MODES = {"zero2": ("zero2",), "zero3": ("zero3",), "zero-offload": ("offload",)}


def pin_for(strategy: str) -> Pin | None:
    if strategy == "auto":
        return None
    if strategy in _PINS:
        return _PINS[strategy]
    raise AutoparError(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")


def _leaf_pin(rule: Callable[[NodeChoices, int, object], bool]) -> Pin:
    """A pin that filters leaf (input / parameter / buffer) layouts axis by axis."""

    def pin(nc: NodeChoices, strategies: list[Strategy]) -> list[Strategy]:
        if nc.kind not in ("input", "param", "buffer"):
            return strategies
        return [s for s in strategies if all(rule(nc, i, p) for i, p in enumerate(s.out))]

    return pin


def _dp(nc: NodeChoices, axis: int, p) -> bool:
    if nc.kind == "input" and nc.node.meta["val"].dim() > 0:
        return p == Shard(0)
    return isinstance(p, Replicate)


def _megatron(nc: NodeChoices, axis: int, p) -> bool:
    n_axes = len(nc.strategies[0].out)
    if axis < n_axes - 1:  # data-parallel axes
        return _dp(nc, axis, p)
    if nc.kind != "param":
        return isinstance(p, Replicate)
    uses = {u.target for u in nc.node.users}
    linear = bool(uses & set(matmul.OPS))
    ndim = nc.node.meta["val"].dim()
    if linear and ndim == 2:
        return p in (Shard(0), Shard(1))
    if linear and ndim == 1:
        return isinstance(p, Replicate) or p == Shard(0)
    return isinstance(p, Replicate)


def _megatron_sp(nc: NodeChoices, axis: int, p) -> bool:
    n_axes = len(nc.strategies[0].out)
    tokens = any(u.target is aten.embedding.default for u in nc.node.users)  # the residual stream
    if nc.kind == "input" and axis == n_axes - 1 and tokens and nc.node.meta["val"].dim() >= 2:
        return p == Shard(1)
    return _megatron(nc, axis, p)


def _two_d(nc: NodeChoices, axis: int, p) -> bool:
    n_axes = len(nc.strategies[0].out)
    if n_axes != 2:
        raise AutoparError(f'strategy "2d" needs a 2-axis mesh (dp x tp style), not {n_axes} axes')
    linear = bool({u.target for u in nc.node.users} & set(matmul.OPS))
    splits = any(s.out[axis] == Shard(axis) for s in nc.strategies)  # the axis divides that dim
    if nc.kind == "param" and linear and nc.node.meta["val"].dim() == 2 and splits:
        return p == Shard(axis)  # rows over axis 0, columns over axis 1
    return isinstance(p, Replicate)


def _zero(nc: NodeChoices, strategies: list[Strategy]) -> list[Strategy]:
    """Data parallel compute, parameters in any stored layout (their mode decides it)."""
    if nc.kind == "input":
        return _leaf_pin(_dp)(nc, strategies)
    if nc.kind != "op":
        return strategies
    params = [k for k, a in enumerate(tensor_args(nc.node)) if a.op == "get_attr"]
    return [s for s in strategies if all(isinstance(p, Replicate) for k in params for p in s.ins[k])]


_PINS: dict[str, Pin] = {
    "dp": _leaf_pin(_dp),
    "megatron": _leaf_pin(_megatron),
    "megatron-sp": _leaf_pin(_megatron_sp),
    "2d": _leaf_pin(_two_d),
}
_PINS |= dict.fromkeys(PARAM_MODES, _zero)
