"""The strategy graph: every node's choices and prices, with trivial nodes merged.

Built from the traced graph for one mesh shape and hardware. Each tensor node gets its
strategies (from the rule families) and a cost per strategy; then nodes are merged so the
ILP only sees *decision nodes* (roots):

- a *follower* (a view, a unary elementwise op, a norm, ``getitem``) takes its producer's
  decision: for each of the producer's strategies it picks its own cheapest strategy given
  the producer's output spec;
- a *leaf* (parameter, buffer or input) used by exactly one node takes that node's decision:
  it is laid out as the node wants it.

A merged node's cost (and the cost of the edge it was merged over) is added to its root's
cost vector. The remaining edges, between different roots, carry resharding costs that the
ILP prices with pairwise terms.

Repeated blocks (``solver.repeats``): nodes with the same op, arguments, shapes and inputs
share one computed list of strategies and costs (``_Memo``), and so do the merge steps
over them; a root of a block identical to an earlier one *shares* that block's decision
(``StrategyGraph.shared``), so the ILP has one block's variables however deep the model is.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.distributed.tensor import Partial, Replicate, Shard

from autopar.cost.comm import redistribute_bytes, redistribute_time_s
from autopar.cost.hardware import Hardware, Link
from autopar.cost.memory import ADAMW_STATES_PER_PARAM
from autopar.cost.pricing import Pricing
from autopar.cost.pricing import out_bytes as local_out_bytes
from autopar.cost.profile_db import Profile
from autopar.errors import ShardingError
from autopar.solver import fusion, rules
from autopar.solver.repeats import share_decisions, val_key
from autopar.solver.rules.base import Strategy, tensor_args
from autopar.solver.specs import Spec, divides, local_numel, no_partial
from autopar.tracer.export import MASTER_DTYPE

Pin = Callable[["NodeChoices", list[Strategy]], list[Strategy]]


@dataclass
class NodeChoices:
    node: fx.Node
    kind: str  # input | param | buffer | op | getitem
    strategies: list[Strategy]
    cost_s: list[float]  # own compute / optimizer time per strategy
    memory_bytes: list[
        int
    ]  # resident per-device bytes per strategy (weights, AdamW moments, buffers, inputs)
    requires_grad: bool
    fallback: bool = False
    root: str = ""
    pick: list[int] = field(default_factory=list)  # root strategy index -> own index
    #: a folded parameter's mode per root strategy index (``solver.zero``); empty: all ""
    modes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.node.name


@dataclass(frozen=True)
class EdgeUse:
    """Node ``dst`` reads node ``src`` as its tensor argument number ``arg``."""

    src: str
    dst: str
    arg: int


@dataclass
class StrategyGraph:
    mesh_shape: tuple[int, ...]
    hw: Hardware
    nodes: dict[str, NodeChoices]
    #: per root: total cost of each of its strategies (members and folded edges included)
    root_cost_s: dict[str, list[float]]
    root_memory_bytes: dict[str, list[int]]
    #: edges between different roots
    edges: list[EdgeUse]
    #: root -> the root of an identical earlier block whose decision it takes
    shared: dict[str, str] = field(default_factory=dict)
    #: one line per stack of repeated blocks that share decisions
    shared_blocks: list[str] = field(default_factory=list)
    #: where the prices came from (the hardware table, or a profile database)
    pricing: Pricing | None = None

    def decision(self, root: str) -> str:
        """The root whose ILP decision ``root`` takes (itself unless it is shared)."""
        return self.shared.get(root, root)

    def spec_of(self, name: str, choice: dict[str, int]) -> Strategy:
        nc = self.nodes[name]
        return nc.strategies[nc.pick[choice[nc.root]]]

    def edge_cost_s(self, e: EdgeUse, src_spec: Spec, dst_strategy: Strategy) -> float:
        return edge_cost_s(self, self.nodes[e.src], self.nodes[e.dst], e.arg, src_spec, dst_strategy)

    @property
    def roots(self) -> list[str]:
        return list(self.root_cost_s)

    @functools.cached_property
    def links(self) -> tuple[Link, ...]:
        """The link each mesh axis communicates over (with measured collectives, if profiled)."""
        return (self.pricing or Pricing(self.hw)).links(self.mesh_shape)


@functools.lru_cache(maxsize=1 << 16)
def split_axes(s: Strategy) -> frozenset[int]:
    """Mesh axes along which the op's work is divided (some tensor is not replicated)."""
    axes = set()
    for spec in (s.out,) + s.ins:
        axes |= {i for i, p in enumerate(spec) if not isinstance(p, Replicate)}
    return frozenset(axes)


@functools.lru_cache(maxsize=1 << 16)
def grad_spec(s: Strategy, arg: int) -> Spec:
    """Placement of the gradient an op sends back to input ``arg``: partial where the input
    was replicated but the op's work was divided along that axis."""
    split = split_axes(s)
    return tuple(
        Partial()
        if isinstance(p, Replicate) and i in split
        else (Replicate() if isinstance(p, Partial) else p)
        for i, p in enumerate(s.ins[arg])
    )


def edge_moves(src: NodeChoices, dst: NodeChoices, arg: int, src_spec: Spec, dst_s: Strategy) -> list:
    """The layout changes on an edge: src_spec -> the input spec ``dst_s`` needs, and the
    gradient's way back; each ``(from, to, shape, itemsize)``."""
    if dst.kind == "getitem":
        return []
    v = src.node.meta["val"]
    shape, itemsize = tuple(v.shape), v.element_size()
    moves = [(src_spec, dst_s.ins[arg], shape, itemsize)]
    if src.requires_grad:
        moves.append((grad_spec(dst_s, arg), no_partial(src_spec), shape, itemsize))
    return moves


def edge_cost_s(
    g: StrategyGraph, src: NodeChoices, dst: NodeChoices, arg: int, src_spec: Spec, dst_s: Strategy
) -> float:
    """Seconds of :func:`edge_moves`."""
    moves = edge_moves(src, dst, arg, src_spec, dst_s)
    return sum(redistribute_time_s(*m, g.mesh_shape, g.links) for m in moves)


def edge_bytes(
    g: StrategyGraph, src: NodeChoices, dst: NodeChoices, arg: int, src_spec: Spec, dst_s: Strategy
) -> float:
    """Bytes each device sends for :func:`edge_moves`."""
    return sum(redistribute_bytes(*m, g.mesh_shape) for m in edge_moves(src, dst, arg, src_spec, dst_s))


def _leaf_specs(shape: Sequence[int], n_axes: int) -> list[Spec]:
    per_axis = [Replicate()] + [Shard(d) for d in range(len(shape))]
    out: list[Spec] = [()]
    for _ in range(n_axes):
        out = [s + (p,) for s in out for p in per_axis]
    return out


@dataclass
class _Memo:
    """Results shared by nodes with equal keys (repeated blocks): each distinct node's
    strategies and costs, and each distinct merge step, are computed once. Keys hold the
    ``id`` of shared lists, which stay alive in the graph while it is built."""

    choices: dict = field(default_factory=dict)
    follow: dict = field(default_factory=dict)
    leaf: dict = field(default_factory=dict)
    identity: dict = field(default_factory=dict)

    def iota(self, n: int) -> list[int]:
        return self.identity.setdefault(n, list(range(n)))


def build(
    gm: fx.GraphModule,
    mesh_shape: Sequence[int],
    hw: Hardware,
    trainable: dict[str, bool],
    pin: Pin | None = None,
    *,
    share_blocks: bool = True,
    profile: Profile | None = None,
) -> StrategyGraph:
    """The strategy graph of ``gm`` on ``mesh_shape``; with ``share_blocks``, identical
    repeated blocks share their decisions (see ``solver.repeats``); with ``profile``, ops,
    optimizer steps and collectives are priced from its measurements where it has them."""
    mesh_shape = tuple(mesh_shape)
    pricing = Pricing(hw, profile)
    nodes: dict[str, NodeChoices] = {}
    memo = _Memo()
    for node in gm.graph.nodes:
        nc = _choices(node, trainable, nodes)
        if nc is None:
            continue
        key = _choice_key(nc, nodes)
        hit = memo.choices.get(key)
        if hit is None:
            nc.strategies = _strategies(nc, mesh_shape, nodes)
            if pin is not None:
                nc.strategies = pin(nc, nc.strategies)
            if nc.kind == "op":
                nc.strategies = _reachable(nc, nodes)
            _reprice(nc, mesh_shape, pricing, nodes)
            if not nc.strategies:
                raise ShardingError(_no_strategy_message(nc, mesh_shape))
            hit = memo.choices[key] = (nc.strategies, nc.cost_s, nc.memory_bytes)
        nc.strategies, nc.cost_s, nc.memory_bytes = hit
        nodes[node.name] = nc
    g = StrategyGraph(mesh_shape, hw, nodes, {}, {}, [], pricing=pricing)
    _merge(g, memo)
    if share_blocks:
        share_decisions(g, gm.graph)
    return g


def _choice_key(nc: NodeChoices, nodes: dict[str, NodeChoices]) -> tuple:
    """What a node's strategies and costs depend on: op, arguments, shapes, dtypes, gradient
    flow, and the layouts its leaf inputs may take (by identity of their shared lists)."""
    node = nc.node
    v = val_key(node.meta.get("val"))
    if nc.kind in ("input", "param", "buffer"):
        return (nc.kind, v, _written_in_place(node), tuple(sorted(str(u.target) for u in node.users)))
    if nc.kind == "getitem":
        return ("getitem", id(nodes[node.args[0].name].strategies), v)

    def arg(a: object) -> object:
        if not isinstance(a, fx.Node):
            return a
        src = nodes.get(a.name)
        if src is None:
            return ("node", val_key(a.meta.get("val")))
        leaf = id(src.strategies) if src.kind in ("input", "param", "buffer") else None
        return ("node", val_key(a.meta.get("val")), src.requires_grad, leaf)

    args = repr(fx.node.map_aggregate((node.args, node.kwargs), arg))
    return ("op", str(node.target), args, v, nc.requires_grad, fusion.role(node))


def _reachable(nc: NodeChoices, nodes: dict[str, NodeChoices]) -> list[Strategy]:
    """Drop strategies that need a parameter, buffer or input in a layout it may not take."""
    allowed = {}
    for k, a in enumerate(tensor_args(nc.node)):
        leaf = nodes.get(a.name)
        if leaf is not None and leaf.kind in ("input", "param", "buffer"):
            allowed[k] = {s.out for s in leaf.strategies}
    if not allowed:
        return nc.strategies
    return [s for s in nc.strategies if all(no_partial(s.ins[k]) in ok for k, ok in allowed.items())]


def _written_in_place(node: fx.Node) -> bool:
    return any(u.target in rules.elementwise.INPLACE and u.args[0] is node for u in node.users)


def _choices(node: fx.Node, trainable: dict[str, bool], nodes: dict[str, NodeChoices]) -> NodeChoices | None:
    """The node's kind and gradient flow; its strategies are filled in by ``build``."""
    v = node.meta.get("val")
    if node.op in ("placeholder", "get_attr"):
        if not isinstance(v, torch.Tensor):
            return None
        kind = "input" if node.op == "placeholder" else ("param" if trainable.get(node.target) else "buffer")
        return NodeChoices(node, kind, [], [], [], kind == "param")
    if node.op == "call_function" and node.target is operator.getitem:
        src = nodes.get(node.args[0].name) if isinstance(node.args[0], fx.Node) else None
        if src is None or not isinstance(v, torch.Tensor):
            return None
        return NodeChoices(node, "getitem", [], [], [], src.requires_grad)
    if node.op == "call_function":
        if not (isinstance(v, torch.Tensor) or (isinstance(v, (list, tuple)) and v)):
            return None
        args = tensor_args(node)
        req = any(nodes[a.name].requires_grad for a in args if a.name in nodes)
        outs = [v] if isinstance(v, torch.Tensor) else [t for t in v if isinstance(t, torch.Tensor)]
        req = req and all(t.is_floating_point() for t in outs)
        return NodeChoices(node, "op", [], [], [], req, fallback=not rules.has_rule(node))
    return None


def _strategies(nc: NodeChoices, mesh_shape, nodes) -> list[Strategy]:
    node, v = nc.node, nc.node.meta["val"]
    if nc.kind == "getitem":
        outs = list(dict.fromkeys(s.out for s in nodes[node.args[0].name].strategies))
        return [Strategy(o, (o,)) for o in outs]
    if nc.kind == "op":
        return rules.strategies(node, mesh_shape)
    specs = _leaf_specs(v.shape, len(mesh_shape))
    if _written_in_place(node):  # the write must land in the buffer itself, not a resharded copy
        specs = [tuple(Replicate() for _ in mesh_shape)]
    return [Strategy(s, ()) for s in specs if divides(s, v.shape, mesh_shape)]


def _reprice(nc: NodeChoices, mesh_shape, pricing: Pricing, nodes: dict[str, NodeChoices]) -> None:
    nc.cost_s, nc.memory_bytes = [], []
    v = nc.node.meta["val"]
    grads = input_grads(nodes, nc.node)
    for s in nc.strategies:
        out_bytes = local_out_bytes(nc.node, s.out, mesh_shape)
        if nc.kind == "param":
            n = local_numel(v.shape, s.out, mesh_shape)
            nc.cost_s.append(pricing.optimizer_s(n, master_itemsize(nc.node), mesh_shape))
            # master weight and AdamW moments, in the master dtype
            nc.memory_bytes.append((1 + ADAMW_STATES_PER_PARAM) * n * master_itemsize(nc.node))
        elif nc.kind != "op":
            nc.cost_s.append(0.0)
            nc.memory_bytes.append(out_bytes if nc.kind != "getitem" else 0)
        else:
            nc.cost_s.append(_op_cost_s(nc, s, grads, out_bytes, mesh_shape, pricing))
            nc.memory_bytes.append(0)  # activations: solver.memory


def _op_cost_s(nc: NodeChoices, s: Strategy, grads, out_bytes: int, mesh_shape, pricing: Pricing) -> float:
    """An op's time; a chain the plan fuses costs its kernel's time, at its tail."""
    role = fusion.role(nc.node)
    if role == "member":
        return 0.0
    if role == "tail":
        return pricing.fused_s(out_bytes, nc.requires_grad)
    return pricing.op_s(nc.node, s, grads, nc.requires_grad, out_bytes, mesh_shape)


def input_grads(nodes: dict[str, NodeChoices], node: fx.Node) -> list[bool]:
    """Whether a gradient flows to each tensor input of ``node`` (``tensor_args`` order)."""
    return [a.name in nodes and nodes[a.name].requires_grad for a in tensor_args(node)]


def master_itemsize(node: fx.Node) -> int:
    """Bytes per element of a parameter's master weight, gradient and AdamW moments: its traced
    dtype, or under mixed precision the dtype it is kept in (``tracer.MASTER_DTYPE``)."""
    master = node.meta.get(MASTER_DTYPE)
    return master.itemsize if master is not None else node.meta["val"].element_size()


def _no_strategy_message(nc: NodeChoices, mesh_shape) -> str:
    v = nc.node.meta["val"]
    shape = tuple(v.shape) if isinstance(v, torch.Tensor) else "?"
    what = {"input": "input", "param": "parameter", "buffer": "buffer"}.get(nc.kind, "op")
    ident = nc.node.target if nc.kind in ("param", "buffer") else nc.node.name
    return (
        f"no valid layout for {what} {ident!r} (op {nc.node.target}, shape {shape}) on mesh "
        f"{tuple(mesh_shape)} under the requested strategy: a pinned axis does not divide one "
        "of its dimensions. Use sizes divisible by the mesh axes, another mesh shape, or "
        'strategy="auto".'
    )


def _merge(g: StrategyGraph, memo: _Memo) -> None:
    """Assign every node a root and a pick map; fold follower and leaf costs into roots."""
    users: dict[str, list[tuple[str, int]]] = {n: [] for n in g.nodes}
    for name, nc in g.nodes.items():
        for k, a in enumerate(node_inputs(nc)):
            if a.name in g.nodes:
                users[a.name].append((name, k))

    def foldable_leaf(name: str) -> bool:
        nc = g.nodes[name]
        return nc.kind in ("input", "param", "buffer") and len(users[name]) == 1

    folded: set[tuple[str, str, int]] = set()
    for name, nc in g.nodes.items():  # topological order
        ins = [(k, a.name) for k, a in enumerate(node_inputs(nc)) if a.name in g.nodes]
        producers = [(k, a) for k, a in ins if not foldable_leaf(a)]
        follows = (nc.kind == "getitem" or nc.node.target in rules.FOLLOWERS) and len(producers) == 1
        if nc.kind in ("input", "param", "buffer") and foldable_leaf(name):
            continue  # decided with its consumer, below
        if follows:
            k, src = producers[0]
            nc.root = g.nodes[src].root
            extra = _follow(g, nc, k, g.nodes[src], memo)
            folded.add((src, name, k))
        else:
            nc.root = name
            nc.pick = memo.iota(len(nc.strategies))
            g.root_cost_s[name] = [0.0] * len(nc.strategies)
            g.root_memory_bytes[name] = [0] * len(nc.strategies)
            extra = list(nc.cost_s)
        mem = [nc.memory_bytes[i] for i in nc.pick]
        for k, a in ins:
            if foldable_leaf(a):
                _fold_leaf(g, g.nodes[a], nc, k, extra, mem, memo)
                folded.add((a, name, k))
        costs, mems = g.root_cost_s[nc.root], g.root_memory_bytes[nc.root]
        for j in range(len(extra)):
            costs[j] += extra[j]
            mems[j] += mem[j]
    for name, nc in g.nodes.items():
        for k, a in enumerate(node_inputs(nc)):
            if a.name in g.nodes and (a.name, name, k) not in folded:
                g.edges.append(EdgeUse(a.name, name, k))
    _price_outputs(g)


def edge_key(src: NodeChoices, dst: NodeChoices) -> tuple:
    """What ``edge_cost_s`` depends on besides the two specs."""
    return (val_key(src.node.meta["val"]), src.requires_grad, dst.kind)


def _follow(g: StrategyGraph, nc: NodeChoices, k: int, src: NodeChoices, memo: _Memo) -> list[float]:
    """For each strategy of the producer's root, pick nc's cheapest strategy given the
    producer's layout (on a tie, the one that reads it as it is); return the costs."""
    key = (id(src.strategies), id(src.pick), id(nc.strategies), id(nc.cost_s), k, edge_key(src, nc))
    hit = memo.follow.get(key)
    if hit is None:
        best_for: dict[Spec, tuple[float, bool, int]] = {}
        for j in src.pick:
            src_spec = src.strategies[j].out
            if src_spec not in best_for:
                best_for[src_spec] = min(
                    (nc.cost_s[i] + edge_cost_s(g, src, nc, k, src_spec, s), s.ins[k] != src_spec, i)
                    for i, s in enumerate(nc.strategies)
                )
        chosen = [best_for[src.strategies[j].out] for j in src.pick]
        hit = memo.follow[key] = ([c[2] for c in chosen], [c[0] for c in chosen])
    nc.pick = hit[0]
    return list(hit[1])


def node_inputs(nc: NodeChoices) -> list[fx.Node]:
    """The tensor nodes nc reads (a getitem reads its multi-output producer)."""
    return [nc.node.args[0]] if nc.kind == "getitem" else tensor_args(nc.node)


def _fold_leaf(
    g: StrategyGraph,
    leaf: NodeChoices,
    nc: NodeChoices,
    k: int,
    extra: list[float],
    mem: list[int],
    memo: _Memo,
) -> None:
    """Lay out a single-use leaf input as nc's strategy wants it; add its costs to ``extra``
    and its bytes to ``mem`` (both per strategy of nc's root)."""
    key = (id(leaf.strategies), id(leaf.cost_s), id(leaf.memory_bytes), id(nc.strategies), id(nc.pick), k)
    key += (edge_key(leaf, nc),)
    hit = memo.leaf.get(key)
    if hit is None:
        best_for: dict[int, tuple[float, bool, int]] = {}
        for i_nc in nc.pick:
            if i_nc not in best_for:
                s = nc.strategies[i_nc]
                want = no_partial(s.ins[k])
                best_for[i_nc] = min(
                    (
                        leaf.cost_s[i] + edge_cost_s(g, leaf, nc, k, ls.out, s),
                        ls.out != want,
                        i,
                    )
                    for i, ls in enumerate(leaf.strategies)
                )
        chosen = [best_for[i_nc] for i_nc in nc.pick]
        pick = [c[2] for c in chosen]
        hit = memo.leaf[key] = (pick, [c[0] for c in chosen], [leaf.memory_bytes[i] for i in pick])
    leaf.root, leaf.pick = nc.root, hit[0]
    for j, (c, b) in enumerate(zip(hit[1], hit[2])):
        extra[j] += c
        mem[j] += b


def output_names(g: StrategyGraph) -> set[str]:
    """The nodes the model returns."""
    graph = next(iter(g.nodes.values())).node.graph
    output = next(n for n in graph.nodes if n.op == "output")
    return {a.name for a in output.all_input_nodes if a.name in g.nodes}


def output_cost_s(g: StrategyGraph, nc: NodeChoices, spec: Spec) -> float:
    """Outputs are handed back without partial sums: a partial output is all-reduced."""
    v = nc.node.meta["val"]
    return redistribute_time_s(
        spec, no_partial(spec), tuple(v.shape), v.element_size(), g.mesh_shape, g.links
    )


def _price_outputs(g: StrategyGraph) -> None:
    for name in output_names(g):
        nc = g.nodes[name]
        costs = g.root_cost_s[nc.root]
        for j in range(len(costs)):
            costs[j] += output_cost_s(g, nc, nc.strategies[nc.pick[j]].out)
