"""Each op's profiled price against its time inside a running step: the cost model at the op level.

On one device (the GPU when there is one, else this CPU), a world of one process: trace
GPT-2 small (12 layers, real widths; ``--model``), profile its ops as ``autopar profile`` does
(``cost.profiler.profile_ops``: each distinct signature alone, taking turns), then emit the
module of its plan on that device and run its forward node by node (``fx.Interpreter``),
timing each op's call where the step makes it (``--runs`` forwards after a warm-up, the
median kept): on a GPU by CUDA events queued with the step (no synchronization between
ops, as in a step), on the CPU by the wall clock. For every op node of the traced model it
compares the profiled forward time of its signature with that in-step time.

``--rounds`` times over (profile, then time the forward), each side's median over the
rounds kept per op: a shared CPU host runs faster or slower by 20-35% for seconds at a
time, and a profile taking two seconds can land in one such spell whole.

It prints each round's summed error, then for the medians the sum of the forward priced and
measured, how many ops are within 10% and the share of the forward's time they take, the
same for the ops that each take at least 0.5% of it, and the ops furthest off by absolute
time.

Run: python benchmarks/op_level.py [--model gpt2-124m] [--size real] [--batch B] [--seq S]
     [--runs 20] [--rounds 3] [--mixed-precision bf16]
     (defaults: on a GPU batch 8, seq 1024, bf16; on the CPU batch 1, seq 64, fp32)
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.fx as fx
from torch.distributed.device_mesh import init_device_mesh
from torch.utils import _pytree as pytree

from autopar.api import make_plan, param_dtype
from autopar.cli import _model
from autopar.cost.profiler import node_op_tasks, op_tasks, profile_ops
from autopar.passes import apply_plan
from autopar.tracer import trace

WITHIN = 0.10
#: an op "matters" when it takes at least this share of the measured forward
MATTERS = 0.005


def main() -> None:
    ap = argparse.ArgumentParser()
    cuda = torch.cuda.is_available()
    ap.add_argument("--model", default="gpt2-124m", help="a zoo model (default: GPT-2 small)")
    ap.add_argument("--size", default="real", help="the zoo model's size: real or tiny")
    ap.add_argument("--batch", type=int, default=8 if cuda else 1)
    ap.add_argument("--seq", type=int, default=1024 if cuda else 64)
    ap.add_argument("--runs", type=int, default=20, help="timed forwards (the median per op is kept)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of profile and forward (medians kept)")
    ap.add_argument("--mixed-precision", default="bf16" if cuda else "", help="bf16, fp16 or '' (off)")
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    device = "cuda" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        compare(device, a.model, a.size, a.batch, a.seq, a.runs, a.rounds, a.mixed_precision or None)
    finally:
        dist.destroy_process_group()


def compare(
    device: str, model_name: str, size: str, batch: int, seq: int, runs: int, rounds: int,
    mixed_precision: str | None,
) -> None:  # fmt: skip
    mesh = init_device_mesh(device, (1,))
    torch.manual_seed(0)
    model, kwargs = _model(model_name, batch, seq, size, device)
    traced = trace(model, (), kwargs, param_dtype(mixed_precision))
    tasks = node_op_tasks(traced, (1,))
    distinct = op_tasks(traced, (1,))  # on one device every strategy of a node does the same work
    plan = make_plan(
        model, (), (1,), example_kwargs=kwargs, gpu="cpu" if device == "cpu" else "h100",
        mixed_precision=mixed_precision, kernels="eager",
    )  # fmt: skip
    emitted = apply_plan(trace(model, (), kwargs, param_dtype(mixed_precision)).gm, plan, mesh, weights=model)
    priced: dict[str, list[float]] = {}
    measured: dict[str, list[float]] = {}
    for r in range(rounds):
        t0 = time.perf_counter()
        profiled = profile_ops(distinct, mesh)
        profile_s = time.perf_counter() - t0
        in_step = _in_step_s(emitted, kwargs, device, runs)
        for node, node_tasks in tasks.items():
            entry = profiled.get(node_tasks[0].signature)
            if entry is not None and node.name in in_step:
                priced.setdefault(node.name, []).append(entry["forward_s"])
                measured.setdefault(node.name, []).append(in_step[node.name])
        p, m = (sum(v[-1] for v in d.values()) for d in (priced, measured))
        print(
            f"round {r + 1}: {len(profiled)} signatures profiled in {profile_s:.1f} s; forward priced "
            f"{p * 1e3:.2f} ms, measured {m * 1e3:.2f} ms ({p / m - 1:+.1%})"
        )
    nodes = {n.name: n for n in tasks}
    rows = [
        (nodes[name], statistics.median(priced[name]), statistics.median(measured[name]))
        for name in priced
        if len(priced[name]) == rounds
    ]
    total_priced = sum(p for _, p, _ in rows)
    total_s = sum(m for *_, m in rows)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(
        f"\n{model_name} ({size}), batch {batch}, seq {seq}, {mixed_precision or 'fp32'}, on one {name}; "
        f"each op's medians over {rounds} rounds"
    )
    print(
        f"forward, summed over the {len(rows)} of {len(tasks)} op nodes compared: priced "
        f"{total_priced * 1e3:.2f} ms, measured in the step {total_s * 1e3:.2f} ms "
        f"({total_priced / total_s - 1:+.1%})"
    )
    for label, subset in (
        ("all ops", rows),
        (f"ops each taking >= {MATTERS:.1%} of the forward", [r for r in rows if r[2] >= MATTERS * total_s]),
    ):
        ok = [r for r in subset if abs(r[1] / r[2] - 1) <= WITHIN]
        errors = [abs(p / m - 1) for _, p, m in subset]
        print(
            f"{label}: {len(ok)} of {len(subset)} within {WITHIN:.0%}, taking "
            f"{sum(m for *_, m in ok) / total_s:.1%} of the forward; median |error| "
            f"{statistics.median(errors):.1%}"
        )
    print(f"\n{'node':<28} {'op':<34} {'priced_us':>10} {'measured_us':>12} {'error':>7}")
    for node, p, m in sorted(rows, key=lambda r: -abs(r[1] - r[2]))[:15]:
        print(f"{node.name:<28} {str(node.target):<34} {p * 1e6:10.1f} {m * 1e6:12.1f} {p / m - 1:+7.1%}")


def _in_step_s(gm: fx.GraphModule, kwargs: dict, device: str, runs: int) -> dict[str, float]:
    """Each call_function node's median time over ``runs`` forwards of ``gm``, timed in place."""
    flat = pytree.tree_leaves(((), kwargs))
    times: dict[str, list[float]] = {}
    for r in range(runs + 1):  # the first run warms up
        timer = _Timed(gm, device)
        timer.run(*flat)
        if r:
            for name, t in timer.collect().items():
                times.setdefault(name, []).append(t)
    return {name: statistics.median(ts) for name, ts in times.items()}


class _Timed(fx.Interpreter):
    """Runs ``gm`` and times each ``call_function`` node's call (its arguments fetched before)."""

    def __init__(self, gm: fx.GraphModule, device: str) -> None:
        super().__init__(gm)
        self.device = device
        self.marks: dict[str, tuple] = {}
        self._current = ""

    def run_node(self, n: fx.Node) -> object:
        self._current = n.name
        return super().run_node(n)

    def call_function(self, target: Callable, args: tuple, kwargs: dict) -> object:
        if self.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = target(*args, **kwargs)
            end.record()
        else:
            start = time.perf_counter()
            out = target(*args, **kwargs)
            end = time.perf_counter()
        self.marks[self._current] = (start, end)
        return out

    def collect(self) -> dict[str, float]:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return {k: s.elapsed_time(e) / 1e3 for k, (s, e) in self.marks.items()}
        return {k: e - s for k, (s, e) in self.marks.items()}


if __name__ == "__main__":
    main()
