"""What every rule family shares: the per-axis option type and the expansion to a mesh.

A rule looks at one fx node and lists its *one-axis options*: for a single mesh axis, the
placement of the output and of each tensor input that together compute the op correctly
with no communication inside the op. :func:`expand` takes the product of the options over
the mesh axes and keeps the combinations whose every tensor divides evenly, which is how
DTensor builds its own multi-axis strategies.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import Placement

from autopar.solver.specs import Spec, divides

R = Replicate()


@dataclass(frozen=True)
class Option:
    """One mesh axis: output placement and one placement per tensor input."""

    out: Placement
    ins: tuple[Placement, ...]


@dataclass(frozen=True)
class Strategy:
    """A whole-mesh choice for one node: output spec and the spec each tensor input must have."""

    out: Spec
    ins: tuple[Spec, ...]

    def __hash__(self) -> int:  # the solver hashes strategies often; placements hash slowly
        return self._hash

    @functools.cached_property
    def _hash(self) -> int:
        return hash((self.out, self.ins))


RuleFn = Callable[[fx.Node], list[Option]]


def is_tensor_node(a: object) -> bool:
    return isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)


def tensor_args(node: fx.Node) -> list[fx.Node]:
    """The node's tensor inputs in argument order (repeats kept), as ``fx.map_arg`` visits them."""
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: found.append(a) if is_tensor_node(a) else None)
    return found


def val(node: fx.Node):
    return node.meta.get("val")


def shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(int(s) for s in val(node).shape)


def out_tensors(node: fx.Node) -> list[torch.Tensor]:
    v = val(node)
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (list, tuple)):
        return [t for t in v if isinstance(t, torch.Tensor)]
    return []


def map_option(mapping: dict[int, int]) -> list[Option]:
    """Options for a one-input op whose output dim ``o`` comes from input dim ``mapping[o]``."""
    return [Option(Shard(o), (Shard(i),)) for o, i in sorted(mapping.items())]


def expand(node: fx.Node, options: Sequence[Option], mesh_shape: Sequence[int]) -> list[Strategy]:
    """The product of one-axis options over the mesh, kept where every tensor divides evenly."""
    ins = tensor_args(node)
    outs = out_tensors(node)
    float_in = [i.meta["val"].is_floating_point() for i in ins]
    float_out = all(t.is_floating_point() for t in outs)
    strategies: list[Strategy] = []
    seen: set[Strategy] = set()
    for combo in itertools.product(options, repeat=len(mesh_shape)):
        out = tuple(o.out for o in combo)
        in_specs = tuple(tuple(o.ins[k] for o in combo) for k in range(len(ins)))
        s = Strategy(out, in_specs)
        if s in seen:
            continue
        if not _valid(out, [tuple(t.shape) for t in outs], float_out, mesh_shape):
            continue
        if not all(_valid(spec, shape(a), fl, mesh_shape) for spec, a, fl in zip(in_specs, ins, float_in)):
            continue
        seen.add(s)
        strategies.append(s)
    return strategies


def _valid(spec: Spec, shapes, is_float: bool, mesh_shape: Sequence[int]) -> bool:
    if isinstance(shapes, tuple):
        shapes = [shapes]
    if not is_float and any(isinstance(p, Partial) for p in spec):
        return False
    return all(divides(spec, s, mesh_shape) for s in shapes)


def numel(node: fx.Node) -> int:
    return sum(math.prod(t.shape) for t in out_tensors(node))
