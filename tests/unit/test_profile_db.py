"""The profile database and the prices read from it (no ranks: synthetic measurements).

The fit recovers known lines; entries of another device or torch version are never read; a
plan priced from a database uses exactly its numbers, says which ops were measured and
which estimated, and estimates the rest by the roofline fitted to the measurements; the
repeated blocks of a deeper model add no signature to measure.
"""

from __future__ import annotations

import json

import pytest
import torch

from autopar import ProfileError, make_plan
from autopar.cli import main
from autopar.cost import profile_db
from autopar.cost.comm import MOVE_KINDS
from autopar.cost.profile_db import device_key, fit_alpha_beta, merge
from autopar.cost.profiler import op_tasks
from autopar.models import GPT, GPTConfig
from autopar.tracer import trace

MESH = (2, 2)
FWD_S, BWD_S, ALPHA_S, OPT_S = 1e-3, 2e-3, 5e-4, 1e-4


def _gpt(layers: int = 2):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab=128, max_seq=16, hidden=32, heads=4, layers=layers)
    ids = torch.randint(0, 128, (4, 16))
    with torch.device("meta"):
        model = GPT(cfg)
    return model, {"input_ids": ids.to("meta"), "labels": ids.to("meta")}


def _synthetic_db(path, skip: set[str] = frozenset()) -> list:
    """Every op signature of the 2-layer GPT at FWD_S / BWD_S (but the ops named in ``skip``),
    every layout change at ALPHA_S flat, the AdamW step at OPT_S per parameter."""
    model, kwargs = _gpt()
    tasks = op_tasks(trace(model, (), kwargs), MESH)
    ops = {
        t.signature: {
            "forward_s": FWD_S,
            "backward_s": BWD_S if t.requires_grad else None,
            "flops": 1.0,
            "bytes": 1.0,
            "dtype": "float32",
        }
        for t in tasks
        if str(t.node.target) not in skip
    }
    line = {"alpha_s": ALPHA_S, "s_per_byte": 0.0, "sizes_bytes": [1], "times_s": [ALPHA_S]}
    collectives = {f"2x2/axis{i}/{k}": line for i in range(2) for k in MOVE_KINDS}
    optimizer = {"2x2": {"alpha_s": OPT_S, "s_per_byte": 0.0, "sizes_bytes": [1], "times_s": [OPT_S]}}
    merge(path, device_key("cpu"), {"ops": ops, "collectives": collectives, "optimizer": optimizer})
    return tasks


def test_fit_recovers_a_line_and_has_the_smallest_worst_relative_error():
    sizes = [1e3, 1e4, 1e5, 1e6]
    alpha, beta = fit_alpha_beta(sizes, [2e-3 + 3e-9 * x for x in sizes])
    assert alpha == pytest.approx(2e-3) and beta == pytest.approx(3e-9)
    # noisy samples over four decades: no line with alpha, beta >= 0 has a smaller worst
    # relative error (a grid around the fit, and the relative least-squares trend)
    times = [(2e-3 + 3e-9 * x) * f for x, f in zip(sizes, (1.1, 0.9, 1.25, 0.95))]

    def worst(a: float, b: float) -> float:
        return max(abs((a + b * x) / t - 1) for x, t in zip(sizes, times))

    alpha, beta = fit_alpha_beta(sizes, times)
    grid = [(alpha * (0.5 + i / 40), beta * (0.5 + j / 40)) for i in range(41) for j in range(41)]
    assert worst(alpha, beta) <= min(worst(a, b) for a, b in grid) + 1e-12
    assert worst(alpha, beta) < worst(*profile_db._relative_least_squares(sizes, times)) - 0.01
    # two sizes, the larger faster: never a negative slope; the flat line halfway in relative terms
    flat, slope = fit_alpha_beta([1.0, 2.0], [5.0, 4.0])
    assert slope == 0.0 and flat == pytest.approx(40 / 9)


def test_merge_adds_and_replaces_entries(tmp_path):
    db = tmp_path / "p.json"
    merge(db, "dev | torch 1", {"ops": {"a": {"forward_s": 1.0}}})
    merge(db, "dev | torch 1", {"ops": {"b": {"forward_s": 2.0}, "a": {"forward_s": 3.0}}})
    merge(db, "other | torch 1", {"ops": {"c": {"forward_s": 4.0}}})
    data = json.loads(db.read_text())
    assert data["devices"]["dev | torch 1"]["ops"] == {"a": {"forward_s": 3.0}, "b": {"forward_s": 2.0}}
    assert list(data["devices"]["other | torch 1"]["ops"]) == ["c"]


def test_another_device_or_torch_is_never_read(tmp_path):
    db = tmp_path / "p.json"
    merge(db, f"NVIDIA H100 80GB HBM3 | torch {torch.__version__}", {"ops": {}})
    merge(db, "NVIDIA A100-SXM4-80GB | torch 0.0.1", {"ops": {}})
    assert profile_db.load(db, "h100").key.startswith("NVIDIA H100")
    with pytest.raises(ProfileError, match="A100-SXM4-80GB | torch 0.0.1"):
        profile_db.load(db, "a100")  # measured, but with another torch
    with pytest.raises(ProfileError, match="no measurements for it"):
        profile_db.load(db, "cpu")
    with pytest.raises(ProfileError, match="autopar profile"):
        profile_db.load(tmp_path / "missing.json", "cpu")
    (tmp_path / "bad.json").write_text('{"format": 99}')
    with pytest.raises(ProfileError, match="not an autopar profile database"):
        profile_db.load(tmp_path / "bad.json", "cpu")


def test_repeated_blocks_add_no_signatures():
    shallow, deep = _gpt(2), _gpt(6)
    n2 = len(op_tasks(trace(shallow[0], (), shallow[1]), MESH))
    n6 = len(op_tasks(trace(deep[0], (), deep[1]), MESH))
    assert n2 == n6 > 0


def test_a_model_traced_on_meta_has_the_signatures_measured_on_a_device():
    meta = _gpt()
    torch.manual_seed(0)
    real = GPT(GPTConfig(vocab=128, max_seq=16, hidden=32, heads=4, layers=2))
    ids = torch.randint(0, 128, (4, 16))
    sigs = [
        {t.signature for t in op_tasks(trace(m, (), kw), MESH)}
        for m, kw in (meta, (real, {"input_ids": ids, "labels": ids}))
    ]
    assert sigs[0] == sigs[1]


def test_a_plan_priced_from_the_database_uses_its_numbers(tmp_path):
    db = tmp_path / "p.json"
    _synthetic_db(db)
    model, kwargs = _gpt()
    plan = make_plan(model, (), MESH, example_kwargs=kwargs, gpu="cpu", profile=str(db))
    ops = [n for n in plan.nodes if n.kind == "op"]
    assert plan.costs["measured_ops"] == len(ops) and plan.costs["estimated_ops"] == []
    assert f"{len(ops)} ops measured, 0 estimated" in plan.report()
    assert plan.costs["device"] == device_key("cpu") and plan.costs["optimizer_measured"]
    assert plan.costs["collectives_measured"] == {"axis0": list(MOVE_KINDS), "axis1": list(MOVE_KINDS)}
    for n in ops:
        assert n.compute_s in (pytest.approx(FWD_S), pytest.approx(FWD_S + BWD_S)), n
    for n in plan.nodes:
        if n.kind == "param":
            assert n.compute_s == pytest.approx(OPT_S)
        # every step of a layout change costs ALPHA_S: a node's comm time is a multiple of it
        assert n.comm_s / ALPHA_S == pytest.approx(round(n.comm_s / ALPHA_S)), n
    table = make_plan(model, (), MESH, example_kwargs=kwargs, gpu="cpu")
    assert table.costs == {"source": "hardware table (cpu)", "fused_chains": 0}


def test_unmeasured_ops_are_estimated_and_listed(tmp_path):
    db = tmp_path / "p.json"
    _synthetic_db(db, skip={"aten.layer_norm.default"})
    model, kwargs = _gpt()
    plan = make_plan(model, (), MESH, example_kwargs=kwargs, gpu="cpu", profile=str(db))
    norms = [n for n in plan.nodes if n.op == "aten.layer_norm.default"]
    assert sorted(plan.costs["estimated_ops"]) == sorted(n.name for n in norms) and norms
    assert f"{len(norms)} estimated ({norms[0].name}" in plan.report()
    # every measured forward is FWD_S whatever its roofline: the fit is overhead FWD_S, no slope,
    # so an estimated op costs FWD_S forward and twice that backward
    for n in norms:
        assert n.compute_s == pytest.approx(3 * FWD_S)


def test_cli_plans_with_a_profile_and_refuses_a_missing_one(tmp_path, capsys):
    db = tmp_path / "p.json"
    _synthetic_db(db)
    args = ["plan", "tests.unit.test_profile_db:factory", "--mesh", "2x2", "--gpu", "cpu", "--batch", "4"]
    assert main([*args, "--profile", str(db), "-o", str(tmp_path / "plan.json")]) == 0
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["costs"]["measured_ops"] > 0
    assert main([*args, "--profile", str(tmp_path / "none.json")]) == 2
    assert "no profile database" in capsys.readouterr().err


def factory(batch: int, seq: int):
    """The synthetic database's GPT for ``autopar plan`` (real tensors: the CLI builds on meta)."""
    del batch, seq
    model, kwargs = _gpt()
    return model, kwargs
