"""Chains of traced ops that run as one fused kernel (``runtime.kernels``).

:func:`find_fusions` matches the patterns below in the traced graph. The planner prices a
matched chain as its kernel (one read of the inputs, one write of the result; the other
members cost nothing, ``cost.pricing.fused_s``), records the chains in the plan
(``Plan.fusions``) and ``passes.fuse`` swaps each for its kernel in the emitted module.

==============  ==========================================================  ==============
kind            traced pattern                                              kernel
==============  ==========================================================  ==============
``gelu``        ``gelu(x + bias)``, bias 1-D over the last dim                ``bias_gelu``
``gelu``        ``0.5 x (1 + tanh(0.79788 (x + 0.044715 x^3)))`` (HF gelu_new)  ``bias_gelu``, tanh
``layer_norm``  ``layer_norm(x, [d], weight, bias, eps)``                     ``layer_norm``
``rms_norm``    ``w * (x32 * rsqrt(mean(x32^2, -1) + eps)).to(x.dtype)``      ``rms_norm``
==============  ==========================================================  ==============

A chain fuses only when no member but its last (the *tail*, whose value the kernel returns)
is read outside the chain, and, once the ILP has chosen the layouts, when no layout changes
inside it and the kernel can run on the shards (:func:`runs_fused`; the planner solves again
with the chains that fail priced unfused).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.distributed.tensor import Partial, Shard

from autopar.errors import AutoparError
from autopar.solver.rules.base import Strategy, tensor_args
from autopar.solver.specs import Spec

aten = torch.ops.aten

#: ``node.meta`` key: ``"tail"`` or ``"member"`` for the nodes of a chain the plan fuses
FUSED_ROLE = "autopar_fused"
#: ``node.meta`` key of a fused chain's tail: its ``Fusion``
FUSION = "autopar_fusion"

#: fp32 values per row a norm kernel keeps for backward (mean and rstd; rstd)
STATS_PER_ROW = {"layer_norm": 2, "rms_norm": 1, "gelu": 0}

_TANH_SCALE = math.sqrt(2.0 / math.pi)


@dataclass(frozen=True)
class Fusion:
    kind: str  # gelu | layer_norm | rms_norm
    #: the chain's nodes in graph order; the last is the tail
    nodes: tuple[str, ...]
    #: the chain's input
    x: str
    #: the kernel's weight / bias inputs (``None``: absent)
    params: tuple[str | None, ...]
    #: the kernel's constants: ``approximate`` (gelu), ``eps`` (norms)
    consts: dict = field(default_factory=dict, compare=False)

    @property
    def tail(self) -> str:
        return self.nodes[-1]


def _is(node: object, op) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is op


def _scalar(node: fx.Node, value: float) -> fx.Node | None:
    """The tensor operand of ``node(t, value)`` (either order), if the other one is ``value``."""
    a, b = node.args[:2]
    if isinstance(b, (int, float)) and math.isclose(b, value, rel_tol=1e-6):
        return a
    if isinstance(a, (int, float)) and math.isclose(a, value, rel_tol=1e-6):
        return b
    return None


def _other(node: fx.Node, one: fx.Node) -> object:
    a, b = node.args[:2]
    return b if a is one else a if b is one else None


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _bias_of(x: fx.Node, bias: object) -> bool:
    if not isinstance(bias, fx.Node) or bias.op != "get_attr":
        return False
    b, v = bias.meta["val"], x.meta["val"]
    return b.dim() == 1 and v.dim() >= 1 and b.shape[0] == v.shape[-1]


def _bias_gelu(node: fx.Node) -> Fusion | None:
    add = node.args[0]
    approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
    if not _is(add, aten.add.Tensor) or len(add.users) != 1:
        return None
    x, bias = add.args[:2]
    if not _bias_of(x, bias):
        x, bias = bias, x
    if not (isinstance(x, fx.Node) and _bias_of(x, bias)):
        return None
    return Fusion("gelu", (add.name, node.name), x.name, (bias.name,), {"approximate": approximate})


def _gelu_tanh(tanh: fx.Node) -> Fusion | None:
    """``tanh`` is the anchor of HF's ``gelu_new``; walk out to its input and its tail."""
    scaled = tanh.args[0]
    inner = _scalar(scaled, _TANH_SCALE) if _is(scaled, aten.mul.Tensor) else None
    if not _is(inner, aten.add.Tensor):
        return None
    for x, cubic in (inner.args[:2], inner.args[1::-1]):
        cube = _scalar(cubic, 0.044715) if _is(cubic, aten.mul.Tensor) else None
        if _is(cube, aten.pow.Tensor_Scalar) and cube.args[0] is x and cube.args[1] == 3:
            break
    else:
        return None
    one_plus = _only_user(tanh)
    if not (_is(one_plus, aten.add.Tensor) and _scalar(one_plus, 1.0) is tanh):
        return None
    tail = _only_user(one_plus)
    half = _other(tail, one_plus) if _is(tail, aten.mul.Tensor) else None
    if not (_is(half, aten.mul.Tensor) and _scalar(half, 0.5) is x):
        return None
    chain = (half, cube, cubic, inner, scaled, tanh, one_plus, tail)
    return Fusion("gelu", _ordered(chain), x.name, (None,), {"approximate": "tanh"})


def _layer_norm(node: fx.Node) -> Fusion | None:
    x, shape = node.args[:2]
    weight = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
    bias = node.args[3] if len(node.args) > 3 else node.kwargs.get("bias")
    eps = node.args[4] if len(node.args) > 4 else node.kwargs.get("eps", 1e-5)
    if len(shape) != 1:
        return None
    names = tuple(p.name if isinstance(p, fx.Node) else None for p in (weight, bias))
    return Fusion("layer_norm", (node.name,), x.name, names, {"eps": float(eps)})


def _rms_norm(rsqrt: fx.Node) -> Fusion | None:
    """``rsqrt`` is the anchor of HF's RMSNorm; walk out to its input and its tail."""
    plus_eps = rsqrt.args[0]
    if not _is(plus_eps, aten.add.Tensor) or not isinstance(plus_eps.args[1], (int, float)):
        return None
    mean = plus_eps.args[0]
    if not (_is(mean, aten.mean.dim) and list(mean.args[1]) in ([-1], [mean.args[0].meta["val"].dim() - 1])):
        return None
    square = mean.args[0]
    if not (_is(square, aten.pow.Tensor_Scalar) and square.args[1] == 2):
        return None
    x32 = square.args[0]
    normed = _only_user(rsqrt)
    if not (_is(normed, aten.mul.Tensor) and _other(normed, rsqrt) is x32):
        return None
    chain = [square, mean, plus_eps, rsqrt, normed]
    x = x32
    # the fp32 copy joins the chain unless it is read elsewhere (of fp32 x it is x itself)
    if _is(x32, aten.to.dtype) and x32.args[1] == torch.float32 and len(x32.users) == 2:
        chain.insert(0, x32)
        x = x32.args[0]
    tail = normed
    cast = _only_user(tail)
    if _is(cast, aten.to.dtype) and cast.args[1] == x.meta["val"].dtype:
        chain.append(cast)
        tail = cast
    weight = None
    scale = _only_user(tail)
    if _is(scale, aten.mul.Tensor) and _bias_of(tail, _other(scale, tail)):
        weight = _other(scale, tail)
        chain.append(scale)
    eps = float(plus_eps.args[1])
    return Fusion("rms_norm", _ordered(chain), x.name, (weight.name if weight else None,), {"eps": eps})


def _ordered(chain) -> tuple[str, ...]:
    graph = chain[0].graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    return tuple(n.name for n in sorted(set(chain), key=order.__getitem__))


_ANCHORS = {
    aten.gelu.default: _bias_gelu,
    aten.tanh.default: _gelu_tanh,
    aten.layer_norm.default: _layer_norm,
    aten.rsqrt.default: _rms_norm,
}


def find_fusions(graph: fx.Graph) -> list[Fusion]:
    """Every chain of ``graph`` that matches a pattern and is read only through its tail."""
    by_name = {n.name: n for n in graph.nodes}
    found = []
    for node in graph.nodes:
        match = _ANCHORS.get(node.target) if node.op == "call_function" else None
        f = match(node) if match else None
        if f is None:
            continue
        members = {by_name[n] for n in f.nodes}
        if all(set(by_name[n].users) <= members for n in f.nodes[:-1]):
            found.append(f)
    return found


#: ``kernels=``: fuse where the hardware runs the kernels, always, or never
KERNELS = ("auto", "fused", "eager")


def planned(graph: fx.Graph, kernels: str, hw_fuses: bool) -> list[Fusion]:
    """The chains a plan fuses, marked on ``graph`` for pricing (``mark``)."""
    if kernels not in KERNELS:
        raise AutoparError(f"kernels={kernels!r}: use one of {', '.join(KERNELS)}")
    fuse = kernels == "fused" or (kernels == "auto" and hw_fuses)
    fusions = find_fusions(graph) if fuse else []
    mark(graph, fusions)
    return fusions


def mark(graph: fx.Graph, fusions: list[Fusion]) -> None:
    """Record each node's role in ``node.meta`` (replacing earlier marks), for pricing."""
    by_name = {n.name: n for n in graph.nodes}
    for n in graph.nodes:
        n.meta.pop(FUSED_ROLE, None)
        n.meta.pop(FUSION, None)
    for f in fusions:
        for name in f.nodes[:-1]:
            by_name[name].meta[FUSED_ROLE] = "member"
        by_name[f.tail].meta[FUSED_ROLE] = "tail"
        by_name[f.tail].meta[FUSION] = f


def role(node: fx.Node) -> str:
    """``"tail"``, ``"member"`` or ``""`` (not fused)."""
    return node.meta.get(FUSED_ROLE, "")


def layout_fits(kind: str, spec: Spec, ndim: int) -> str:
    """Why a chain's kernel cannot run on shards of a result laid out as ``spec`` ("": it can):
    a partial sum, or a norm's normalized (last) dim sharded."""
    if any(isinstance(p, Partial) for p in spec):
        return "its result is a partial sum"
    if kind != "gelu" and any(isinstance(p, Shard) and p.dim % ndim == ndim - 1 for p in spec):
        return "the normalized dim is sharded"
    return ""


def runs_fused(f: Fusion, node_of: Callable[[str], fx.Node], spec_of: Callable[[str], Strategy]) -> bool:
    """Whether the chosen layouts let ``f`` run as its kernel: every member reads the other
    members as they are laid out and the chain's input in one layout, and the result fits."""
    inputs = set()
    for name in f.nodes:
        s = spec_of(name)
        for k, a in enumerate(tensor_args(node_of(name))):
            if a.name in f.nodes and s.ins[k] != spec_of(a.name).out:
                return False
            if a.name == f.x:
                inputs.add(s.ins[k])
    tail = node_of(f.tail).meta["val"]
    return len(inputs) == 1 and not layout_fits(f.kind, spec_of(f.tail).out, tail.dim())
