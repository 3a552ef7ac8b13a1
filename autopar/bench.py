"""Strategies side by side: the classic layouts pinned through the same planner, and ``auto``.

``compare`` traces the model once and plans it under each strategy (``solver.pinned``); a
strategy that cannot divide a dimension or fit the budget is a row that says so, not a crash.
Each row: estimated step time, peak memory per device, bytes each device sends per step,
plan time. ``autopar bench`` prints the table, and writes it as JSON or a bar chart.
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
    step_s: float | None = None
    peak_memory_bytes: int | None = None
    comm_bytes: int | None = None
    plan_s: float = 0.0
    #: why the strategy has no plan here ("" when it has one)
    problem: str = ""


def compare(
    model: nn.Module,
    example_kwargs: dict[str, Any],
    mesh_shape: Sequence[int],
    strategies: Sequence[str] = DEFAULT,
    *,
    gpu: str = "h100",
    memory_budget: int | str | None = None,
    mixed_precision: str | None = None,
) -> list[BenchRow]:
    """Plan ``model`` under each strategy on ``mesh_shape`` (no ranks, meta tensors are fine)."""
    traced = trace(model, (), example_kwargs, param_dtype(mixed_precision))
    rows = []
    for strategy in strategies:
        t0 = time.perf_counter()
        try:
            plan = plan_traced(
                traced,
                tuple(mesh_shape),
                gpu=gpu,
                memory_budget=memory_budget,
                strategy=strategy,
                mixed_precision=mixed_precision or "",
            )
        except InfeasibleBudgetError as exc:
            rows.append(BenchRow(strategy, plan_s=time.perf_counter() - t0, problem=f"does not fit: {exc}"))
            continue
        except AutoparError as exc:
            rows.append(BenchRow(strategy, plan_s=time.perf_counter() - t0, problem=str(exc)))
            continue
        rows.append(
            BenchRow(
                strategy,
                plan.estimated_step_s,
                plan.peak_memory_bytes,
                plan.comm_bytes,
                time.perf_counter() - t0,
            )
        )
    return rows


def table(rows: list[BenchRow]) -> str:
    lines = [f"{'strategy':<13} {'step_ms':>10} {'peak_GiB':>9} {'sent_GiB':>9} {'plan_s':>7}"]
    for r in rows:
        if r.problem:
            lines.append(
                f"{r.strategy:<13} {'-':>10} {'-':>9} {'-':>9} {r.plan_s:7.2f}  {r.problem.splitlines()[0]}"
            )
            continue
        lines.append(
            f"{r.strategy:<13} {r.step_s * 1e3:10.3f} {r.peak_memory_bytes / 2**30:9.3f} "
            f"{r.comm_bytes / 2**30:9.3f} {r.plan_s:7.2f}"
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
    names = [r.strategy for r in ok]
    a.bar(names, [r.step_s * 1e3 for r in ok], color="tab:blue")
    a.set_ylabel("estimated step (ms)")
    b.bar(names, [r.peak_memory_bytes / 2**30 for r in ok], color="tab:orange")
    b.set_ylabel("peak memory per device (GiB)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
