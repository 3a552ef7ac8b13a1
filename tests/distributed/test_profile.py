"""``autopar profile`` on a (2, 2) mesh of 4 gloo ranks, and a plan priced from what it measured.

A 2-layer GPT is profiled once (one call per measurement: the numbers' accuracy is a
benchmark, ``benchmarks/cost_model.py``; here the database's contents are checked): every
distinct op signature is measured exactly once, every kind of layout change on both mesh
axes gets a fitted line over the whole size sweep, the AdamW step gets one. A plan priced
from the database prices every op from a measurement, and its emitted module gives the
single-device loss and gradients.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from autopar import autoparallelize
from autopar.cost import profiler
from autopar.cost.clock import core_share, slowest
from autopar.cost.comm import MOVE_KINDS
from autopar.cost.profile_db import device_key
from autopar.cost.profiler import op_tasks, profile_model
from autopar.cost.sweeps import SWEEP_BYTES
from autopar.models import GPT, GPTConfig
from autopar.tracer import trace
from tests.distributed.harness import run_on_mesh

MESH = (2, 2)
TOL = 1e-5


def _gpt(device: str = "cpu"):
    torch.manual_seed(0)
    with torch.device(device):
        cfg = GPTConfig(vocab=128, max_seq=16, hidden=32, heads=4, layers=2, qkv_bias=False)
        ids = torch.randint(0, 128, (4, 16))
        return GPT(cfg), {"input_ids": ids, "labels": torch.randint(0, 128, (4, 16))}


def check_profile(db: str) -> dict:
    model, inputs = _gpt()
    mesh = init_device_mesh("cpu", MESH)
    # profiled as `autopar profile` does it, built on the meta device (no weights)
    summary = profile_model(*_gpt("meta"), mesh, db, repeats=1)
    data = json.loads(Path(db).read_text())
    ref = copy.deepcopy(model)
    pm = autoparallelize(model, (), mesh, example_kwargs=inputs, gpu="cpu", profile=db)
    plan = pm.plan
    (_, loss), (_, ref_loss) = pm(**inputs), ref(**inputs)
    loss.backward()
    ref_loss.backward()
    ref_params = dict(ref.named_parameters())
    grad_err = max((_full(p.grad) - ref_params[n].grad).abs().max().item() for n, p in pm.named_parameters())
    return {
        "summary": summary,
        "core_share": core_share(mesh),
        "kept": _kept_over_ranks(inputs, mesh),
        "made_on": _made_on(mesh),
        "slowest": slowest([float(dist.get_rank())], torch.device("cpu")),
        "db": data,
        "costs": plan.costs,
        "op_nodes": sum(n.kind == "op" for n in plan.nodes),
        "loss_err": abs(_full(loss).item() - ref_loss.item()),
        "grad_err": grad_err,
    }


def _kept_over_ranks(inputs: dict, mesh) -> tuple[float, float]:
    """What ``profile_ops`` keeps of one op when rank r times its forward at r + 1 seconds and
    its backward at 10 * (r + 1)."""
    model, _ = _gpt()
    task = op_tasks(trace(model, (), inputs), MESH)[0]
    r = dist.get_rank() + 1.0
    timed = profiler._time_ops
    profiler._time_ops = lambda tasks, *rest: [(t, r, 10 * r) for t in tasks]
    try:
        (entry,) = profiler.profile_ops([task], mesh).values()
    finally:
        profiler._time_ops = timed
    return entry["forward_s"], entry["backward_s"]


def _made_on(mesh) -> list[str]:
    """Where the profiler's call of each op of a meta-built model that makes a tensor on a
    device of its own (``arange(..., device=meta)``) makes it."""
    model, inputs = _gpt("meta")
    tasks = op_tasks(trace(model, (), inputs), MESH)
    made = [t for t in tasks if any(isinstance(a, torch.device) for a in t.node.kwargs.values())]
    return [str(profiler._op_call(t, mesh)[0]().device) for t in made]


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


@pytest.fixture(scope="module")
def results() -> dict:
    with tempfile.TemporaryDirectory() as tmp:  # every rank reads the database rank 0 writes
        return run_on_mesh(functools.partial(check_profile, f"{tmp}/profile.json"))


def test_each_distinct_signature_is_measured_once(results):
    model, inputs = _gpt()
    tasks = op_tasks(trace(model, (), inputs), MESH)
    ops = results["db"]["devices"][device_key("cpu")]["ops"]
    assert results["summary"]["signatures"] == len(tasks) == len(ops)
    assert set(ops) == {t.signature for t in tasks}
    assert all(e["forward_s"] > 0 for e in ops.values())
    assert all((e["backward_s"] is None) == (not t.requires_grad) for t in tasks for e in [ops[t.signature]])


def test_a_meta_built_model_is_measured_on_the_mesh_device(results):
    """Its ops that make tensors run on the CPU mesh, not on meta (where they would cost nothing)."""
    assert results["made_on"] and set(results["made_on"]) == {"cpu"}


def test_every_layout_change_is_fitted_on_both_axes(results):
    entry = results["db"]["devices"][device_key("cpu")]
    assert set(entry["collectives"]) == {f"2x2/axis{i}/{k}" for i in range(2) for k in MOVE_KINDS}
    for fit in entry["collectives"].values():
        assert len(fit["times_s"]) == len(SWEEP_BYTES) and fit["alpha_s"] >= 0 and fit["s_per_byte"] >= 0
        assert fit["alpha_s"] + fit["s_per_byte"] * max(fit["sizes_bytes"]) > 0
    assert set(entry["optimizer"]) == {"2x2"}


def test_the_profiled_plan_prices_every_op_from_a_measurement(results):
    costs = results["costs"]
    assert costs["device"] == device_key("cpu")
    assert costs["measured_ops"] == results["op_nodes"] and costs["estimated_ops"] == []
    assert costs["collectives_measured"] == {"axis0": list(MOVE_KINDS), "axis1": list(MOVE_KINDS)}


def test_the_profiled_plan_gives_the_single_device_numbers(results):
    assert results["loss_err"] < TOL and results["grad_err"] < TOL, results


def test_ranks_that_outnumber_the_cores_get_a_share_of_one(results):
    cores = len(os.sched_getaffinity(0))  # the 4 ranks all run on this host
    assert results["core_share"] == (cores / 4 if cores < 4 else None)


def test_an_ops_time_is_the_mean_over_the_ranks(results):
    # ranks time 1, 2, 3, 4 s forward and 10, 20, 30, 40 s backward: the slowest would be 4 and 40
    assert list(results["kept"]) == [2.5, 25.0]
    assert results["slowest"] == [3.0]  # what decides how many calls each measurement gets


def test_the_profile_reports_how_fast_and_how_steady_the_host_was(results):
    summary = results["summary"]
    assert summary["reference_s"] > 0 and summary["speed_spread"] >= 0
