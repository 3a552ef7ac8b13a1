"""Strategies side by side: the classic layouts pinned through the same planner, and ``auto``.

``compare`` traces the model once and plans it under each strategy (``solver.pinned``) on
each mesh shape; a strategy that cannot divide a dimension or fit the budget is a row that
says so, not a crash. Each row: estimated step time, peak memory per device, bytes each
device sends per step, plan time. ``mesh_shapes`` lists the logical meshes a number of
devices can form (the *logical mesh search*: ``autopar bench --devices 16`` plans each and
marks the fastest). ``measure`` runs each plan on local CPU processes (gloo) and times its
training step next to the estimate (``autopar bench --run``). ``autopar bench`` prints the
table, and writes it as JSON or a bar chart.
"""

from __future__ import annotations

import gc
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch.nn as nn

from autopar.api import param_dtype
from autopar.cost import profile_db
from autopar.errors import AutoparError, InfeasibleBudgetError
from autopar.runtime.local_mesh import run_gloo
from autopar.solver.planner import plan_traced
from autopar.tracer import trace

DEFAULT = ("dp", "zero2", "zero3", "megatron", "auto")
#: untimed training steps before the timed ones (caches and autograd's first-call work)
WARM_UP_STEPS = 2


@dataclass
class BenchRow:
    strategy: str
    mesh: tuple[int, ...]
    step_s: float | None = None
    peak_memory_bytes: int | None = None
    comm_bytes: int | None = None
    plan_s: float = 0.0
    #: why the strategy has no plan here ("" when it has one)
    problem: str = ""
    #: the plan itself, as JSON (``measure`` runs it)
    plan_json: str = field(default="", repr=False)
    #: measured seconds per training step on a local CPU mesh (``measure``)
    measured_s: float | None = None
    #: how fast the host ran while it measured: a fixed workload's seconds
    #: (``cost.clock.HostSpeed``), the median of one sample before each turn of steps, over
    #: the ranks: taken as the profile takes its own (``autopar profile`` prints it)
    measured_reference_s: float | None = None


def mesh_shapes(n_devices: int, max_axes: int = 3) -> list[tuple[int, ...]]:
    """Every way to arrange ``n_devices`` as a mesh of up to ``max_axes`` axes of size > 1
    (order matters: the last axes are the innermost, on the fastest links)."""
    out: list[tuple[int, ...]] = [(n_devices,)]

    def grow(prefix: tuple[int, ...], rest: int) -> None:
        for a in range(2, rest):
            if rest % a == 0 and len(prefix) + 2 <= max_axes:
                out.append((*prefix, a, rest // a))
                grow((*prefix, a), rest // a)

    grow((), n_devices)
    return out


def compare(
    model: nn.Module,
    example_kwargs: dict[str, Any],
    mesh_shape: Sequence[int] | Sequence[Sequence[int]],
    strategies: Sequence[str] = DEFAULT,
    *,
    gpu: str = "h100",
    memory_budget: int | str | None = None,
    mixed_precision: str | None = None,
    progress: Callable[[str], None] | None = None,
    profile: str | None = None,
    kernels: str = "auto",
) -> list[BenchRow]:
    """Plan ``model`` under each strategy on ``mesh_shape``, or on each of several mesh shapes
    (no ranks; meta tensors are fine). The model is traced once; ``progress`` hears each row."""
    say = progress or (lambda phase: None)
    if profile:  # a database that cannot price this gpu fails once, not in every row
        profile_db.load(profile, gpu)
    say("tracing")
    traced = trace(model, (), example_kwargs, param_dtype(mixed_precision))
    meshes = [tuple(m) for m in mesh_shape] if isinstance(mesh_shape[0], Sequence) else [tuple(mesh_shape)]
    rows = []
    for mesh in meshes:
        for strategy in strategies:
            say(f"planning {strategy} on {'x'.join(map(str, mesh))}")
            rows.append(_row(traced, mesh, strategy, gpu, memory_budget, mixed_precision, profile, kernels))
    return rows


def _row(
    traced, mesh: tuple[int, ...], strategy: str, gpu: str, memory_budget, mixed_precision, profile, kernels
) -> BenchRow:
    t0 = time.perf_counter()
    try:
        plan = plan_traced(
            traced,
            mesh,
            gpu=gpu,
            memory_budget=memory_budget,
            strategy=strategy,
            mixed_precision=mixed_precision or "",
            profile=profile,
            kernels=kernels,
        )
    except InfeasibleBudgetError as exc:
        return BenchRow(strategy, mesh, plan_s=time.perf_counter() - t0, problem=f"does not fit: {exc}")
    except AutoparError as exc:
        return BenchRow(strategy, mesh, plan_s=time.perf_counter() - t0, problem=str(exc))
    row = BenchRow(strategy, mesh, plan.estimated_step_s, plan.peak_memory_bytes, plan.comm_bytes)
    row.plan_s, row.plan_json = time.perf_counter() - t0, plan.to_json()
    return row


def measure(rows: list[BenchRow], build: Callable, build_args: tuple, steps: int = 3) -> None:
    """Run each row's plan on a local mesh of CPU processes (gloo) and set ``measured_s``: the
    mean wall time of its ``steps`` training steps (forward, backward, AdamW) after
    ``WARM_UP_STEPS`` untimed ones, with Python's garbage collector paused.
    ``build(*build_args)`` makes the model and its inputs on every rank.

    The plans take turns, one step each, in an order rotated from turn to turn, and each step
    is timed from one barrier to the next (``_time_turns``). A shared host's speed drifts by
    20-35% over seconds, so plans measured one after another meet it at different speeds
    and may rank wrongly; in turns they meet the same speeds. (On the 2x2 CPU mesh, LLaMA
    tiny's three plans measured both ways, alternated 4 times in one launch: their steps read
    the same within the host's noise, 297-329 ms in turns against 272-355 ms one plan after
    another for auto; so neither the switching nor the barriers add a cost of that order.)
    Plans whose peak memory (per device, on every rank) would together take more than
    ``MEASURE_MEMORY_SHARE`` of the host's available memory are measured in groups that fit
    (``groups``), one group after another."""
    todo = [r for r in rows if r.plan_json]
    if not todo:
        return
    world = math.prod(todo[0].mesh)
    plan_groups = [
        [todo[k].plan_json for k in g]
        for g in groups([r.peak_memory_bytes or 0 for r in todo], world, _available_bytes())
    ]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "times.json")
        try:
            run_gloo(
                _time_plans,
                (plan_groups, build, build_args, steps, str(out)),
                world_size=world,
                timeout_s=600,
            )
        except RuntimeError as exc:
            raise AutoparError(f"measuring the plans on {world} local processes failed: {exc}") from None
        for r, t in zip(todo, json.loads(out.read_text())):
            r.measured_s = t.get("s")
            r.measured_reference_s = t.get("reference_s")
            if "error" in t:
                r.problem = f"failed when run: {t['error']}"


#: plans measured in turns hold at most this share of the host's available memory together
#: (each plan's peak memory per device, on every rank of the local mesh)
MEASURE_MEMORY_SHARE = 0.5


def groups(peaks_bytes: list[int], world: int, free_bytes: int) -> list[list[int]]:
    """The plans (by index, in order) measured together: consecutive plans whose peak memory
    per device, times the ``world`` local ranks, fits in ``MEASURE_MEMORY_SHARE`` of
    ``free_bytes`` together; a plan that does not fit even alone is a group of its own."""
    out: list[list[int]] = []
    held = 0
    for k, peak in enumerate(peaks_bytes):
        need = peak * world
        if not out or held + need > MEASURE_MEMORY_SHARE * free_bytes:
            out.append([])
            held = 0
        out[-1].append(k)
        held += need
    return out


def _available_bytes() -> int:
    """The host's available memory (its total where the system does not say)."""
    try:
        pages = os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError):  # not every system names it
        pages = os.sysconf("SC_PHYS_PAGES")
    return pages * os.sysconf("SC_PAGE_SIZE")


def turn_order(n: int, turn: int) -> list[int]:
    """The order in which turn ``turn`` takes ``n`` plans: rotated by one each turn, so each
    plan comes first, and after each other, equally often."""
    return [(turn + k) % n for k in range(n)]


def _time_plans(
    rank: int, plan_groups: list[list[str]], build: Callable, build_args: tuple, steps: int, out: str
) -> None:
    """Each group's plans built together, then measured in turns; one entry per plan, in order."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from autopar.api import autoparallelize
    from autopar.cost.clock import HostSpeed
    from autopar.solver.plan import Plan

    results: list[dict] = []
    for texts in plan_groups:
        entries: list[dict] = [{} for _ in texts]
        runs: dict[int, Callable[[], None]] = {}
        for k, text in enumerate(texts):
            plan = Plan.from_json(text)
            torch.manual_seed(0)
            model, inputs = build(*build_args)
            mesh = init_device_mesh("cpu", tuple(plan.mesh_shape))
            try:  # a plan fails alike on every rank (same plan, same code), so each goes on
                runs[k] = _training_step(
                    autoparallelize(model, (), mesh, example_kwargs=inputs, plan=plan), inputs
                )
            except Exception as exc:  # noqa: BLE001 - reported in the table, not a crash
                entries[k]["error"] = _error(exc)
            del model
        gc.collect()  # the previous group's modules go now, not while these are timed
        speed = HostSpeed(torch.device("cpu"))
        times_s = _time_turns(runs, steps, entries, dist.barrier, speed.sample)
        reference_s, _ = speed.summary()
        for k, t in times_s.items():
            entries[k] = {"s": statistics.fmean(t), "reference_s": reference_s}
        results += entries
        del runs
    if rank == 0:
        Path(out).write_text(json.dumps(results))


def _training_step(module: nn.Module, inputs: dict[str, Any]) -> Callable[[], None]:
    import torch

    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)

    def step() -> None:
        _loss(module(**inputs)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _time_turns(
    runs: dict[int, Callable[[], None]],
    steps: int,
    entries: list[dict],
    barrier: Callable[[], object],
    before_turn: Callable[[], object],
) -> dict[int, list[float]]:
    """Seconds of each plan's timed steps: ``WARM_UP_STEPS`` untimed turns, then ``steps``
    timed ones, each plan's step in ``turn_order`` and timed from the barrier before it to
    the one after (a step pays its slowest rank). ``before_turn`` runs before each turn's
    barrier, outside the timed steps. A plan whose step raises (alike on every rank) gets its
    error in ``entries`` and leaves the turns."""
    live = sorted(runs)
    times_s: dict[int, list[float]] = {k: [] for k in live}
    gc.disable()
    try:
        for turn in range(WARM_UP_STEPS + steps):
            before_turn()
            barrier()
            last = time.perf_counter()
            for i in turn_order(len(live), turn):
                k = live[i]
                try:
                    runs[k]()
                except Exception as exc:  # noqa: BLE001 - reported in the table, not a crash
                    entries[k]["error"] = _error(exc)
                barrier()
                now = time.perf_counter()
                if turn >= WARM_UP_STEPS:
                    times_s[k].append(now - last)
                last = now
            failed = [k for k in live if "error" in entries[k]]
            live = [k for k in live if k not in failed]
            for k in failed:
                del times_s[k]
    finally:
        gc.enable()
    return times_s


def _error(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def _loss(out):
    """The loss of a model's output: ``.loss`` (HuggingFace), a (logits, loss) pair, or itself."""
    if hasattr(out, "loss"):
        return out.loss
    return out[1] if isinstance(out, tuple) else out


def table(rows: list[BenchRow]) -> str:
    """One line per row; the fastest row that has a plan is marked."""
    ok = [r for r in rows if not r.problem]
    best = min(ok, key=lambda r: r.step_s) if ok else None
    run = any(r.measured_s is not None for r in rows)
    lines = [
        f"{'mesh':<8} {'strategy':<13} {'step_ms':>10} {'peak_GiB':>9} {'sent_GiB':>9} {'plan_s':>7}"
        + (f" {'measured_ms':>11}" if run else "")
    ]
    for r in rows:
        mesh = "x".join(map(str, r.mesh))
        if r.problem:
            dashes = f"{'-':>10} {'-':>9} {'-':>9}"
            lines.append(f"{mesh:<8} {r.strategy:<13} {dashes} {r.plan_s:7.2f}  {r.problem.splitlines()[0]}")
            continue
        lines.append(
            f"{mesh:<8} {r.strategy:<13} {r.step_s * 1e3:10.3f} {r.peak_memory_bytes / 2**30:9.3f} "
            f"{r.comm_bytes / 2**30:9.3f} {r.plan_s:7.2f}"
            + (f" {r.measured_s * 1e3:11.2f}" if r.measured_s is not None else "")
            + ("  <- fastest" if r is best else "")
        )
    return "\n".join(lines)


def write_json(rows: list[BenchRow], path: str | Path) -> None:
    fields = [{k: v for k, v in asdict(r).items() if k != "plan_json"} for r in rows]
    Path(path).write_text(json.dumps(fields, indent=1))


def plot(rows: list[BenchRow], path: str | Path, title: str) -> None:
    """Bars of step time and peak memory per strategy (matplotlib, written as an image)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r.problem]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    names = [f"{r.strategy}\n{'x'.join(map(str, r.mesh))}" for r in ok]
    a.bar(names, [r.step_s * 1e3 for r in ok], color="tab:blue")
    a.set_ylabel("estimated step (ms)")
    b.bar(names, [r.peak_memory_bytes / 2**30 for r in ok], color="tab:orange")
    b.set_ylabel("peak memory per device (GiB)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
