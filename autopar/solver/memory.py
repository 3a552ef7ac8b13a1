"""Per-device memory of a training step at every liveness point of the backward pass.

The step is forward, backward, optimizer step. What is resident throughout: parameters and
their AdamW moments, buffers and inputs, in their chosen layouts (``StrategyGraph``'s
``root_memory_bytes``; none for an offloaded parameter, ``solver.zero``). What comes and goes:

- *saved activations*: every tensor an op keeps for backward (``cost.memory``: found by
  running the op on the meta device) is allocated in forward and freed when backward has
  passed its last reader. Tensors are counted once per storage (a view kept by a matmul is
  its base's storage), in the layout of the node that made them; op-private buffers (layer
  norm statistics, log-sum-exp) are divided by the number of devices sharing the op's work.
- *gradients*: a parameter's gradient is allocated when backward reaches its last reader
  and lives until the optimizer step (``zero_grad(set_to_none=True)`` frees it); an offloaded
  parameter's goes to the host.
- *parameter copies*: a parameter gathered (or copied from the host) for an op that keeps it
  is kept like an activation; a ``zero3`` one is gathered again in backward, a transient of
  its consumer's backward.

The forward pass is cut into *segments* in execution order: each instance of a repeated
block (``solver.repeats``: ``model.layers.7``) and each run of nodes between them. Backward
visits segments in reverse; at segment ``k`` the live bytes are (``Mk``)::

    resident + sum_{j >= k} G_j + sum_{j < k} kept_j + A_k

``A_k`` is the segment's saved bytes, ``G_k`` the gradients of parameters whose last reader
is in it, and ``kept_j`` what segment ``j`` keeps through the forward: ``A_j``, or, when the
block is *recomputed*, only the block's inputs ``I_j`` (the checkpoint stores them and
backward re-runs the block, so ``A_k`` is live again while segment ``k``'s backward runs).
Any number of the blocks of a class may be recomputed; the earliest first, since what an
earlier block keeps is live at every later liveness point.
The optimizer step holds ``resident + sum_j G_j``. The peak is the largest of these; the
ILP (``solver.ilp``) bounds all of them by the budget.

Every quantity is linear in the ILP's one-hot decision variables: an ``Expr`` maps a
decision to its per-strategy coefficient vector.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import pulp
import torch
import torch.fx as fx

from autopar.cost.compute import BACKWARD_OVER_FORWARD
from autopar.cost.memory import Saved, saved_for_backward
from autopar.cost.pricing import out_bytes
from autopar.solver import fusion
from autopar.solver.graph import EdgeUse, NodeChoices, StrategyGraph, master_itemsize, node_inputs, split_axes
from autopar.solver.linear import weighted_sum
from autopar.solver.repeats import Repeats, find_repeats
from autopar.solver.rules.base import tensor_args
from autopar.solver.rules.elementwise import INPLACE
from autopar.solver.specs import Spec, local_numel
from autopar.tracer.export import MASTER_DTYPE

Expr = dict[str, list[float]]  # decision -> coefficient per strategy
LEAVES = ("input", "param", "buffer")
#: a layout change holds two buffers of its result's size at its peak: the collective's flat
#: output and the result laid out (gloo's all-gather, then a concatenation), measured on CPU
COPY_BUFFERS = 2


@dataclass
class Segment:
    name: str  # a block ("model.layers.3") or "between blocks"
    nodes: list[str] = field(default_factory=list)
    #: the repeated-block class this segment is an instance of (recomputable), if any
    block_class: tuple[str, int] | None = None
    saved: Expr = field(default_factory=dict)  # A_k
    #: edges between decisions into ops of this segment that keep that input for backward:
    #: a layout change there makes a copy that is kept (priced on the ILP's edge variables)
    reshard_edges: list[EdgeUse] = field(default_factory=list)
    grads: Expr = field(default_factory=dict)  # G_k
    inputs: Expr = field(default_factory=dict)  # I_k (recomputable segments)
    forward_s: Expr = field(default_factory=dict)  # F_k: forward compute, re-run when recomputed
    #: per distinct op of the segment: transient bytes while its backward runs, and per layout
    #: change inside a decision the buffer it allocates (the largest one counts: ``T_k``)
    transients: dict[tuple, Expr] = field(default_factory=dict)
    #: edges between decisions into the segment: a layout change allocates while it runs
    copy_edges: list[EdgeUse] = field(default_factory=list)


@dataclass
class MemoryModel:
    g: StrategyGraph
    resident: Expr
    segments: list[Segment]
    #: block class -> indices of its segments
    classes: dict[tuple[str, int], list[int]]

    def saved_bytes(self, s: Segment, choice: dict[str, int]) -> float:
        """``A_k`` at a choice: the segment's kept activations and kept resharded copies."""
        return value(s.saved, choice) + sum(self._copy(e, choice) for e in s.reshard_edges)

    def _copy(self, e: EdgeUse, choice: dict[str, int]) -> float:
        g = self.g
        return copy_bytes(
            g, g.nodes[e.src], g.spec_of(e.src, choice).out, g.spec_of(e.dst, choice).ins[e.arg]
        )

    def evaluate(self, choice: dict[str, int], recomputed: set[str]) -> dict[str, int | str]:
        """Peak bytes and its parts for a choice (per root) and a set of recomputed blocks."""
        saved = [self.saved_bytes(s, choice) for s in self.segments]
        kept = [value(s.inputs, choice) if s.name in recomputed else a for s, a in zip(self.segments, saved)]
        resident = value(self.resident, choice)
        grads = [value(s.grads, choice) for s in self.segments]
        best = {"peak_bytes": resident + sum(grads), "resident_bytes": resident, "gradient_bytes": sum(grads)}
        best |= {"activation_bytes": 0, "transient_bytes": 0, "at": "optimizer step"}
        for k, s in enumerate(self.segments):
            act = sum(kept[:k]) + saved[k]
            temp = max([value(t, choice) for t in s.transients.values()] + [0.0])
            temp = max([temp] + [COPY_BUFFERS * self._copy(e, choice) for e in s.copy_edges])
            peak = resident + sum(grads[k:]) + act + temp
            if peak > best["peak_bytes"]:
                best = {"peak_bytes": peak, "resident_bytes": resident, "gradient_bytes": sum(grads[k:])}
                best |= {"activation_bytes": act, "transient_bytes": temp, "at": f"backward of {s.name}"}
        return best

    def constrain(
        self, prob: pulp.LpProblem, x: dict[str, list], edge_copies, identity
    ) -> tuple[object, dict, list]:
        """Add the liveness constraints (named as in ``solver.ilp``'s docstring) to ``prob``.
        ``edge_copies(e, scale)`` is the ILP's expression for the bytes of the copy a layout
        change on edge ``e`` makes; ``identity(e)`` names the edges that share variables.
        Returns the peak variable (in ``self.unit_bytes``), the recompute binaries per block
        (by segment index), and the recompute time terms for the objective."""
        u = self.unit_bytes

        def lin(e: Expr, scale: float = 1.0 / u):
            return weighted_sum((c * scale, x[d][j]) for d, vec in e.items() for j, c in enumerate(vec) if c)

        saved = [  # per segment: used by kept_saved and liveness
            weighted_sum([(1.0, lin(s.saved))] + [(1.0, edge_copies(e, 1.0 / u)) for e in s.reshard_edges])
            for s in self.segments
        ]

        def saved_upper(s: Segment) -> float:
            g = self.g
            return upper(s.saved) + sum(
                g.nodes[e.src].node.meta["val"].numel() * g.nodes[e.src].node.meta["val"].element_size()
                for e in s.reshard_edges
            )

        rc = {k: pulp.LpVariable(f"recompute_{k}", cat="Binary") for ks in self.classes.values() for k in ks}
        for i, ks in enumerate(self.classes.values()):
            for a, b in zip(ks, ks[1:]):
                prob += rc[a] >= rc[b], f"earliest_first_{i}_{b}"
        kept = []
        for k, s in enumerate(self.segments):
            if s.block_class is None:
                kept.append(saved[k])
                continue
            v = pulp.LpVariable(f"kept_{k}", lowBound=0)
            prob += v >= saved[k] - saved_upper(s) / u * rc[k], f"kept_saved_{k}"
            prob += v >= lin(s.inputs), f"kept_inputs_{k}"
            kept.append(v)
        time_terms = []
        for k in rc:
            fwd = self.segments[k].forward_s
            f = pulp.LpVariable(f"recompute_s_{k}", lowBound=0)
            prob += f >= lin(fwd, 1.0) - upper(fwd) * (1 - rc[k]), f"recompute_time_{k}"
            time_terms.append(f)
        temps: dict[tuple, object] = {}  # segments with the same transients share T_k
        for k, s in enumerate(self.segments):
            copies = {identity(e): e for e in s.copy_edges}
            key = (tuple(sorted(s.transients)), tuple(sorted(copies, key=repr)))
            if key in temps:
                continue
            temps[key] = t_k = pulp.LpVariable(f"transient_{k}", lowBound=0)
            for i, t in enumerate(s.transients.values()):
                prob += t_k >= lin(t), f"transient_{k}_{i}"
            for i, e in enumerate(copies.values()):
                prob += t_k >= edge_copies(e, COPY_BUFFERS / u), f"transient_copy_{k}_{i}"
        n = len(self.segments)
        before = [pulp.LpVariable(f"kept_before_{k}", lowBound=0) for k in range(n)]
        after = [pulp.LpVariable(f"grads_from_{k}", lowBound=0) for k in range(n)]
        prob += before[0] == 0, "kept_before_0"
        for k in range(1, n):
            prob += before[k] == before[k - 1] + kept[k - 1], f"kept_before_{k}"
        prob += after[n - 1] == lin(self.segments[n - 1].grads), f"grads_from_{n - 1}"
        for k in range(n - 2, -1, -1):
            prob += after[k] == after[k + 1] + lin(self.segments[k].grads), f"grads_from_{k}"
        peak = pulp.LpVariable("peak", lowBound=0)
        resident = lin(self.resident)
        for k, s in enumerate(self.segments):
            copies = {identity(e): e for e in s.copy_edges}
            t_k = temps[(tuple(sorted(s.transients)), tuple(sorted(copies, key=repr)))]
            prob += peak >= resident + after[k] + before[k] + saved[k] + t_k, f"liveness_{k}"
        prob += peak >= resident + after[0], "optimizer_step"
        return peak, rc, time_terms

    @property
    def unit_bytes(self) -> float:
        """The ILP counts bytes in units that keep its coefficients near 1e3 at most."""
        top = upper(self.resident) + sum(upper(s.saved) + upper(s.grads) for s in self.segments)
        return max(top / 1e3, 1.0)


def value(e: Expr, choice: dict[str, int]) -> float:
    return sum(vec[choice[d]] for d, vec in e.items())


def upper(e: Expr) -> float:
    return sum(max(vec) for vec in e.values())


def merged(exprs) -> Expr:
    out: Expr = {}
    for e in exprs:
        for d, vec in e.items():
            acc = out.setdefault(d, [0.0] * len(vec))
            for j, c in enumerate(vec):
                acc[j] += c
    return out


def build_memory_model(g: StrategyGraph) -> MemoryModel:
    found = find_repeats(next(iter(g.nodes.values())).node.graph)
    blocks, classes_of = found.block, _block_classes(found)
    segments: list[Segment] = []
    where: dict[str, int] = {}
    writes = {found.block.get(n.name) for n in g.nodes.values() if n.node.target in INPLACE}
    for name, nc in g.nodes.items():
        if nc.kind in LEAVES:
            continue
        block = blocks.get(name)
        if block is not None and classes_of.get(block) in {classes_of.get(w) for w in writes if w}:
            block = None  # a block that writes a buffer (batch norm statistics) must run once
        label = f"{block[0]}.{block[1]}" if block else "between blocks"
        if not segments or segments[-1].name != label:
            segments.append(Segment(label, block_class=classes_of.get(block) if block else None))
        segments[-1].nodes.append(name)
        where[name] = len(segments) - 1
    if not segments:
        segments.append(Segment("between blocks"))
    storage = _storages(g)
    saved = _saved_storages(g, storage)
    ilp_edges = {(e.src, e.dst, e.arg) for e in g.edges}
    # identical nodes (repeated blocks) share their strategy list, and with it these vectors:
    # the list's identity stands for op, shapes and gradient flow (``graph._choice_key``)
    memo: dict[tuple, list[float]] = {}

    def per_strategy(fn, nc: NodeChoices, *args) -> list[float]:
        key = (fn, id(nc.strategies), *args)
        if key not in memo:
            memo[key] = fn(g, nc, *args)
        return memo[key]

    for seg in segments:
        for name in seg.nodes:
            nc = g.nodes[name]
            _add(g, seg.saved, nc, per_strategy(_saved_bytes, nc, name in saved))
            for k, a in enumerate(node_inputs(nc) if nc.kind == "op" else []):
                if (a.name, name, k) in ilp_edges:
                    seg.copy_edges.append(EdgeUse(a.name, name, k))
                elif a.name in g.nodes:  # the buffers a layout change allocates while it runs
                    src, t = g.nodes[a.name], {}
                    vec = [
                        COPY_BUFFERS * copy_bytes(g, src, src.strategies[i].out, nc.strategies[j].ins[k])
                        for i, j in zip(src.pick, nc.pick)
                    ]
                    _add_root(g, t, nc.root, vec)
                    if t:
                        seg.transients.setdefault(_expr_key(t), t)
            if not nc.requires_grad or nc.kind != "op":
                continue
            _add(g, seg.forward_s, nc, [c / (1 + BACKWARD_OVER_FORWARD) for c in nc.cost_s])
            t: Expr = {}
            _add(g, t, nc, per_strategy(_backward_bytes, nc))
            seg.transients.setdefault(_expr_key(t), t)
            args = tensor_args(nc.node)
            for k in kept_by(g, nc).inputs:
                if args[k].name not in g.nodes:
                    continue
                if (args[k].name, name, k) in ilp_edges:
                    seg.reshard_edges.append(EdgeUse(args[k].name, name, k))
                else:  # a layout change inside one decision (a gathered parameter, a follower)
                    _add_inner_copy(g, seg, g.nodes[args[k].name], nc, k)
                _add_view_copy(g, seg.saved, _view_chain(g, args[k].name, storage))
        if seg.block_class is not None:
            members = set(seg.nodes)
            outside = {
                a.name
                for n in seg.nodes
                for a in tensor_args(g.nodes[n].node)
                if a.name in g.nodes and a.name not in members and g.nodes[a.name].kind not in LEAVES
            }
            for name in sorted(outside):
                _add(g, seg.inputs, g.nodes[name], _out_bytes(g, g.nodes[name]))
    for nc in g.nodes.values():
        if nc.kind == "param":
            readers = [where[u.name] for u in nc.node.users if u.name in where]
            k = max(readers, default=len(segments) - 1)
            # the gradient of the master weight; an offloaded parameter's goes to the host
            own = [
                b * master_itemsize(nc.node) / nc.node.meta["val"].element_size() for b in _out_bytes(g, nc)
            ]
            vec = [0.0 if nc.modes and nc.modes[r] == "offload" else own[i] for r, i in enumerate(nc.pick)]
            _add_root(g, segments[k].grads, nc.root, vec)
    classes: dict[tuple[str, int], list[int]] = defaultdict(list)
    for k, seg in enumerate(segments):
        if seg.block_class is not None:
            classes[seg.block_class].append(k)
    resident = merged({g.decision(r): list(map(float, v))} for r, v in g.root_memory_bytes.items())
    return MemoryModel(g, resident, segments, dict(classes))


def _expr_key(e: Expr) -> tuple:
    return tuple((d, tuple(v)) for d, v in sorted(e.items()))


def copy_bytes(g: StrategyGraph, src: NodeChoices, have: Spec, need: Spec) -> float:
    """Bytes of the resharded copy an op keeps when it reads ``src`` in another layout."""
    if have == need:
        return 0.0
    v = src.node.meta["val"]
    return float(local_numel(v.shape, need, g.mesh_shape) * v.element_size())


def _add_inner_copy(g: StrategyGraph, seg: Segment, src: NodeChoices, nc: NodeChoices, k: int) -> None:
    """The copy ``nc`` keeps of its input ``src`` (same decision) in the layout it reads: a
    gathered parameter, an offloaded one's device copy or a low-precision one's cast (a copy
    even in the same layout), a follower's relayout. A ``zero3``
    parameter's gathered copy is not kept: backward gathers it again when ``nc``'s backward
    runs, a transient there."""
    kept, refetched = [], []
    for r, (i, j) in enumerate(zip(src.pick, nc.pick)):
        have, need = src.strategies[i].out, nc.strategies[j].ins[k]
        mode = src.modes[r] if src.modes else ""
        copied = mode == "offload" or MASTER_DTYPE in src.node.meta
        b = copy_bytes(g, src, (), need) if copied else copy_bytes(g, src, have, need)
        kept.append(0.0 if mode == "zero3" else b)
        refetched.append(b if mode == "zero3" else 0.0)
    _add_root(g, seg.saved, nc.root, kept)
    t: Expr = {}
    _add_root(g, t, nc.root, [COPY_BUFFERS * b for b in refetched])
    if t:
        seg.transients.setdefault(_expr_key(t), t)


def kept_by(g: StrategyGraph, nc: NodeChoices) -> Saved:
    """What op ``nc`` keeps for backward, given which of its inputs need gradients. A chain
    the plan fuses keeps what its kernel does, at its tail: the chain's input, the weights it
    reads and per-row fp32 statistics; its other members keep nothing."""
    args = tensor_args(nc.node)
    role = fusion.role(nc.node)
    if role == "member" or (role == "tail" and not nc.requires_grad):
        return Saved((), False, 0)
    if role == "tail":
        f = nc.node.meta[fusion.FUSION]
        weights = tuple(k for k, a in enumerate(args) if a.name in f.params)
        v = nc.node.meta["val"]
        stats_bytes = 4 * fusion.STATS_PER_ROW[f.kind] * v.numel() // max(v.shape[-1], 1)
        return Saved(weights, False, stats_bytes, others=(f.x,))
    return saved_for_backward(nc.node, args, [_requires_grad(g, a) for a in args])


def _backward_bytes(g: StrategyGraph, nc: NodeChoices) -> list[float]:
    """Transient bytes while ``nc``'s backward runs, per own strategy: the gradient arriving
    for its output, the gradients it makes for its inputs, and its private saved buffers."""
    args = tensor_args(nc.node)
    grads = [k for k, a in enumerate(args) if _requires_grad(g, a)]
    out = _out_bytes(g, nc)
    extra = kept_by(g, nc).extra_bytes
    res = []
    for b, s in zip(out, nc.strategies):
        ins = sum(
            local_numel(args[k].meta["val"].shape, s.ins[k], g.mesh_shape)
            * args[k].meta["val"].element_size()
            for k in grads
        )
        res.append(b + ins + extra / math.prod(g.mesh_shape[i] for i in split_axes(s)))
    return res


def _block_classes(found: Repeats) -> dict[tuple[str, int], tuple[str, int]]:
    """Each instance of a repeated block -> its class (the first identical block)."""
    out = {}
    for (prefix, first), others in found.repeats.items():
        for i in [first, *others]:
            out[(prefix, i)] = (prefix, first)
    return out


def _add(g: StrategyGraph, e: Expr, nc: NodeChoices, own: list[float]) -> None:
    """Add a per-own-strategy vector of ``nc`` to ``e``, as coefficients of its decision."""
    if not any(own):
        return
    vec = e.setdefault(g.decision(nc.root), [0.0] * len(nc.pick))
    for j, i in enumerate(nc.pick):
        vec[j] += own[i]


def _out_bytes(g: StrategyGraph, nc: NodeChoices) -> list[float]:
    return [float(out_bytes(nc.node, s.out, g.mesh_shape)) for s in nc.strategies]


def _saved_bytes(g: StrategyGraph, nc: NodeChoices, output_saved: bool) -> list[float]:
    """Bytes ``nc`` adds to the saved activations, per own strategy: its output's storage
    when some op keeps it, and the op's private saved buffers (divided like its work)."""
    out = _out_bytes(g, nc) if output_saved else [0.0] * len(nc.strategies)
    if nc.kind != "op":
        return out
    extra = kept_by(g, nc).extra_bytes
    if not extra:
        return out
    return [b + extra / math.prod(g.mesh_shape[i] for i in split_axes(s)) for b, s in zip(out, nc.strategies)]


def _requires_grad(g: StrategyGraph, a: fx.Node) -> bool:
    return a.name in g.nodes and g.nodes[a.name].requires_grad


def _storages(g: StrategyGraph) -> dict[str, int]:
    """Node -> the storage its traced value lives in (views share their base's). A node with
    several outputs that view its input (``split``) takes its input's storage."""
    out: dict[str, int] = {}
    for name, nc in g.nodes.items():
        v = nc.node.meta.get("val")
        if isinstance(v, torch.Tensor):
            out[name] = v.untyped_storage()._cdata
        elif nc.kind == "op":
            first = next((a.name for a in tensor_args(nc.node) if a.name in out), None)
            if first is not None:
                out[name] = out[first]
    return out


def _view_chain(g: StrategyGraph, name: str, storage: dict[str, int]) -> list[str]:
    """``name`` and the nodes up to the base of its storage, following inputs that share it."""
    chain = [name]
    while True:
        nc = g.nodes[chain[-1]]
        parent = next(
            (
                a.name
                for a in node_inputs(nc)
                if a.name in g.nodes and storage.get(a.name) == storage.get(nc.name)
            ),
            None,
        )
        if parent is None or storage.get(parent) is None:
            return chain
        chain.append(parent)


def _add_view_copy(g: StrategyGraph, e: Expr, chain: list[str]) -> None:
    """A kept view whose chain from its base changes layout keeps the resharded copy (its base's
    storage is counted when some op keeps it): per strategy of the chain's one decision."""
    nodes = [g.nodes[n] for n in chain]
    if len(nodes) < 2 or any(n.root != nodes[0].root or n.kind in LEAVES for n in nodes):
        return
    view, vec = nodes[0], []
    for j in range(len(view.pick)):
        specs = [n.strategies[n.pick[j]] for n in nodes]
        changed = any(child.ins[0] != parent.out for child, parent in zip(specs, specs[1:]))
        vec.append(copy_bytes(g, view, (), specs[0].out) if changed else 0.0)
    _add_root(g, e, view.root, vec)


def _add_root(g: StrategyGraph, e: Expr, root: str, vec: list[float]) -> None:
    """Add a per-root-strategy vector to ``e``."""
    if not any(vec):
        return
    acc = e.setdefault(g.decision(root), [0.0] * len(vec))
    for j, b in enumerate(vec):
        acc[j] += b


def _saved_storages(g: StrategyGraph, storage: dict[str, int]) -> set[str]:
    """Nodes whose output storage some op keeps for backward (views resolve to their base)."""
    base: dict[int, str] = {}
    base_of = {name: base.setdefault(sid, name) for name, sid in storage.items()}
    saved: set[str] = set()
    for name, nc in g.nodes.items():
        if nc.kind != "op" or not nc.requires_grad:
            continue
        args = tensor_args(nc.node)
        kept = kept_by(g, nc)
        for k in kept.inputs:
            if args[k].name in base_of:
                saved.add(base_of[args[k].name])
        saved.update(base_of[n] for n in kept.others if n in base_of)
        if kept.output and name in base_of:
            saved.add(base_of[name])
    return {n for n in saved if g.nodes[n].kind not in LEAVES}
