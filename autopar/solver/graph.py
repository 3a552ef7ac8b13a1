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
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.distributed.tensor import Partial, Replicate, Shard

from autopar.cost.comm import redistribute_time_s
from autopar.cost.compute import BACKWARD_OVER_FORWARD, optimizer_step_s, roofline_s
from autopar.cost.hardware import Hardware
from autopar.errors import ShardingError
from autopar.solver import rules
from autopar.solver.rules.base import Strategy, tensor_args
from autopar.solver.specs import Spec, divides, local_numel, no_partial

Pin = Callable[["NodeChoices", list[Strategy]], list[Strategy]]


@dataclass
class NodeChoices:
    node: fx.Node
    kind: str  # input | param | buffer | op | getitem
    strategies: list[Strategy]
    cost_s: list[float]  # own compute / optimizer time per strategy
    memory_bytes: list[int]  # own per-device bytes per strategy
    requires_grad: bool
    fallback: bool = False
    root: str = ""
    pick: list[int] = field(default_factory=list)  # root strategy index -> own index

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

    def spec_of(self, name: str, choice: dict[str, int]) -> Strategy:
        nc = self.nodes[name]
        return nc.strategies[nc.pick[choice[nc.root]]]

    def edge_cost_s(self, e: EdgeUse, src_spec: Spec, dst_strategy: Strategy) -> float:
        return edge_cost_s(self, self.nodes[e.src], self.nodes[e.dst], e.arg, src_spec, dst_strategy)

    @property
    def roots(self) -> list[str]:
        return list(self.root_cost_s)


@functools.lru_cache(maxsize=1 << 16)
def _split_axes(s: Strategy) -> frozenset[int]:
    """Mesh axes along which the op's work is divided (some tensor is not replicated)."""
    axes = set()
    for spec in (s.out,) + s.ins:
        axes |= {i for i, p in enumerate(spec) if not isinstance(p, Replicate)}
    return frozenset(axes)


@functools.lru_cache(maxsize=1 << 16)
def grad_spec(s: Strategy, arg: int) -> Spec:
    """Placement of the gradient an op sends back to input ``arg``: partial where the input
    was replicated but the op's work was divided along that axis."""
    split = _split_axes(s)
    return tuple(
        Partial()
        if isinstance(p, Replicate) and i in split
        else (Replicate() if isinstance(p, Partial) else p)
        for i, p in enumerate(s.ins[arg])
    )


def edge_cost_s(
    g: StrategyGraph, src: NodeChoices, dst: NodeChoices, arg: int, src_spec: Spec, dst_s: Strategy
) -> float:
    """Forward resharding src_spec -> required input spec, plus the gradient's way back."""
    if dst.kind == "getitem":
        return 0.0
    v = src.node.meta["val"]
    shape, itemsize = tuple(v.shape), v.element_size()
    links = g.hw.axis_links(g.mesh_shape)
    need = dst_s.ins[arg]
    t = redistribute_time_s(src_spec, need, shape, itemsize, g.mesh_shape, links)
    if src.requires_grad:
        t += redistribute_time_s(
            grad_spec(dst_s, arg), no_partial(src_spec), shape, itemsize, g.mesh_shape, links
        )
    return t


def _leaf_specs(shape: Sequence[int], n_axes: int) -> list[Spec]:
    per_axis = [Replicate()] + [Shard(d) for d in range(len(shape))]
    out: list[Spec] = [()]
    for _ in range(n_axes):
        out = [s + (p,) for s in out for p in per_axis]
    return out


def build(
    gm: fx.GraphModule,
    mesh_shape: Sequence[int],
    hw: Hardware,
    trainable: dict[str, bool],
    pin: Pin | None = None,
) -> StrategyGraph:
    mesh_shape = tuple(mesh_shape)
    nodes: dict[str, NodeChoices] = {}
    for node in gm.graph.nodes:
        nc = _choices(node, mesh_shape, hw, trainable, nodes)
        if nc is None:
            continue
        if pin is not None:
            nc.strategies = pin(nc, nc.strategies)
        if nc.kind == "op":
            nc.strategies = _reachable(nc, nodes)
        _reprice(nc, mesh_shape, hw)
        if not nc.strategies:
            raise ShardingError(_no_strategy_message(nc, mesh_shape))
        nodes[node.name] = nc
    g = StrategyGraph(mesh_shape, hw, nodes, {}, {}, [])
    _merge(g)
    return g


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


def _choices(node, mesh_shape, hw, trainable, nodes) -> NodeChoices | None:
    v = node.meta.get("val")
    if node.op in ("placeholder", "get_attr"):
        if not isinstance(v, torch.Tensor):
            return None
        kind = "input" if node.op == "placeholder" else ("param" if trainable.get(node.target) else "buffer")
        specs = _leaf_specs(v.shape, len(mesh_shape))
        if _written_in_place(node):  # the write must land in the buffer itself, not a resharded copy
            specs = [tuple(Replicate() for _ in mesh_shape)]
        strategies = [Strategy(s, ()) for s in specs if divides(s, v.shape, mesh_shape)]
        nc = NodeChoices(node, kind, strategies, [], [], kind == "param")
    elif node.op == "call_function" and node.target is operator.getitem:
        src = nodes.get(node.args[0].name) if isinstance(node.args[0], fx.Node) else None
        if src is None or not isinstance(v, torch.Tensor):
            return None
        outs = list(dict.fromkeys(s.out for s in src.strategies))
        nc = NodeChoices(node, "getitem", [Strategy(o, (o,)) for o in outs], [], [], src.requires_grad)
    elif node.op == "call_function":
        if not (isinstance(v, torch.Tensor) or (isinstance(v, (list, tuple)) and v)):
            return None
        args = tensor_args(node)
        req = any(nodes[a.name].requires_grad for a in args if a.name in nodes)
        outs = [v] if isinstance(v, torch.Tensor) else [t for t in v if isinstance(t, torch.Tensor)]
        req = req and all(t.is_floating_point() for t in outs)
        nc = NodeChoices(
            node, "op", rules.strategies(node, mesh_shape), [], [], req, fallback=not rules.has_rule(node)
        )
    else:
        return None
    return nc


def _reprice(nc: NodeChoices, mesh_shape, hw: Hardware) -> None:
    nc.cost_s, nc.memory_bytes = [], []
    v = nc.node.meta["val"]
    outs = [v] if isinstance(v, torch.Tensor) else [t for t in v if isinstance(t, torch.Tensor)]
    for s in nc.strategies:
        out_bytes = sum(local_numel(t.shape, s.out, mesh_shape) * t.element_size() for t in outs)
        if nc.kind == "param":
            n = local_numel(v.shape, s.out, mesh_shape)
            nc.cost_s.append(optimizer_step_s(n, v.element_size(), hw))
            nc.memory_bytes.append(4 * out_bytes)  # weight, gradient, two AdamW moments
        elif nc.kind != "op":
            nc.cost_s.append(0.0)
            nc.memory_bytes.append(out_bytes if nc.kind != "getitem" else 0)
        else:
            nc.cost_s.append(_compute_s(nc, s, out_bytes, mesh_shape, hw))
            nc.memory_bytes.append(out_bytes)


def _compute_s(nc: NodeChoices, s: Strategy, out_bytes: int, mesh_shape, hw: Hardware) -> float:
    node = nc.node
    shard_axes = {i for spec in (s.out,) + s.ins for i, p in enumerate(spec) if isinstance(p, Shard)}
    flops = rules.forward_flops(node) / math.prod(mesh_shape[i] for i in shard_axes)
    in_bytes = sum(
        local_numel(a.meta["val"].shape, spec, mesh_shape) * a.meta["val"].element_size()
        for a, spec in zip(tensor_args(node), s.ins)
    )
    v = node.meta["val"]
    dtype = v.dtype if isinstance(v, torch.Tensor) else v[0].dtype
    fwd = roofline_s(flops, in_bytes + out_bytes, dtype, hw)
    return fwd * (1 + BACKWARD_OVER_FORWARD) if nc.requires_grad else fwd


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


def _merge(g: StrategyGraph) -> None:
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
            root = g.nodes[src].root
            nc.root = root
            extra = _follow(g, nc, k, g.nodes[src])
            folded.add((src, name, k))
            _fold_leaves(g, nc, ins, foldable_leaf, folded, extra)
        else:
            nc.root = name
            nc.pick = list(range(len(nc.strategies)))
            g.root_cost_s[name] = [0.0] * len(nc.strategies)
            g.root_memory_bytes[name] = [0] * len(nc.strategies)
            extra = list(nc.cost_s)
            _fold_leaves(g, nc, ins, foldable_leaf, folded, extra)
    for name, nc in g.nodes.items():
        for k, a in enumerate(node_inputs(nc)):
            if a.name in g.nodes and (a.name, name, k) not in folded:
                g.edges.append(EdgeUse(a.name, name, k))
    _price_outputs(g)


def _follow(g: StrategyGraph, nc: NodeChoices, k: int, src: NodeChoices) -> list[float]:
    """For each strategy of the producer's root, pick nc's cheapest strategy given the
    producer's layout (on a tie, the one that reads it as it is); return the costs."""
    nc.pick, costs = [], []
    for j in range(len(g.root_cost_s[nc.root])):
        src_spec = src.strategies[src.pick[j]].out
        options = [
            (nc.cost_s[i] + edge_cost_s(g, src, nc, k, src_spec, s), s.ins[k] != src_spec, i)
            for i, s in enumerate(nc.strategies)
        ]
        cost, _, best = min(options)
        nc.pick.append(best)
        costs.append(cost)
    return costs


def node_inputs(nc: NodeChoices) -> list[fx.Node]:
    """The tensor nodes nc reads (a getitem reads its multi-output producer)."""
    return [nc.node.args[0]] if nc.kind == "getitem" else tensor_args(nc.node)


def _fold_leaves(g, nc: NodeChoices, ins, foldable_leaf, folded, extra: list[float]) -> None:
    """Lay out each single-use leaf input as nc's strategy wants it; add all costs to the root."""
    root = nc.root
    leaves = [(k, a) for k, a in ins if foldable_leaf(a)]
    mem = [nc.memory_bytes[nc.pick[j]] for j in range(len(extra))]
    for k, a in leaves:
        leaf = g.nodes[a]
        leaf.root, leaf.pick = root, []
        for j in range(len(extra)):
            s = nc.strategies[nc.pick[j]]
            want = no_partial(s.ins[k])
            best = min(
                range(len(leaf.strategies)),
                key=lambda i: (
                    leaf.cost_s[i] + edge_cost_s(g, leaf, nc, k, leaf.strategies[i].out, s),
                    leaf.strategies[i].out != want,
                ),
            )
            leaf.pick.append(best)
            extra[j] += leaf.cost_s[best] + edge_cost_s(g, leaf, nc, k, leaf.strategies[best].out, s)
            mem[j] += leaf.memory_bytes[best]
        folded.add((a, nc.name, k))
    for j in range(len(extra)):
        g.root_cost_s[root][j] += extra[j]
        g.root_memory_bytes[root][j] += mem[j]


def output_names(g: StrategyGraph) -> set[str]:
    """The nodes the model returns."""
    graph = next(iter(g.nodes.values())).node.graph
    output = next(n for n in graph.nodes if n.op == "output")
    return {a.name for a in output.all_input_nodes if a.name in g.nodes}


def output_cost_s(g: StrategyGraph, nc: NodeChoices, spec: Spec) -> float:
    """Outputs are handed back without partial sums: a partial output is all-reduced."""
    v = nc.node.meta["val"]
    links = g.hw.axis_links(g.mesh_shape)
    return redistribute_time_s(spec, no_partial(spec), tuple(v.shape), v.element_size(), g.mesh_shape, links)


def _price_outputs(g: StrategyGraph) -> None:
    for name in output_names(g):
        nc = g.nodes[name]
        costs = g.root_cost_s[nc.root]
        for j in range(len(costs)):
            costs[j] += output_cost_s(g, nc, nc.strategies[nc.pick[j]].out)
