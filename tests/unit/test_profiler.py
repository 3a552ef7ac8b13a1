"""What the profiler's clock counts: the op, not the harness around it."""

from __future__ import annotations

import time
import types
import warnings

import pytest
import torch
import torch.distributed as dist

from autopar.cost import clock, comm, profile_db, profiler, sweeps


def test_backward_is_timed_without_making_the_output_gradients(monkeypatch):
    made = []
    real = profiler._grad_like
    monkeypatch.setattr(profiler, "_grad_like", lambda t: made.append(t.shape) or real(t))
    x = torch.randn(4, 8, requires_grad=True)
    backward = profiler._backward([x])
    for _ in range(5):  # the warm-up call and the timed ones
        backward((x * 2).sum(dim=0))
    assert made == [torch.Size([8])]  # made once, by the first call


def test_collectives_average_the_middle_half_of_their_calls():
    # one call descheduled (100) and one unusually fast (0) do not move the average
    assert clock.interquartile_mean([0.0, 2.0, 3.0, 100.0]) == 2.5
    assert clock.interquartile_mean([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 80.0]) == 4.5
    assert clock.interquartile_mean([5.0, 1.0]) == 3.0  # too few to trim


def test_ops_take_turns_and_an_op_that_cannot_run_is_left_out(monkeypatch):
    calls: list[str] = []

    def op_call(task, mesh):
        if task == "broken":
            raise RuntimeError("no kernel")
        return (lambda: calls.append(task)), ["leaf"]

    monkeypatch.setattr(profiler, "_op_call", op_call)
    monkeypatch.setattr(profiler, "_backward", lambda leaves: lambda out: calls.append("bwd"))
    monkeypatch.setattr(clock, "slowest", lambda values, device: values)
    tasks = [_Task("a"), _Task("broken"), _Task("b")]
    out = profiler._time_ops(tasks, None, clock.Clock(torch.device("cpu")), repeats=2)
    assert [t for t, *_ in out] == [tasks[0], tasks[2]]
    warm = ["a", "bwd"] * profiler.WARM_ROUNDS + ["b", "bwd"] * profiler.WARM_ROUNDS
    one_round = ["a", "bwd", "b", "bwd"]  # a forward and its backward in one call; then the next op
    assert calls == warm + one_round * 2


class _Task(str):
    requires_grad = True
    node = types.SimpleNamespace(target="an op with no inner collectives")


def test_a_cpu_clock_counts_cpu_time_over_the_core_share(monkeypatch):
    ticks = iter(range(100))
    monkeypatch.setattr(clock.time, "thread_time", lambda: float(next(ticks)))
    cpu_clock = clock.Clock(torch.device("cpu"), core_share=0.5)
    assert cpu_clock.elapsed(lambda: None) == 2.0  # one second of CPU, half a core each


def test_an_ops_backward_is_priced_without_its_own_backward_call(monkeypatch):
    monkeypatch.setattr(profiler, "_op_call", lambda task, mesh: ((lambda: None), ["leaf"]))
    monkeypatch.setattr(profiler, "_backward", lambda leaves: lambda out: None)

    class FixedClock:  # forward 1 s, backward 4 s, on every rank
        device = torch.device("cpu")

        def phases(self, first, then):
            return 1.0, 4.0

        def calls(self, warm_s, repeats):
            return [repeats] * len(warm_s)

    ((_, forward_s, backward_s),) = profiler._time_ops([_Task("a")], None, FixedClock(), 3, call_s=1.5)
    assert (forward_s, backward_s) == (1.0, 2.5)
    ((_, _, backward_s),) = profiler._time_ops([_Task("a")], None, FixedClock(), 3, call_s=9.0)
    assert backward_s == 0.0  # never negative


def test_a_clock_times_a_forward_and_its_backward_apart_in_one_call(monkeypatch):
    ticks = iter([0.0, 1.0, 4.0])  # forward from 0 to 1 s, backward from 1 to 4 s
    monkeypatch.setattr(clock.time, "perf_counter", lambda: next(ticks))
    events: list[object] = []
    wall = clock.Clock(torch.device("cpu"))
    assert wall.phases(lambda: events.append("forward") or "out", events.append) == (1.0, 3.0)
    assert events == ["forward", "out"]  # the backward gets the forward's result


def test_a_clock_makes_a_warm_up_call_then_takes_the_median_of_the_timed_ones(monkeypatch):
    monkeypatch.setattr(clock, "slowest", lambda values, device: values)
    # calls of 9, 1, 2 and 5 s (a call reads the clock thrice: before, after, after nothing)
    ticks = iter([0.0, 9.0, 9.0, 10.0, 11.0, 11.0, 20.0, 22.0, 22.0, 30.0, 35.0, 35.0])
    monkeypatch.setattr(clock.time, "perf_counter", lambda: next(ticks))
    events: list[str] = []
    wall = clock.Clock(torch.device("cpu"))
    t = wall(lambda: events.append("call"), repeats=3, enough_s=100.0)
    assert events == ["call"] * 4  # the warm-up call, then 3 timed ones
    assert t == 2.0  # the median of 1, 2 and 5 s; the 9 s warm-up is not counted


def test_busy_computes_for_the_cpu_time_asked():
    t0 = time.thread_time()
    clock.busy(0.01)()
    assert time.thread_time() - t0 >= 0.01


def test_each_sweep_round_times_its_cases_in_its_own_order_the_same_on_every_rank():
    n, rounds = 72, 5  # a 2x2 CPU mesh's sweep: 2 axes, 6 kinds, 6 sizes
    orders = [sweeps.round_order(n, r) for r in range(rounds)]
    assert all(sorted(o) == list(range(n)) for o in orders)  # every case once per round
    assert orders == [sweeps.round_order(n, r) for r in range(rounds)]  # each rank computes the same
    assert len({tuple(o) for o in orders}) == rounds
    # what comes before a case (in sweep order: the previous line's largest size) changes
    before = [{o[o.index(i) - 1] if o.index(i) else None for o in orders} for i in range(n)]
    assert all(len(b) > 1 for b in before)


def test_host_speed_keeps_the_median_and_how_far_the_slow_spells_went(monkeypatch):
    monkeypatch.setattr(clock, "rank_mean", lambda values, device: values)  # one rank
    speed = clock.HostSpeed(torch.device("cpu"))
    speed.samples_s = [0.002] * 10
    assert speed.summary() == (0.002, 0.0)  # a steady host
    speed.samples_s = [0.002] * 5 + [0.004] * 5  # half the profile in a spell at half speed
    assert speed.summary() == (0.003, 1.0)
    speed.samples_s = []
    speed.sample()
    assert speed.samples_s[0] > 0  # the reference workload's CPU time


def test_a_profile_taken_while_the_host_speed_moved_warns(monkeypatch, tmp_path):
    sections = {"ops": {}, "collectives": {}, "optimizer": {}}
    run = profiler.ProfileRun("cpu x", sections, 0, {}, reference_s=0.002, speed_spread=0.4)
    monkeypatch.setattr(profiler, "trace", lambda *args: None)
    monkeypatch.setattr(profiler, "profile", lambda traced, mesh, **kwargs: run)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.warns(UserWarning, match="speed moved by 40% while profiling"):
            summary = profiler.profile_model(torch.nn.Linear(2, 2), {}, None, str(tmp_path / "db.json"))
        assert summary["speed_spread"] == 0.4 and summary["reference_s"] == 0.002
        run.speed_spread = profiler.UNSTEADY_SPREAD  # steady enough: no warning
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            profiler.profile_model(torch.nn.Linear(2, 2), {}, None, str(tmp_path / "db.json"))
    finally:
        dist.destroy_process_group()


def test_large_random_inputs_repeat_a_smaller_draw(monkeypatch):
    monkeypatch.setattr(profiler, "RANDOM_NUMEL", 8)
    small = profiler._random((2, 4), torch.bfloat16, "cpu")
    assert small.shape == (2, 4) and small.dtype == torch.bfloat16
    big = profiler._random((5, 7), torch.float32, "cpu")
    assert big.shape == (5, 7) and big.is_contiguous() and big.dtype == torch.float32
    flat = big.flatten()
    assert torch.equal(flat[8:16], flat[:8]) and torch.equal(flat[32:], flat[:3])
    assert flat[:8].unique().numel() == 8  # normal draws, not a constant fill


def test_the_sweep_takes_turns_over_the_cases_and_times_local_steps_by_the_op_clock(monkeypatch):
    # one 2-rank axis on a host with fewer cores than ranks; each call of a case reads a
    # different time, on the ops' clock (CPU time over the core share) or the wall clock; an
    # all-to-all call takes 20 ms, so it gets fewer calls per round than the 1 ms cases
    timed: dict[str, list[tuple[str, float]]] = {}
    sequence: list[str] = []

    class FakeClock(clock.Clock):
        def elapsed(self, fn):
            kind = fn()
            calls = timed.setdefault(kind, [])
            base_s = 20e-3 if kind == "all_to_all" else 1e-3
            calls.append(("ops" if self.scale != 1.0 else "wall", base_s * (1 + len(calls) * 7 % 5)))
            sequence.append(kind)
            return calls[-1][1]

    mesh = types.SimpleNamespace(shape=(2,), device_type="cpu")
    monkeypatch.setattr(sweeps, "Clock", FakeClock)
    monkeypatch.setattr(sweeps, "core_share", lambda mesh: 0.5)
    monkeypatch.setattr(sweeps, "busy", lambda cpu_s: lambda: None)
    monkeypatch.setattr(sweeps, "rank_mean", lambda values, device: values)
    monkeypatch.setattr(sweeps, "slowest", lambda values, device: values)
    monkeypatch.setattr(clock, "slowest", lambda values, device: values)
    monkeypatch.setattr(
        sweeps, "_full_mesh", lambda mesh, axis, p, local: types.SimpleNamespace(placements=[p])
    )
    kind_of = {(str(src), str(dst)): kind for kind, (src, dst, _) in sweeps._MOVES.items()}
    monkeypatch.setattr(
        sweeps, "_redistribute", lambda x, to: lambda: kind_of[(str(x.placements[0]), str(to[0]))]
    )
    out = sweeps.profile_collectives(mesh, sizes_bytes=[4096], repeats=2, rounds=3)
    assert {k for k, calls in timed.items() if calls[0][0] == "ops"} == set(comm.LOCAL_KINDS)
    # every call comes after a call of another case, as in a step
    assert all(a != b for a, b in zip(sequence, sequence[1:]))
    for kind, ((_, warm_s), *calls) in timed.items():
        per_round = min(2 * sweeps.COLLECTIVE_CALLS_PER_REPEAT, int(2 * clock.ENOUGH_S / warm_s))
        assert per_round == (2 if kind == "all_to_all" else 4)
        assert len(calls) == 3 * per_round  # one warm-up call, then the rounds' turns
        assert out[f"2/axis0/{kind}"]["times_s"] == [clock.interquartile_mean([t for _, t in calls])]


@pytest.mark.parametrize("cured", [False, True], ids=["stays", "cured"])
def test_a_size_that_strays_from_its_line_is_measured_again_taking_turns(monkeypatch, cured):
    # one 2-rank axis, the CPU sweep's sizes; every case's calls read the same time, on a line
    # of the local rows, except the middle all-gather's, which reads 1.4x that; "cured": only
    # in the sweep's own rounds, 0.6x after them, so its first recheck puts it on the line
    stray_case = ("all_gather", 256)
    rounds, repeats = 3, 2
    assert rounds == sweeps.RECHECK_ROUNDS  # as many calls at 1.4x as at 0.6x: the mean 1.0x
    sequence: list[tuple[str, int]] = []

    def exact(case: tuple[str, int]) -> float:
        return 1e-3 + case[1] * 1e-6

    def seconds(case: tuple[str, int]) -> float:  # in the sweep's rounds
        return exact(case) * (1.4 if case == stray_case else 1.0)

    def per_round(c: tuple[str, int]) -> int:
        per = sweeps.COLLECTIVE_CALLS_PER_REPEAT
        return max(1, min(per * repeats, int(per * clock.ENOUGH_S / seconds(c))))

    class FakeClock(clock.Clock):
        def elapsed(self, fn):
            sequence.append(fn())
            case = sequence[-1]
            later = sequence.count(case) > 1 + rounds * per_round(case)  # past the warm-up and rounds
            return exact(case) * 0.6 if cured and later and case == stray_case else seconds(case)

    mesh = types.SimpleNamespace(shape=(2,), device_type="cpu")
    monkeypatch.setattr(sweeps, "Clock", FakeClock)
    monkeypatch.setattr(sweeps, "core_share", lambda mesh: None)
    monkeypatch.setattr(sweeps, "rank_mean", lambda values, device: values)
    monkeypatch.setattr(sweeps, "slowest", lambda values, device: values)
    monkeypatch.setattr(clock, "slowest", lambda values, device: values)
    monkeypatch.setattr(
        sweeps,
        "_full_mesh",
        lambda mesh, axis, p, local: types.SimpleNamespace(placements=[p], rows=local[0]),
    )
    kind_of = {(str(src), str(dst)): kind for kind, (src, dst, _) in sweeps._MOVES.items()}
    monkeypatch.setattr(
        sweeps, "_redistribute", lambda x, to: lambda: (kind_of[(str(x.placements[0]), str(to[0]))], x.rows)
    )
    out = sweeps.profile_collectives(mesh, repeats=repeats, rounds=rounds)
    assert stray_case in sequence
    # which cases stray more than RECHECK_ABOVE from their line, by their (fixed) times
    strays = set()
    for kind in sweeps._MOVES:
        cases = sorted({c for c in sequence if c[0] == kind}, key=lambda c: c[1])
        times = [seconds(c) for c in cases]
        alpha, beta = profile_db.fit_alpha_beta([c[1] for c in cases], times)
        strays |= {
            c for c, t in zip(cases, times) if abs((alpha + beta * c[1]) / t - 1) > sweeps.RECHECK_ABOVE
        }
    assert stray_case in strays and {c[0] for c in strays} == {"all_gather"}  # the other lines are exact
    calls = {c: sequence.count(c) - 1 for c in set(sequence)}  # less the warm-up call
    # each recheck measures the strays and as many others (RECHECK_CASES in all at least); if
    # their times never move, every recheck finds them again, up to RECHECK_PASSES; once the
    # line is exact, none does
    passes = 1 if cured else sweeps.RECHECK_PASSES
    rechecks = {
        c: divmod(n - rounds * per_round(c), sweeps.RECHECK_ROUNDS * per_round(c)) for c, n in calls.items()
    }
    assert all(extra == 0 for _, extra in rechecks.values())
    assert all(rechecks[c][0] == passes for c in strays)
    fillers = sum(k for c, (k, _) in rechecks.items() if c not in strays)
    assert fillers == passes * (max(2 * len(strays), sweeps.RECHECK_CASES) - len(strays))
    assert all(a != b for a, b in zip(sequence, sequence[1:]))  # no call after its own case's
    line = out["2/axis0/all_gather"]
    measured = exact if cured else seconds
    assert line["times_s"] == pytest.approx(sorted(measured(c) for c in calls if c[0] == "all_gather"))


def test_a_mesh_with_no_axis_over_one_device_has_no_layout_changes_to_sweep(monkeypatch):
    monkeypatch.setattr(sweeps, "core_share", lambda mesh: None)
    monkeypatch.setattr(sweeps, "rank_mean", lambda values, device: values)
    monkeypatch.setattr(sweeps, "slowest", lambda values, device: values)
    monkeypatch.setattr(clock, "slowest", lambda values, device: values)
    mesh = types.SimpleNamespace(shape=(1,), device_type="cpu")
    assert sweeps.profile_collectives(mesh, sizes_bytes=[4096]) == {}
