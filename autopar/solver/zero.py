"""Parameter modes: where each parameter, its gradient and its AdamW moments live.

A parameter folded into its consumer's decision (``solver.graph``) is laid out as its consumer
reads it: mode ``""``, data parallel on every mesh axis where that layout is replicated
(gradients all-reduced there). Three more modes trade step time for device memory:

- ``zero2`` (ZeRO-2; FSDP's ``SHARD_GRAD_OP``): the parameter is *stored* sharded over the
  axes its consumer reads it replicated on, and so are its gradient and moments. It is
  all-gathered before its use in forward and the gathered copy is kept until its backward;
  the gradient is reduce-scattered. All-gather plus reduce-scatter move the bytes one
  all-reduce moves, so it costs one collective's latency more than ``""``.
- ``zero3`` (ZeRO-3; FSDP's ``FULL_SHARD``): stored as in ``zero2``, but a gathered copy an op
  keeps for backward is dropped after forward and gathered again in backward (one more
  all-gather; ``runtime.zero``). In a recomputed block every gather runs again anyway.
- ``offload``: stored as in ``zero2`` (as read, where no axis can shard it) in *host* memory,
  with its gradient and moments, so the optimizer step runs on the CPU. Forward copies it to
  the device and keeps the copy until backward, which sends the gradient back: both priced on
  the host link, the step by the host's memory bandwidth (``cost.hardware``).

ZeRO-1 (only the moments sharded) is not offered: with one micro-batch per step it moves more
bytes than ``zero2`` (an all-reduce of the gradient, then the parameters' all-gather) and keeps
more (the whole gradient), so it never wins; it pays off only with gradient accumulation.

Each mode is a *variant* of every strategy of a decision that holds such parameters (one mode
for all the parameters it holds), so the ILP chooses modes and layouts in one objective and
repeated blocks share them. The planner adds modes when memory is constrained; without a
budget mode ``""`` is as fast or faster. Mode ``""`` is the fastest layout, which for a large
parameter is often already sharded for storage (the optimizer step on a shard is shorter at
the same bytes moved): the plan labels such parameters ``zero2`` too (``stored_mode``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.tensor import Replicate, Shard

from autopar.cost.comm import copy_time_s, redistribute_time_s
from autopar.cost.compute import host_optimizer_step_s
from autopar.solver.graph import EdgeUse, StrategyGraph, master_itemsize
from autopar.solver.memory import kept_by
from autopar.solver.rules.base import tensor_args
from autopar.solver.specs import Spec, local_numel, no_partial

MODES = ("", "zero2", "zero3", "offload")


@dataclass
class _Variants:
    """A decision's strategies with modes: variant ``v`` is old strategy ``old[v]``; per held
    parameter its layout and mode per variant; the cost and resident-byte changes per variant."""

    old: list[int]
    leaf_pick: list[list[int]]
    leaf_mode: list[list[str]]
    extra_s: list[float]
    extra_bytes: list[int]


def add_param_modes(g: StrategyGraph, modes: tuple[str, ...] = MODES) -> None:
    """Expand every decision holding folded trainable parameters with the given modes (a
    pinned strategy gives one): its members' ``pick`` lists, its cost and resident bytes,
    and each parameter's ``modes``."""
    memo: dict = {}
    members: dict[str, list] = {}
    held: dict[str, list] = {}
    for nc in g.nodes.values():
        members.setdefault(nc.root, []).append(nc)
        if nc.kind == "param" and nc.requires_grad and nc.root != nc.name:
            held.setdefault(nc.root, []).append(nc)
    for root, leaves in held.items():
        uses = [_use(g, leaf) for leaf in leaves]
        key = (len(g.root_cost_s[root]),) + tuple(
            (id(leaf.strategies), id(leaf.pick), id(c.strategies), id(c.pick), k)
            for leaf, (c, k) in zip(leaves, uses)
        )
        if key not in memo:  # the keyed lists stay referenced, so their ids stay theirs
            keep = [(leaf.strategies, leaf.pick, c.strategies, c.pick) for leaf, (c, _) in zip(leaves, uses)]
            memo[key] = (_variants(g, leaves, uses, len(g.root_cost_s[root]), modes), keep)
        var = memo[key][0]
        unchanged = all(p == leaf.pick for p, leaf in zip(var.leaf_pick, leaves))
        unchanged = unchanged and var.old == list(range(len(var.old)))
        if unchanged and not any(m for ms in var.leaf_mode for m in ms):
            continue
        held_ids = {id(leaf) for leaf in leaves}
        for nc in members[root]:
            if id(nc) not in held_ids:
                pkey = ("pick", id(nc.pick), id(var))
                if pkey not in memo:
                    memo[pkey] = ([nc.pick[j] for j in var.old], nc.pick)
                nc.pick = memo[pkey][0]
        for leaf, pick, leaf_modes in zip(leaves, var.leaf_pick, var.leaf_mode):
            leaf.pick, leaf.modes = pick, leaf_modes
        cost, mem = g.root_cost_s[root], g.root_memory_bytes[root]
        g.root_cost_s[root] = [cost[j] + dt for j, dt in zip(var.old, var.extra_s)]
        g.root_memory_bytes[root] = [mem[j] + db for j, db in zip(var.old, var.extra_bytes)]


def _use(g, leaf):
    """The one node reading a folded parameter, and the argument position it reads it at."""
    user = next(iter(leaf.node.users))
    k = next(i for i, a in enumerate(tensor_args(user)) if a is leaf.node)
    return g.nodes[user.name], k


def _variants(g, leaves, uses, n: int, modes: tuple[str, ...]) -> _Variants:
    var = _Variants([], [[] for _ in leaves], [[] for _ in leaves], [], [])
    for j in range(n):
        seen = set()
        for mode in modes:
            got = [_leaf_mode(g, leaf, c, k, j, mode) for leaf, (c, k) in zip(leaves, uses)]
            sig = tuple((pick, m) for pick, m, _, _ in got)
            if sig in seen:
                continue  # nothing to shard, gather again or offload: a variant already there
            seen.add(sig)
            var.old.append(j)
            for i, (pick, m, _, _) in enumerate(got):
                var.leaf_pick[i].append(pick)
                var.leaf_mode[i].append(m)
            var.extra_s.append(sum(dt for _, _, dt, _ in got))
            var.extra_bytes.append(sum(db for _, _, _, db in got))
    return var


def _leaf_mode(g, leaf, consumer, k: int, j: int, mode: str) -> tuple[int, str, float, int]:
    """(layout index, mode it gets, extra seconds, extra resident bytes) of one parameter
    when its decision takes strategy ``j`` in ``mode``."""
    have = leaf.pick[j]
    want = consumer.strategies[consumer.pick[j]]
    need = no_partial(want.ins[k])
    stored = _sharded_storage(g, leaf, consumer, k, want, need)
    at = have if stored is None or mode == "zero3" and leaf.strategies[have].out != need else stored
    if not mode or mode == "zero2" and at == have:
        return have, "", 0.0, 0
    if mode == "offload" and g.hw.host_link is None:
        return have, "", 0.0, 0
    if mode == "zero3" and (leaf.strategies[at].out == need or k not in kept_by(g, consumer).inputs):
        return have, "", 0.0, 0  # nothing gathered, or nothing kept: as zero2
    e = EdgeUse(leaf.name, consumer.name, k)
    v = leaf.node.meta["val"]
    old_s = leaf.cost_s[have] + g.edge_cost_s(e, leaf.strategies[have].out, want)
    new_s = leaf.cost_s[at] + g.edge_cost_s(e, leaf.strategies[at].out, want)
    extra_bytes = leaf.memory_bytes[at] - leaf.memory_bytes[have]
    if mode == "zero3":
        shape, size = tuple(v.shape), v.element_size()
        new_s += redistribute_time_s(leaf.strategies[at].out, need, shape, size, g.mesh_shape, g.links)
    if mode == "offload":
        n = local_numel(v.shape, leaf.strategies[at].out, g.mesh_shape)
        size = master_itemsize(leaf.node)  # weights up and gradients down in the master dtype
        new_s += 2 * copy_time_s(n * size, g.hw.host_link) - leaf.cost_s[at]
        new_s += host_optimizer_step_s(n, size, g.hw)
        extra_bytes = -leaf.memory_bytes[have]
    return at, mode, new_s - old_s, extra_bytes


def _sharded_storage(g, leaf, consumer, k: int, want, need: Spec) -> int | None:
    """The layout that shards the parameter over the most axes its consumer reads it
    replicated on (and keeps the others as read), the cheapest such; None if none can."""
    axes = [i for i, p in enumerate(need) if isinstance(p, Replicate) and g.mesh_shape[i] > 1]
    best: tuple | None = None
    for i, s in enumerate(leaf.strategies):
        out = s.out
        if any(out[a] != need[a] for a in range(len(need)) if a not in axes):
            continue
        sharded = sum(isinstance(out[a], Shard) for a in axes)
        if not sharded:
            continue
        t = leaf.cost_s[i] + g.edge_cost_s(EdgeUse(leaf.name, consumer.name, k), out, want)
        cand = (-sharded, t, i)
        best = cand if best is None or cand < best else best
    return None if best is None else best[2]


def param_mode(g: StrategyGraph, nc, j: int) -> str:
    """The mode parameter ``nc`` runs in when its decision takes strategy ``j``: its variant's
    mode, or ``zero2`` where the fastest layout already stores it sharded over an axis its
    consumer reads it replicated on."""
    if nc.kind != "param" or not nc.requires_grad or nc.root == nc.name:
        return ""
    if nc.modes and nc.modes[j]:
        return nc.modes[j]
    consumer, k = _use(g, nc)
    have = nc.strategies[nc.pick[j]].out
    need = no_partial(consumer.strategies[consumer.pick[j]].ins[k])
    gathered = any(isinstance(h, Shard) and isinstance(r, Replicate) for h, r in zip(have, need))
    return "zero2" if gathered else ""
