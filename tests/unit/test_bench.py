"""Strategies side by side (``autopar.bench``): auto is never slower than a classic layout,
since each is the same ILP with fewer choices; a strategy that cannot divide a dimension or
fit the budget is a row that says so; the CLI writes the table and the chart."""

from __future__ import annotations

import json

import pytest
import torch

from autopar import bench
from autopar.cli import main
from autopar.models import zoo

PINNED = ("dp", "megatron", "megatron-sp", "2d", "zero3")
#: HiGHS stops within a relative gap of 1e-4 of the optimum
GAP = 1e-4


@pytest.mark.parametrize("name", zoo.names())
def test_auto_is_never_slower_than_a_pinned_strategy(name):
    with torch.device("meta"):
        model, inputs = zoo.build(name, "tiny", batch=8, seq=32)
    for mesh in ((8,), (2, 4)):
        rows = {r.strategy: r for r in bench.compare(model, inputs, mesh, (*PINNED, "auto"), gpu="h100")}
        assert not rows["auto"].problem, rows["auto"]
        pinned = [r.step_s for s, r in rows.items() if s != "auto" and not r.problem]
        assert pinned, rows
        assert rows["auto"].step_s <= min(pinned) * (1 + GAP), (mesh, rows)


def test_a_strategy_that_cannot_apply_is_a_row_not_a_crash():
    with torch.device("meta"):
        model, inputs = zoo.build("gpt2-124m", "tiny", batch=6, seq=32)
    rows = bench.compare(model, inputs, (4,), ("dp", "auto"), gpu="h100")
    assert "no valid layout" in rows[0].problem and rows[0].step_s is None  # batch 6 on 4 devices
    assert not rows[1].problem and rows[1].step_s > 0
    small = bench.compare(model, inputs, (2,), ("dp",), gpu="h100", memory_budget=1000)
    assert small[0].problem.startswith("does not fit")
    assert "does not fit" in bench.table(small)


def test_cli_bench_writes_table_and_chart(tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    args = ["bench", "gpt2-124m", "--size", "tiny", "--mesh", "2x2", "--batch", "4", "--seq", "16"]
    assert main([*args, "--strategies", "dp,megatron,auto", "--json", str(out), "--plot", str(png)]) == 0
    rows = json.loads(out.read_text())
    assert [r["strategy"] for r in rows] == ["dp", "megatron", "auto"]
    assert all(r["step_s"] > 0 and r["peak_memory_bytes"] > 0 for r in rows)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "megatron" in capsys.readouterr().out


def test_logical_mesh_search(capsys):
    assert bench.mesh_shapes(8) == [(8,), (2, 4), (2, 2, 2), (4, 2)]
    assert sorted(bench.mesh_shapes(12)) == sorted(
        [(12,), (2, 6), (6, 2), (3, 4), (4, 3), (2, 2, 3), (2, 3, 2), (3, 2, 2)]
    )
    args = ["bench", "gpt2-124m", "--size", "tiny", "--devices", "4", "--batch", "4", "--seq", "16"]
    assert main([*args, "--strategies", "auto"]) == 0
    out = capsys.readouterr().out
    assert all(f"\n{m} " in out for m in ("4", "2x2")) and out.count("<- fastest") == 1


def test_cli_bench_run_measures_each_plan_on_a_local_mesh(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = [
        "bench",
        "gpt2-124m",
        "--size",
        "tiny",
        "--mesh",
        "2x2",
        "--batch",
        "4",
        "--seq",
        "16",
        "--gpu",
        "cpu",
    ]
    assert main([*args, "--strategies", "dp,auto", "--run", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["strategy"] for r in rows] == ["dp", "auto"] and all(r["measured_s"] > 0 for r in rows)
    assert all(r["measured_reference_s"] > 0 for r in rows)  # how fast the host ran while measuring
    assert "measured_ms" in capsys.readouterr().out
    assert (
        main(["bench", "gpt2-124m", "--mesh", "2x2", "--run"]) == 2
    )  # a real-size model on every rank: refused
