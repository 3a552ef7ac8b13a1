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
    meshes = ((8,), (2, 4))
    all_rows = bench.compare(model, inputs, meshes, (*PINNED, "auto"), gpu="h100")  # one trace
    for mesh in meshes:
        rows = {r.strategy: r for r in all_rows if r.mesh == mesh}
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


def test_plans_measured_together_fit_in_the_memory_share():
    share = int(bench.MEASURE_MEMORY_SHARE * 1000)  # of 1000 free bytes, over 4 ranks
    # 4 ranks x (100 + 100) fit in the share; a third plan does not, nor one too big alone
    assert bench.groups([share // 8, share // 8, share // 8], 4, 1000) == [[0, 1], [2]]
    assert bench.groups([share, 1, 1], 4, 1000) == [[0], [1, 2]]
    assert bench.groups([0, 0, 0], 4, 1000) == [[0, 1, 2]]
    assert bench.groups([], 4, 1000) == []


def test_plans_take_turns_one_step_each_and_a_failing_plan_leaves_the_turns():
    log: list[str] = []

    def step(name: str, fail_at: int | None = None):
        calls = iter(range(100))

        def run() -> None:
            if next(calls) == fail_at:
                raise RuntimeError(f"{name} broke\nsecond line")
            log.append(name)

        return run

    runs = {0: step("a"), 1: step("b", fail_at=3), 2: step("c")}
    entries: list[dict] = [{}, {}, {}]
    barriers = []
    turns_begun = []  # how many steps had run when each turn began
    times = bench._time_turns(
        runs, 3, entries, lambda: barriers.append(len(log)), lambda: turns_begun.append(len(log))
    )
    turns = bench.WARM_UP_STEPS + 3
    # every turn takes each live plan once, in an order rotated each turn
    expected: list[str] = []
    for turn in range(turns):
        live = "abc" if turn <= 3 else "ac"
        expected += [live[k] for k in bench.turn_order(len(live), turn) if (live[k], turn) != ("b", 3)]
    assert log == expected  # b's fourth call raised: it is in no later turn
    assert sorted(times) == [0, 2] and all(len(t) == 3 and min(t) >= 0 for t in times.values())
    assert entries[1] == {"error": "RuntimeError: b broke"} and entries[0] == entries[2] == {}
    # one barrier before each turn, one after each step (b's failing one too)
    assert len(barriers) == turns + len(log) + 1
    steps_per_turn = [3 if turn < 3 else 2 for turn in range(turns)]  # b's last call logged nothing
    assert turns_begun == [sum(steps_per_turn[:t]) for t in range(turns)]  # outside every step
    assert [sorted(bench.turn_order(3, t)) for t in range(3)] == [[0, 1, 2]] * 3
    assert [bench.turn_order(3, t)[0] for t in range(3)] == [0, 1, 2]
