"""Classic layouts pinned through the same ILP: a pin only narrows the choices.

- ``"auto"``: no restriction.
- ``"dp"``: data parallel: every input sharded on its batch dim (dim 0) over every mesh axis,
  every parameter and buffer replicated; gradients are all-reduced.
- ``"megatron"``: the last mesh axis is the tensor-parallel axis, the others data parallel.
  On the tensor axis the weight of every linear layer is sharded by rows or columns (the ILP
  pairs them as Megatron's column-then-row layout, which needs one all-reduce per pair),
  a linear bias goes with its weight, other parameters and the inputs are replicated.
- ``"zero2"``, ``"zero3"``, ``"zero-offload"``: data parallel compute (inputs sharded on their
  batch dim, every op reads parameters whole), each parameter stored in that mode
  (``solver.zero``): sharded over every axis and gathered once, sharded and gathered again in
  backward, or in host memory with the optimizer step on the CPU (DeepSpeed's ZeRO-Offload).
"""

from __future__ import annotations

from collections.abc import Callable

from torch.distributed.tensor import Replicate, Shard

from autopar.errors import AutoparError
from autopar.solver.graph import NodeChoices, Pin
from autopar.solver.rules import matmul
from autopar.solver.rules.base import Strategy, tensor_args

STRATEGIES = ("auto", "dp", "megatron", "zero2", "zero3", "zero-offload")
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


def _zero(nc: NodeChoices, strategies: list[Strategy]) -> list[Strategy]:
    """Data parallel compute, parameters in any stored layout (their mode decides it)."""
    if nc.kind == "input":
        return _leaf_pin(_dp)(nc, strategies)
    if nc.kind != "op":
        return strategies
    params = [k for k, a in enumerate(tensor_args(nc.node)) if a.op == "get_attr"]
    return [s for s in strategies if all(isinstance(p, Replicate) for k in params for p in s.ins[k])]


_PINS: dict[str, Pin] = {"dp": _leaf_pin(_dp), "megatron": _leaf_pin(_megatron)}
_PINS |= dict.fromkeys(PARAM_MODES, _zero)
