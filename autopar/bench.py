"""Strategies side by side: the classic layouts pinned through the same planner, and ``auto``.

``compare`` traces the model once and plans it under each strategy (``solver.pinned``) on
each mesh shape; a strategy that cannot divide a dimension or fit the budget is a row that
says so, not a crash. Each row: estimated step time, peak memory per device, bytes each
device sends per step, plan time. ``mesh_shapes`` lists the logical meshes a number of
devices can form (the *logical mesh search*: ``autopar bench --devices 16`` plans each and
marks the fastest). ``autopar bench`` prints the table, and writes it as JSON or a bar chart.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn

from autopar.api import param_dtype
from autopar.errors import AutoparError, InfeasibleBudgetError
from autopar.solver.planner import plan_traced
from autopar.tracer import trace

DEFAULT = ("dp", "zero2", "zero3", "megatron", "auto")


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
) -> list[BenchRow]:
    """Plan ``model`` under each strategy on ``mesh_shape``, or on each of several mesh shapes
    (no ranks; meta tensors are fine). The model is traced once."""
    traced = trace(model, (), example_kwargs, param_dtype(mixed_precision))
    meshes = [tuple(m) for m in mesh_shape] if isinstance(mesh_shape[0], Sequence) else [tuple(mesh_shape)]
    return [
        _row(traced, mesh, strategy, gpu, memory_budget, mixed_precision)
        for mesh in meshes
        for strategy in strategies
    ]


def _row(traced, mesh: tuple[int, ...], strategy: str, gpu: str, memory_budget, mixed_precision) -> BenchRow:
    t0 = time.perf_counter()
    try:
        plan = plan_traced(
            traced,
            mesh,
            gpu=gpu,
            memory_budget=memory_budget,
            strategy=strategy,
            mixed_precision=mixed_precision or "",
        )
    except InfeasibleBudgetError as exc:
        return BenchRow(strategy, mesh, plan_s=time.perf_counter() - t0, problem=f"does not fit: {exc}")
    except AutoparError as exc:
        return BenchRow(strategy, mesh, plan_s=time.perf_counter() - t0, problem=str(exc))
    sent = plan.comm_bytes
    return BenchRow(
        strategy, mesh, plan.estimated_step_s, plan.peak_memory_bytes, sent, time.perf_counter() - t0
    )


def table(rows: list[BenchRow]) -> str:
    """One line per row; the fastest row that has a plan is marked."""
    ok = [r for r in rows if not r.problem]
    best = min(ok, key=lambda r: r.step_s) if ok else None
    lines = [f"{'mesh':<8} {'strategy':<13} {'step_ms':>10} {'peak_GiB':>9} {'sent_GiB':>9} {'plan_s':>7}"]
    for r in rows:
        mesh = "x".join(map(str, r.mesh))
        if r.problem:
            dashes = f"{'-':>10} {'-':>9} {'-':>9}"
            lines.append(f"{mesh:<8} {r.strategy:<13} {dashes} {r.plan_s:7.2f}  {r.problem.splitlines()[0]}")
            continue
        lines.append(
            f"{mesh:<8} {r.strategy:<13} {r.step_s * 1e3:10.3f} {r.peak_memory_bytes / 2**30:9.3f} "
            f"{r.comm_bytes / 2**30:9.3f} {r.plan_s:7.2f}" + ("  <- fastest" if r is best else "")
        )
    return "\n".join(lines)


def write_json(rows: list[BenchRow], path: str | Path) -> None:
    Path(path).write_text(json.dumps([asdict(r) for r in rows], indent=1))


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
