"""Measure, on the devices of a mesh, what the cost model prices (``autopar profile``).

Every rank of the mesh runs the same measurements at the same time, so each is taken under
the conditions of a training step (on a CPU mesh, the ranks share the cores; on GPUs, each
has its own), and the mean over the ranks is kept (``cost.clock``):

- **ops**: every distinct signature (``cost.profile_db.op_signature``) that some strategy of
  some node needs, once: DTensor inputs of random values in the strategy's input layouts,
  called the way the emitted module calls the op (on local shards, or through DTensor for
  ``rules.DISPATCHED``), its forward and backward timed apart in one call;
  ``OPS_PER_ROUND`` ops take turns (as in a step, each call comes after other ops'), an
  untimed round first, then the median of up to ``repeats`` timed ones; a backward less the
  fixed cost of its own ``torch.autograd.grad`` call, which a step pays once. Identical
  repeated blocks have identical signatures, so depth adds nothing.
- **layout changes** and the **optimizer**: sweeps over message sizes (``cost.sweeps``).
- **host speed**: a fixed workload's time (``cost.clock.HostSpeed``) before each batch of ops
  and between the phases; a profile taken while it moved by more than ``UNSTEADY_SPREAD``
  warns, since its prices carry noise of that order.

Times are the kernels' time on the stream on a GPU (CUDA events), wall clock on a CPU; except
that ops and the optimizer on a CPU mesh whose ranks outnumber the host's cores are timed by
their CPU time over each rank's share of a core (``cost.clock``): that is what a step pays for
them, where the ranks take turns on the cores. Collectives keep the wall clock (their cost is
mostly waiting, which takes no CPU time).
"""

from __future__ import annotations

import functools
import json
import math
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.fx as fx
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate

from autopar.cost.clock import Clock, HostSpeed, core_share, rank_mean
from autopar.cost.hardware import get_hardware
from autopar.cost.pricing import out_bytes, work
from autopar.cost.profile_db import device_key, merge, op_signature
from autopar.cost.sweeps import SWEEP_BYTES, SWEEP_BYTES_GPU, profile_collectives, profile_optimizer
from autopar.errors import AutoparError
from autopar.passes.layouts import runs_locally
from autopar.runtime.local_mesh import run_gloo
from autopar.runtime.local_ops import local_call
from autopar.solver import rules
from autopar.solver.graph import build, input_grads
from autopar.solver.rules.base import Strategy, is_tensor_node
from autopar.solver.specs import local_shape, short
from autopar.tracer import Traced, trace


@dataclass(frozen=True)
class OpTask:
    signature: str
    node: fx.Node
    strategy: Strategy
    grads: tuple[bool, ...]
    requires_grad: bool


def op_tasks(traced: Traced, mesh_shape: Sequence[int]) -> list[OpTask]:
    """One task per distinct op signature over every strategy of every node, in graph order."""
    tasks: dict[str, OpTask] = {}
    for node_tasks in node_op_tasks(traced, mesh_shape).values():
        for task in node_tasks:
            tasks.setdefault(task.signature, task)
    return list(tasks.values())


def node_op_tasks(traced: Traced, mesh_shape: Sequence[int]) -> dict[fx.Node, list[OpTask]]:
    """Each op node's task per strategy it may take (the same signature may recur)."""
    g = build(traced.gm, mesh_shape, get_hardware("cpu"), traced.trainable)
    out: dict[fx.Node, list[OpTask]] = {}
    for nc in g.nodes.values():
        if nc.kind != "op":
            continue
        grads = tuple(input_grads(g.nodes, nc.node))
        out[nc.node] = [
            OpTask(op_signature(nc.node, s.ins, grads, mesh_shape), nc.node, s, grads, nc.requires_grad)
            for s in nc.strategies
        ]
    return out


#: ops timed together, taking turns: each timed call comes after the other ops' calls, as in a step
OPS_PER_ROUND = 32
#: untimed rounds before the timed ones (DTensor's sharding caches and autograd's first-call
#: work). One is enough: over LLaMA tiny's 645 signatures on the 2x2 CPU mesh, prices after one
#: and after two read the same within noise (per-op median ratio 0.995 forward, 1.05 backward;
#: forward plus backward, summed over the ops, within 1%), and the profile took 15% less time
WARM_ROUNDS = 1


#: random values are drawn for at most this many elements of an input; a larger one repeats
#: them (making GPT-2 small's inputs, mostly drawing normal values for its vocabulary-sized
#: tables, took a quarter of its ops phase on the CPU mesh, longer than timing the ops that
#: read them)
RANDOM_NUMEL = 1 << 20


def _random(shape: Sequence[int], dtype: torch.dtype, device: str | torch.device) -> torch.Tensor:
    """A contiguous tensor of normal values (repeating after ``RANDOM_NUMEL`` elements)."""
    numel = math.prod(shape)
    if numel <= RANDOM_NUMEL:
        return torch.randn(shape, dtype=dtype, device=device)
    draw = torch.randn(RANDOM_NUMEL, dtype=dtype, device=device)
    return draw.repeat(-(-numel // RANDOM_NUMEL))[:numel].view(shape)


def _input(v: torch.Tensor, spec, grad: bool, mesh: DeviceMesh) -> DTensor:
    """A DTensor leaf of random values laid out as ``spec``. The leaf itself requires the
    gradient (not its local tensor): backward then ends at it, with no redistribution of the
    gradient into the local tensor's layout that the op itself would not do."""
    shape = local_shape(v.shape, spec, mesh.shape)
    if v.is_floating_point():
        local = _random(shape, v.dtype, mesh.device_type)
    elif v.dtype == torch.bool:
        local = torch.ones(shape, dtype=v.dtype, device=mesh.device_type)
    else:  # indices: 0 is valid for every table and class count
        local = torch.zeros(shape, dtype=v.dtype, device=mesh.device_type)
    t = DTensor.from_local(local, mesh, spec, run_check=False, shape=v.shape, stride=v.stride())
    return t.requires_grad_(grad and v.is_floating_point())


def _op_call(task: OpTask, mesh: DeviceMesh) -> tuple[Callable[[], object], list[DTensor]]:
    """The op called as the emitted module calls it, and its inputs that take a gradient."""
    node, s = task.node, task.strategy
    it = iter(zip(s.ins, task.grads))
    leaves: list[DTensor] = []

    def make(a: fx.Node) -> object:
        if not is_tensor_node(a):
            return a.meta.get("val")
        spec, grad = next(it)
        t = _input(a.meta["val"], spec, grad, mesh)
        if t.requires_grad:
            leaves.append(t)
        return t

    args, kwargs = fx.node.map_arg((node.args, node.kwargs), make)
    # an op that makes a tensor (arange, to) on the device the model was traced on (often meta)
    # makes it on the mesh's device instead
    here = torch.device(mesh.device_type)
    args, kwargs = fx.node.map_aggregate((args, kwargs), lambda a: here if isinstance(a, torch.device) else a)
    if runs_locally(node):
        return (lambda: local_call(node.target, short(s.out), *args, **kwargs)), leaves
    return (lambda: node.target(*args, **kwargs)), leaves


def _backward(leaves: list[DTensor]) -> Callable[[object], None]:
    """The backward of an op's output to the inputs' gradients, returned as the op's backward
    makes them (nothing accumulated into the inputs, which could redistribute). The output
    gradients are made by the first call (the warm-up) and reused: making them costs more
    than the backward of a small op, and in a training step the op before makes them."""
    grads: list[torch.Tensor] = []

    def run(out: object) -> None:
        outs = [out] if isinstance(out, torch.Tensor) else [t for t in out if isinstance(t, torch.Tensor)]
        outs = [t for t in outs if t.requires_grad]
        if not grads:
            grads.extend(_grad_like(t) for t in outs)
        torch.autograd.grad(outs, leaves, grads, allow_unused=True)

    return run


def _grad_like(t: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, DTensor):
        return _random(t.shape, t.dtype, t.device)
    placements = [Replicate() if p.is_partial() else p for p in t.placements]
    shape = local_shape(t.shape, tuple(placements), t.device_mesh.shape)
    local = _random(shape, t.dtype, t.to_local().device)
    return DTensor.from_local(local, t.device_mesh, placements, run_check=False)


def profile_ops(
    tasks: list[OpTask],
    mesh: DeviceMesh,
    repeats: int = 3,
    progress: Callable[[str], None] | None = None,
    speed: HostSpeed | None = None,
) -> dict[str, dict]:
    """Measure each task on every rank of ``mesh``; ``{signature: entry}`` for the database. A
    task the op cannot run (it raises on every rank alike) is left out: it will be estimated.
    ``speed`` (if given) is sampled before each batch of ops.

    Ops are timed ``OPS_PER_ROUND`` at a time, taking turns: ``WARM_ROUNDS`` untimed rounds,
    then up to ``repeats`` timed ones, each a forward and its backward in one call, timed
    apart (``Clock.phases``), as a step runs them. In a step an op runs after other ops, its
    code and data gone from the caches; one op called again and again in a loop keeps them
    there and reads low."""
    clock = Clock(torch.device(mesh.device_type), core_share(mesh))
    say = progress or (lambda phase: None)
    call_s = _backward_call_s(clock)
    measured: list[tuple[OpTask, float, float | None]] = []
    for first in range(0, len(tasks), OPS_PER_ROUND):
        say(f"ops {first}/{len(tasks)}")
        if speed is not None:
            speed.sample()
        measured += _time_ops(tasks[first : first + OPS_PER_ROUND], mesh, clock, repeats, call_s)
    flat = [t for _, f, b in measured for t in (f, -1.0 if b is None else b)]
    flat = rank_mean(flat, torch.device(mesh.device_type)) if flat else []
    out = {}
    for k, (task, _, _) in enumerate(measured):
        fwd, bwd = flat[2 * k], flat[2 * k + 1]
        outputs = out_bytes(task.node, task.strategy.out, mesh.shape)
        flops, nbytes, dtype = work(task.node, task.strategy, outputs, mesh.shape)
        out[task.signature] = {
            "forward_s": fwd,
            "backward_s": None if bwd < 0 else bwd,
            "flops": flops,
            "bytes": nbytes,
            "dtype": str(dtype).removeprefix("torch."),
        }
    return out


def _backward_call_s(clock: Clock, calls: int = 51) -> float:
    """The fixed cost of one ``torch.autograd.grad`` call (the engine's setup and teardown),
    over the ranks: the backward phase of a one-element copy. Each op's backward is timed
    as a call of its own, but a step makes one call for all its ops, so this
    is taken off each op's backward."""
    x = torch.zeros(1, device=clock.device, requires_grad=True)
    backward = _backward([x])  # the harness every op's backward is timed through
    backward(x.clone())
    (call_s,) = rank_mean(
        [statistics.median(clock.phases(x.clone, backward)[1] for _ in range(calls))], clock.device
    )
    return max(call_s, 0.0)


def _time_ops(
    tasks: list[OpTask], mesh: DeviceMesh, clock: Clock, repeats: int, call_s: float = 0.0
) -> list[tuple[OpTask, float, float | None]]:
    """(task, forward seconds, backward seconds or None) of the tasks that run, taking turns;
    a backward without ``call_s``, the fixed cost of its own ``torch.autograd.grad`` call. An
    op that communicates inside (vocabulary-parallel cross entropy) is timed by the wall
    clock: its collectives' waiting is part of its cost and takes no CPU time."""
    wall = Clock(clock.device)
    runs = []
    for task in tasks:
        inner = rules.INNER_COLLECTIVES.get(task.node.target)
        timer = wall if inner and inner(task.node, task.strategy, mesh.shape) else clock
        try:
            call, leaves = _op_call(task, mesh)
            backward = _backward(leaves) if task.requires_grad and leaves else None
            warm = [sum(_timed(timer, call, backward)) for _ in range(WARM_ROUNDS)]
        except Exception:  # noqa: BLE001 - an op DTensor cannot run here stays estimated
            continue
        runs.append((task, timer, call, backward, warm[-1]))
    calls = clock.calls([w for *_, w in runs], repeats)
    times: list[list[tuple[float, float]]] = [[] for _ in runs]
    for r in range(max(calls, default=0)):
        for k, (_, timer, call, backward, _) in enumerate(runs):
            if r < calls[k]:
                times[k].append(_timed(timer, call, backward))
    out = []
    for k, (task, _, _, backward, _) in enumerate(runs):
        f = statistics.median(t for t, _ in times[k])
        b = None if backward is None else max(statistics.median(t for _, t in times[k]) - call_s, 0.0)
        out.append((task, f, b))
    return out


def _timed(
    clock: Clock, call: Callable[[], object], backward: Callable[[object], None] | None
) -> tuple[float, float]:
    """Seconds of one forward, and of its backward (0 without one), in one call."""
    if backward is None:
        return clock.elapsed(call), 0.0
    return clock.phases(call, backward)


#: a profile during which the host's speed moved more than this (``HostSpeed.spread``) warns
UNSTEADY_SPREAD = 0.25


@dataclass
class ProfileRun:
    """What one profiling run measured: the database sections, what it took, and how steady
    the host was (``cost.clock.HostSpeed``: the reference workload's median time and spread)."""

    device: str
    sections: dict[str, dict]
    signatures: int
    phases_s: dict[str, float]
    reference_s: float
    speed_spread: float

    def summary(self) -> dict:
        return {
            "device": self.device,
            "signatures": self.signatures,
            "measured": len(self.sections["ops"]),
            "collectives": len(self.sections["collectives"]),
            "seconds": sum(self.phases_s.values()),
            "phases_s": self.phases_s,
            "reference_s": self.reference_s,
            "speed_spread": self.speed_spread,
        }


def profile(
    traced: Traced, mesh: DeviceMesh, *, repeats: int = 3, progress: Callable[[str], None] | None = None
) -> ProfileRun:
    """Everything a plan on ``mesh`` prices, measured on every rank (all call it together)."""
    say = progress or (lambda phase: None)
    phases: dict[str, float] = {}
    t0 = time.perf_counter()
    tasks = op_tasks(traced, mesh.shape)
    phases["signatures_s"] = time.perf_counter() - t0
    say(f"ops 0/{len(tasks)}")
    speed = HostSpeed(torch.device(mesh.device_type))
    ops = profile_ops(tasks, mesh, repeats, progress, speed)
    phases["ops_s"] = time.perf_counter() - t0 - sum(phases.values())
    say("collectives")
    speed.sample()
    sweep = SWEEP_BYTES_GPU if mesh.device_type == "cuda" else SWEEP_BYTES
    collectives = profile_collectives(mesh, sweep, repeats)
    phases["collectives_s"] = time.perf_counter() - t0 - sum(phases.values())
    say("optimizer")
    speed.sample()
    optimizer = profile_optimizer(mesh, SWEEP_BYTES, repeats)
    speed.sample()
    phases["optimizer_s"] = time.perf_counter() - t0 - sum(phases.values())
    sections = {"ops": ops, "collectives": collectives, "optimizer": optimizer}
    return ProfileRun(device_key(mesh.device_type), sections, len(tasks), phases, *speed.summary())


def profile_model(
    model: torch.nn.Module,
    example_kwargs: dict,
    mesh: DeviceMesh,
    db: str,
    *,
    repeats: int = 3,
    mixed_precision: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Measure what plans of ``model`` on ``mesh`` price, on this mesh's devices, and merge it
    into the database at ``db`` (rank 0 writes). Every rank calls it with the same model and
    inputs, which may be on the meta device: the ops are timed on inputs of random values made
    from the graph's shapes, so the weights are never read. Returns :meth:`ProfileRun.summary`
    (tracing included in its phases)."""
    traced, trace_s = _trace(model, example_kwargs, mixed_precision)
    return _profile_traced(traced, trace_s, mesh, db, repeats, progress)


def _trace(model: torch.nn.Module, example_kwargs: dict, mixed_precision: str | None) -> tuple[Traced, float]:
    from autopar.api import param_dtype

    t0 = time.perf_counter()
    traced = trace(model, (), example_kwargs, param_dtype(mixed_precision))
    return traced, time.perf_counter() - t0


def _profile_traced(
    traced: Traced,
    trace_s: float,
    mesh: DeviceMesh,
    db: str,
    repeats: int,
    progress: Callable[[str], None] | None,
) -> dict:
    run = profile(traced, mesh, repeats=repeats, progress=progress)
    run.phases_s = {"trace_s": trace_s, **run.phases_s}
    if dist.get_rank() == 0:
        merge(db, run.device, run.sections)
        if run.speed_spread > UNSTEADY_SPREAD:
            warnings.warn(
                f"this host's speed moved by {run.speed_spread:.0%} while profiling (a fixed workload's "
                "time, 90th percentile over 10th): the measured prices carry noise of that order. "
                "Profile again when the host is quieter for steadier prices.",
                stacklevel=3,
            )
    dist.barrier()
    return run.summary()


def profile_local(
    build: Callable[..., tuple[torch.nn.Module, dict]],
    build_args: tuple,
    mesh_shape: Sequence[int],
    db: str,
    *,
    repeats: int = 3,
    mixed_precision: str | None = None,
    progress: bool = False,
    start_method: str = "spawn",
) -> dict:
    """:func:`profile_model` on a mesh of local CPU processes (gloo). ``build(*build_args)``
    makes the model and its inputs (on the meta device: a profile needs no weights), which
    are built and traced once, before the ranks start (``run_gloo``'s ``prepare``).
    ``start_method``: how ``run_gloo`` starts its launcher (``fork`` only from a process that
    has done nothing but import, as the CLI)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "summary.json")
        try:
            run_gloo(
                _profile_rank,
                (tuple(mesh_shape), db, repeats, progress, str(out)),
                world_size=math.prod(mesh_shape),
                timeout_s=1200,
                prepare=functools.partial(_build_and_trace, build, build_args, mixed_precision),
                start_method=start_method,
            )
        except RuntimeError as exc:
            raise AutoparError(
                f"profiling on {math.prod(mesh_shape)} local processes failed: {exc}"
            ) from None
        return json.loads(out.read_text())


def _build_and_trace(build: Callable, build_args: tuple, mixed_precision: str | None) -> tuple[Traced, float]:
    torch.manual_seed(0)
    model, kwargs = build(*build_args)
    return _trace(model, kwargs, mixed_precision)


def _profile_rank(
    rank: int, prepared: tuple[Traced, float], mesh_shape: tuple, db: str, repeats: int, show: bool, out: str
) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from autopar.progress import Progress

    mesh = init_device_mesh("cpu", mesh_shape)
    bar = Progress() if show and rank == 0 else None
    summary = _profile_traced(*prepared, mesh, db, repeats, bar)
    if bar is not None:
        bar.done()
    if rank == 0:
        Path(out).write_text(json.dumps(summary))
