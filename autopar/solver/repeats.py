"""Repeated blocks: the layers of a model that are the same computation on the same shapes.

Models are stacks of identical layers (``model.layers.0`` ... ``model.layers.79``). Two things
keep planning time flat in depth:

- the strategy graph computes each distinct node's strategies and costs once
  (``solver.graph`` keys them by :func:`val_key` of the node and its inputs), and
- corresponding decision nodes of identical blocks share one decision in the ILP
  (``StrategyGraph.shared``, set by :func:`share_decisions`), so the ILP has one block's
  variables however deep the model is.

A *block* is the set of nodes whose module path (``nn_module_stack``, or a parameter's fully
qualified name) runs through a numbered child ``<prefix>.<i>`` of a module list; the innermost
number on the path names the block, so ResNet's ``stages.0.layers.1`` is a block of
``stages.0.layers``. Blocks of one prefix are *identical* when their nodes, in graph order, have
equal signatures: the same op, the same non-tensor arguments, the same output shapes and
dtypes, and tensor arguments that are the same position inside the block or nodes outside it
with the same shape and dtype. Sharing a decision is a restriction (the layers of one stack
choose alike, as Alpa and PyTorch's autoparallel do); it never makes the priced objective wrong,
since every member's costs are summed into the shared decision.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.fx as fx

if TYPE_CHECKING:
    from autopar.solver.graph import StrategyGraph


def val_key(v: object) -> object:
    """Shapes and dtypes of a node's value, hashable."""
    if isinstance(v, torch.Tensor):
        return (tuple(int(s) for s in v.shape), v.dtype)
    if isinstance(v, (list, tuple)):
        return tuple(val_key(t) for t in v)
    return type(v).__name__


def module_path(node: fx.Node) -> list[str]:
    """The node's module path (``["model", "layers", "3", "mlp"]``); a parameter's FQN."""
    if node.op == "get_attr":
        return str(node.target).split(".")
    if node.op != "call_function":
        return []
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else ""
    if not isinstance(path, str) or not path:
        return []
    return path.replace("L['self'].", "").replace("L__self__.", "").split(".")


@dataclass
class Repeats:
    #: node name -> the same-position node of the first identical block
    template: dict[str, str]
    #: node name -> its block ``(prefix, index)``, for nodes of blocks that repeat or are repeated
    block: dict[str, tuple[str, int]]
    #: first block ``(prefix, index)`` -> indices of the blocks that repeat it
    repeats: dict[tuple[str, int], list[int]]


def find_repeats(graph: fx.Graph) -> Repeats:
    """Identical numbered blocks, outermost level first: a stack of identical layers is tied
    as whole layers; inside a block that nothing repeats (ResNet's stages differ), the next
    numbered level is searched (its bottleneck layers repeat)."""
    found = Repeats({}, {}, {})
    nodes = [(n, module_path(n)) for n in graph.nodes]
    _match([(n, p) for n, p in nodes if p], 0, found)
    return found


def _match(nodes: list[tuple[fx.Node, list[str]]], start: int, found: Repeats) -> None:
    blocks: dict[tuple[str, int], list[tuple[fx.Node, list[str]]]] = defaultdict(list)
    depth: dict[tuple[str, int], int] = {}
    for n, path in nodes:
        i = next((i for i in range(start, len(path)) if path[i].isdigit()), None)
        if i is not None:
            key = (".".join(path[:i]), int(path[i]))
            blocks[key].append((n, path))
            depth[key] = i + 1
    firsts: dict[tuple, int] = {}  # (prefix, block signature) -> first block with it
    repeated: set[tuple[str, int]] = set()
    for prefix, i in sorted(blocks):
        members = [n for n, _ in blocks[(prefix, i)]]
        first = firsts.setdefault((prefix, _signature(members)), i)
        if first != i:
            repeated |= {(prefix, first), (prefix, i)}
            found.repeats.setdefault((prefix, first), []).append(i)
            for a, b in zip(members, (n for n, _ in blocks[(prefix, first)])):
                found.template[a.name] = b.name
    for key, members in blocks.items():
        if key in found.repeats or key[1] in (
            j for k, js in found.repeats.items() if k[0] == key[0] for j in js
        ):
            found.block.update((n.name, key) for n, _ in members)
        else:  # a block like no other: look for repeats inside it
            _match(members, depth[key], found)


def _local_name(fqn: str) -> str:
    """A parameter's name inside its block: ``model.layers.3.mlp.w`` -> ``mlp.w``."""
    parts = fqn.split(".")
    last = max((i for i, p in enumerate(parts) if p.isdigit()), default=-1)
    return ".".join(parts[last + 1 :])


def _signature(nodes: list[fx.Node]) -> tuple:
    pos = {n: k for k, n in enumerate(nodes)}

    def arg(a: object) -> object:
        if isinstance(a, fx.Node):
            return ("in", pos[a]) if a in pos else ("out", val_key(a.meta.get("val")))
        return a

    return tuple(
        (
            n.op,
            str(n.target) if n.op == "call_function" else _local_name(str(n.target)),
            repr(fx.node.map_aggregate(n.args, arg)),
            repr(fx.node.map_aggregate(n.kwargs, arg)),
            val_key(n.meta.get("val")),
        )
        for n in nodes
    )


def share_decisions(g: StrategyGraph, graph: fx.Graph) -> None:
    """Tie each root of a repeated block to the same-position root of the first identical
    block. Blocks with a single decision (one linear layer of a Sequential) stay free: tying
    them would forbid alternating layouts such as Megatron's column-then-row pairs."""
    found = find_repeats(graph)
    roots_per_block = Counter(found.block.get(r) for r in g.roots)
    for r in g.roots:
        t = found.template.get(r)
        if t is None or t not in g.root_cost_s or roots_per_block[found.block[t]] < 2:
            continue
        if g.nodes[r].strategies is g.nodes[t].strategies or g.nodes[r].strategies == g.nodes[t].strategies:
            g.shared[r] = t
    tied = {found.block[t] for t in g.shared.values()}
    for (prefix, first), others in found.repeats.items():
        if (prefix, first) in tied:
            g.shared_blocks.append(f"{prefix}.{{{ranges(others)}}} share the decisions of {prefix}.{first}")


def ranges(indices: list[int]) -> str:
    """[1, 2, 3, 5] -> "1-3,5"."""
    out, start = [], indices[0]
    for a, b in zip(indices, indices[1:] + [None]):
        if b != a + 1:
            out.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ",".join(out)
