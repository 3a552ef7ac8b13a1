"""The profiled cost model against reality on this machine's CPU mesh (4 gloo processes, 2x2).

For tiny GPT-2 and LLaMA (zoo, fp32, batch 8, sequence 32), ``--rounds`` times: profile the
model on the mesh (``autopar profile``), plan it under ``auto`` and two pinned strategies
priced from that profile, and run each plan's training step (forward, backward, AdamW;
``bench.measure``) in fresh processes right after. Per strategy it prints the median
prediction, the median measurement, the median of the rounds' errors and each round's error
(raw, and at the profile's host speed), and whether the three rank the same both ways. Then
the fitted alpha-beta line of every layout change on each mesh axis against the times it was
fitted on and against the earlier rounds' sweeps, how many lines of every round's sweep fit
their own times, and a profile of the 12-layer GPT-2 small (real widths, batch 1, sequence
64): its time and how many distinct signatures it measured.

This machine's speed drifts over seconds to minutes (other tenants share its host): the
CPU time of one fixed workload (``cost.clock.reference_s``) runs 20-35% above or below its
median for seconds at a time, and moved by 2x within single runs. So each round measures
right after its own profile, the three plans taking turns, one step each (``bench.measure``),
and both record that workload's time: the profile its median (``autopar profile`` prints it
with its spread), the measurement its median over one sample before each turn of steps. The
``at_speed`` column is each prediction scaled by the ratio of the two (the host's speed
while measuring over its speed while profiling): the error left when the host's drift is
taken out. Over 150 steps of one plan, the reference's time followed the
step's with a correlation of 0.83 (5-step windows), and dividing one by the other halved
their spread (17% to 9%).

Run: python benchmarks/cost_model.py [--models gpt2-124m,llama3-8b] [--steps 10] [--rounds 5]
     [--db PATH] [--skip-gpt2-small]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from autopar import bench
from autopar.cli import _model
from autopar.cost.profiler import profile_local

MESH = (2, 2)
STRATEGIES = ("auto", "dp", "megatron")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="gpt2-124m,llama3-8b")
    ap.add_argument("--steps", type=int, default=10, help="measured training steps per plan")
    ap.add_argument(
        "--rounds", type=int, default=5, help="profile-plan-measure rounds per model (medians kept)"
    )
    ap.add_argument("--db", default="", help="profile database (default: a temporary one)")
    ap.add_argument("--skip-gpt2-small", action="store_true")
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        db = a.db or f"{tmp}/profile.json"
        print(f"step time on a {'x'.join(map(str, MESH))} CPU mesh (gloo), tiny models, batch 8, seq 32")
        print(
            f"{'model':<11} {'strategy':<9} {'predicted_ms':>12} {'measured_ms':>12} {'error':>7} "
            f"{'at_speed':>9}   errors of the {a.rounds} rounds | at the profile's host speed"
        )
        errors: list[float] = []
        corrected: list[float] = []
        sweeps: list[dict] = []  # each round's layout-change sweep, as its profile stored it
        for name in a.models.split(","):
            raw, at_speed = _model_rows(name, db, a.rounds, a.steps, sweeps)
            errors += raw
            corrected += at_speed
        for label, errs in (("", errors), (" at the profile's host speed", corrected)):
            if errs:
                within = sum(abs(e) <= 0.20 for e in errs)
                mean = statistics.fmean(abs(e) for e in errs)
                print(f"rows within 20%{label}: {within} of {len(errs)}; mean absolute error {mean:.1%}")
        _collective_table(sweeps)
    if not a.skip_gpt2_small:
        with tempfile.TemporaryDirectory() as tmp:  # built on meta, as `autopar profile` does
            t0 = time.perf_counter()
            s = profile_local(_model, ("gpt2-124m", 1, 64, "real"), MESH, f"{tmp}/p.json")
            wall_s = time.perf_counter() - t0
        phases = ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in s["phases_s"].items())
        print(
            f"\nGPT-2 small (12 layers, batch 1, seq 64) on 2x2: {s['signatures']} distinct signatures, "
            f"each measured once ({s['measured']} measured), {s['seconds']:.1f} s on rank 0 ({phases}); "
            f"{wall_s:.1f} s in all (starting the 4 processes, importing, building the model)"
        )


def _model_rows(
    name: str, db: str, rounds: int, steps: int, sweeps: list[dict]
) -> tuple[list[float], list[float]]:
    """Profile, plan and measure ``name`` ``rounds`` times; print a row per strategy and return
    the medians of the rounds' errors, raw and at the profile's host speed. Each round
    measures its plans right after their profile, so the two meet the machine in much the
    same state (its speed drifts over seconds to minutes); the plans take turns, one step
    each (``bench.measure``), so they meet the same speeds."""
    args = (name, 8, 32, "tiny", "cpu")
    model, kwargs = _model(*args)
    per_round, summaries = [], []
    for _ in range(rounds):
        summaries.append(profile_local(_model, args[:4], MESH, db))  # on meta, as `autopar profile`
        sweeps.append(next(iter(json.loads(Path(db).read_text())["devices"].values()))["collectives"])
        rows = bench.compare(model, kwargs, MESH, STRATEGIES, gpu="cpu", profile=db)
        bench.measure(rows, _model, args, steps=steps)
        per_round.append(rows)
    errors, corrected, medians = [], [], []
    for k, strategy in enumerate(STRATEGIES):
        rows = [r[k] for r in per_round]
        failed = next((r.problem for r in rows if r.measured_s is None), None)
        if failed:
            print(f"{name:<11} {strategy:<9} {'':>12} {'':>12}   {failed}")
            continue
        errs = [r.step_s / r.measured_s - 1 for r in rows]
        at_speed = [
            r.step_s * r.measured_reference_s / s["reference_s"] / r.measured_s - 1
            for r, s in zip(rows, summaries)
        ]
        predicted = statistics.median(r.step_s for r in rows)
        measured = statistics.median(r.measured_s for r in rows)
        medians.append((strategy, predicted, measured))
        errors.append(statistics.median(errs))
        corrected.append(statistics.median(at_speed))
        print(
            f"{name:<11} {strategy:<9} {predicted * 1e3:12.1f} {measured * 1e3:12.1f} {errors[-1]:+7.1%} "
            f"{corrected[-1]:+9.1%}   " + " ".join(f"{e:+.0%}" for e in errs)
            + " | " + " ".join(f"{e:+.0%}" for e in at_speed)
        )  # fmt: skip
    by_prediction = [s for s, *_ in sorted(medians, key=lambda m: m[1])]
    by_measurement = [s for s, *_ in sorted(medians, key=lambda m: m[2])]
    measured_rounds = [rs for rs in per_round if all(r.measured_s is not None for r in rs)]
    agree = sum(_ranking(rs, "step_s") == _ranking(rs, "measured_s") for rs in measured_rounds)
    verdict = "same" if by_prediction == by_measurement else "DIFFERENT"
    print(
        f"{name:<11} ranking of the medians by prediction {' < '.join(by_prediction)}; by measurement "
        f"{' < '.join(by_measurement)} ({verdict}); the same in {agree} of {len(measured_rounds)} rounds"
    )
    speeds = [
        f"{s['reference_s'] * 1e3:.2f}±{s['speed_spread']:.0%} / "
        + " ".join(f"{r.measured_reference_s * 1e3:.2f}" for r in rs if r.measured_reference_s)
        for s, rs in zip(summaries, per_round)
    ]
    print(
        f"{name:<11} profiled {summaries[0]['signatures']} signatures in "
        + ", ".join(f"{s['seconds']:.1f}" for s in summaries)
        + " s; reference ms in each profile (median±spread) / while measuring each plan: "
        + ", ".join(speeds)
    )
    return errors, corrected


def _ranking(rows: list, key: str) -> list[str]:
    return [r.strategy for r in sorted(rows, key=lambda r: getattr(r, key))]


def _collective_table(sweeps: list[dict]) -> None:
    """The last sweep's fitted lines against the times they were fitted on, how many lines of
    each sweep fit their own times, then the last sweep's lines against every earlier sweep's
    times (other launches, seconds to minutes apart): how far a fitted price is from a
    collective measured at another moment."""
    if not sweeps:
        return
    last, others = sweeps[-1], sweeps[:-1]
    print(
        "\nlayout changes: fitted alpha + beta * bytes against the measured sweep "
        "(each size: the mean of the middle half of its calls)"
    )
    print(f"{'axis/kind':<22} {'alpha_ms':>9} {'GB/s':>7}  error per size (4 KiB .. 4 MiB)")
    worst_errors, other_worst = [], []
    for key, fit in sorted(last.items()):
        alpha, beta = fit["alpha_s"], fit["s_per_byte"]
        errs = _errors(alpha, beta, fit)
        bw = f"{1 / beta / 1e9:7.2f}" if beta > 0 else "    inf"
        worst = max(abs(e) for e in errs)
        worst_errors.append(worst)
        for other in others:
            other_worst.append(max(abs(e) for e in _errors(alpha, beta, other[key])))
        print(
            f"{key.split('/', 1)[1]:<22} {alpha * 1e3:9.3f} {bw}  "
            + " ".join(f"{e:+5.0%}" for e in errs)
            + f"   worst {worst:.0%}"
        )
    within = sum(w <= 0.15 for w in worst_errors)
    print(f"lines within 15% at every size: {within} of {len(worst_errors)}")
    own = [sum(_worst(fit) <= 0.15 for fit in sweep.values()) for sweep in sweeps]
    print(
        f"each of the {len(sweeps)} sweeps' lines against their own times: "
        + " ".join(map(str, own))
        + f" of {len(worst_errors)} within 15% at every size (mean {statistics.fmean(own):.1f})"
    )
    if others:
        per_sweep = sum(w <= 0.15 for w in other_worst) / len(others)
        print(
            f"against the {len(others)} earlier sweeps: {per_sweep:.1f} of {len(worst_errors)} lines "
            f"within 15% at every size on average (median worst error {statistics.median(other_worst):.0%})"
        )


def _worst(fit: dict) -> float:
    return max(abs(e) for e in _errors(fit["alpha_s"], fit["s_per_byte"], fit))


def _errors(alpha: float, beta: float, sweep: dict) -> list[float]:
    return [(alpha + beta * x) / t - 1 for x, t in zip(sweep["sizes_bytes"], sweep["times_s"])]


if __name__ == "__main__":
    main()
