"""The sweeps of ``autopar profile``: layout changes and the optimizer over message sizes.

- **layout changes**: each step kind (all-reduce, reduce-scatter, all-gather, all-to-all,
  and the local slice and partial steps) on each mesh axis, through ``runtime.layout.reshard``
  over a sweep of sizes (each the mean of the middle half of many calls: a step pays every
  call); a line ``alpha + beta * bytes`` fitted per axis and kind.
- **optimizer**: an AdamW step over parameters of a sweep of sizes; a line per parameter.

On a CPU, collectives are timed by the wall clock (their cost is mostly waiting, which takes
no CPU time); on a GPU by CUDA events, like everything else there. The local steps and the
optimizer are timed like the ops (``cost.clock``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from autopar.cost.clock import ENOUGH_S, Clock, busy, core_share, interquartile_mean, rank_mean, slowest
from autopar.cost.comm import LOCAL_KINDS, MOVE_KINDS
from autopar.cost.profile_db import fit_alpha_beta, mesh_key
from autopar.runtime.layout import reshard
from autopar.solver.specs import short

#: local bytes per collective call in the sweep (CPU meshes stop lower: gloo is slow)
SWEEP_BYTES = (1 << 12, 1 << 14, 1 << 16, 1 << 18, 1 << 20, 1 << 22)
SWEEP_BYTES_GPU = SWEEP_BYTES + (1 << 24, 1 << 26, 1 << 28)


#: a collective is timed over this many times more calls than an op (they are cheap to time)
COLLECTIVE_CALLS_PER_REPEAT = 2
#: on a CPU host whose ranks outnumber its cores, each timed collective call comes after this
#: much CPU time of compute on every rank, as a step's come after its ops: the ranks then
#: arrive at different moments and find the cores busy, which back-to-back calls never see
#: (on the 2x2 CPU mesh a small all-gather read 1.4 ms back to back, 2.2-2.8 ms after 2-5 ms)
COMPUTE_BEFORE_COLLECTIVE_S = 0.002


#: a size whose time strays more than this from its line's fit is measured over
#: ``RECHECK_ROUNDS`` more rounds, with other cases taking turns (``RECHECK_CASES`` in all at least)
RECHECK_ABOVE = 0.10
RECHECK_ROUNDS = 3
RECHECK_CASES = 8
#: a recheck is made again, against the line refitted, up to this many times in all
RECHECK_PASSES = 5


_MOVES = {  # kind -> (from, to) on the measured axis, and whether B is the gathered size
    "all_reduce": (Partial(), Replicate(), False),
    "reduce_scatter": (Partial(), Shard(0), False),
    "all_gather": (Shard(0), Replicate(), True),
    "all_to_all": (Shard(0), Shard(1), False),
    "slice": (Replicate(), Shard(0), False),
    "local": (Replicate(), Partial(), False),
}


def profile_collectives(
    mesh: DeviceMesh, sizes_bytes: Sequence[int] = SWEEP_BYTES, repeats: int = 3, rounds: int = 5
) -> dict[str, dict]:
    """Fit ``alpha + beta * B`` for every kind of layout change (``cost.comm``: the collectives,
    and the local slice and partial-sum steps, whose cost is the runtime's own) on every mesh
    axis of size > 1, each timed as the emitted module runs it (``runtime.layout.reshard``).

    The cases take turns, one call at a time, as a step's collectives do: each call comes
    after calls of other cases, never after one of its own. The first call of a case after
    calls of others reads well above the ones right after it (on the 2x2 CPU mesh, over 11
    rounds of 5 calls per case: 1.26-1.42x their mean for the collectives, the median over
    the sizes of each kind; 1.04x for the local steps), and in a step every call is such a
    call: one case called again and again reads low. A sweep makes ``rounds`` rounds, each
    up to ``COLLECTIVE_CALLS_PER_REPEAT * repeats`` turns over the cases (a case's calls per
    round: as many as fit in ``COLLECTIVE_CALLS_PER_REPEAT * ENOUGH_S`` by its warm-up call).
    A case's time is the mean of the middle half of all its calls. A mean, because a step
    pays the sum of its collectives' times, not their median; of the middle half, because
    one call's time is spread widely where ranks share cores (on 2 shared cores, from half
    to twice the mean); of all rounds' calls at once, not a median of each round's: on the
    2x2 CPU mesh, in two runs (each case's calls then back to back), lines fitted from 5
    rounds of 6 calls came within 15% of a 10-round reference at every size for 11.1 and 8.0
    of the 12 lines on average that way, 10.2 and 7.3 the other.
    Each round takes the cases in its own order (``round_order``), so a slow spell of the
    machine does not land on the same message size every round, nor does one case always
    follow the same other.

    A size whose time strays more than ``RECHECK_ABOVE`` from its line's fit is measured over
    ``RECHECK_ROUNDS`` more rounds, taking turns with other cases picked at random
    (``_fillers``), and its time is then the mean of the middle half of all its calls; the
    lines are fitted again, and what still strays is measured again, up to ``RECHECK_PASSES``
    rechecks in all. What
    strays is a point's noise, not the line's shape: on the 2x2 CPU mesh, lines fitted to the
    mean of 6 sweeps' points came within 10% of every point, while one sweep's points spread
    by 3-13% (their coefficient of variation over the sweeps); more calls narrow it.

    On a CPU host whose ranks outnumber its cores, each call comes after
    ``COMPUTE_BEFORE_COLLECTIVE_S`` of compute (untimed), as in a step; and the local steps
    are timed as the ops are (``cost.clock``: CPU time over the core share), for they wait on
    no other rank. By the wall clock such a step either ran uninterrupted or waited out other
    ranks' turns: on the 2x2 CPU mesh its mean was 1.27-1.30x the mean of its middle half, its
    90th percentile 2.3-2.8x."""
    per = COLLECTIVE_CALLS_PER_REPEAT
    device = torch.device(mesh.device_type)
    share = core_share(mesh)
    wall, cpu = Clock(device), Clock(device, share)
    before = busy(COMPUTE_BEFORE_COLLECTIVE_S) if share else (lambda: None)
    cases: list[tuple[str, int, Clock, Callable[[], None]]] = []
    for axis, n in enumerate(mesh.shape):
        if n <= 1:
            continue
        for kind in MOVE_KINDS:
            src, dst, gathered = _MOVES[kind]
            for size in sizes_bytes:
                numel = size // (4 * n) if gathered else size // 4
                cols = 16 * n  # both dims divisible by n: every move is even
                n_rows = n * max(1, numel // (cols * n))
                x = _full_mesh(mesh, axis, src, (n_rows, cols))
                placements = list(x.placements)
                placements[axis] = dst
                nbytes = n_rows * cols * 4 * (n if gathered else 1)
                key = f"{mesh_key(mesh.shape)}/axis{axis}/{kind}"
                clock = cpu if kind in LOCAL_KINDS else wall
                cases.append((key, nbytes, clock, _redistribute(x, placements)))
    warm_s = [0.0] * len(cases)
    for i in round_order(len(cases), -1):  # a warm-up call of each case, in an order of its own
        _, _, clock, run = cases[i]
        before()
        warm_s[i] = clock.elapsed(run)
    # the ranks agree on the number of calls, by the slowest rank's warm-up call
    calls = wall.calls(warm_s, per * repeats, enough_s=per * ENOUGH_S)
    calls_s: list[list[float]] = [[] for _ in cases]
    last = _take_turns(cases, calls, list(range(len(cases))), range(rounds), calls_s, before)
    out = _lines(cases, rank_mean([interquartile_mean(c) for c in calls_s], device))
    for recheck in range(RECHECK_PASSES):
        # the ranks agree on the strays (any rank's verdict counts)
        stray = [i for i, s in enumerate(slowest([float(s) for s in _strays(cases, out)], device)) if s]
        if not stray:
            break
        subset = stray + _fillers(stray, calls, random.Random(rounds + recheck))
        first = rounds + recheck * RECHECK_ROUNDS
        last = _take_turns(cases, calls, subset, range(first, first + RECHECK_ROUNDS), calls_s, before, last)
        out = _lines(cases, rank_mean([interquartile_mean(c) for c in calls_s], device))
    return out


def _take_turns(
    cases: list[tuple[str, int, Clock, Callable[[], None]]],
    calls: list[int],
    subset: list[int],
    rounds: range,
    calls_s: list[list[float]],
    before: Callable[[], None],
    last: int | None = None,
) -> int | None:
    """The ``rounds`` (by index) over the cases of ``subset``, each round in its own order,
    each case's ``calls`` per round one turn at a time; every call's seconds onto ``calls_s``.
    No call follows one of its own case: a round does not start with the case called
    ``last``, and no case makes more calls a round than the second most (which would leave
    it alone in the last turns). Returns the case called last."""
    counts = sorted((calls[i] for i in subset), reverse=True)
    most = counts[1] if len(counts) > 1 else sum(counts)
    for r in rounds:
        order = [subset[k] for k in round_order(len(subset), r)]
        if order and order[0] == last:
            order = order[1:] + order[:1]
        for turn in range(most):
            for i in order:
                if turn < calls[i]:
                    _, _, clock, run = cases[i]
                    before()
                    calls_s[i].append(clock.elapsed(run))
                    last = i
    return last


def _fillers(stray: list[int], calls: list[int], rng: random.Random) -> list[int]:
    """The other cases a recheck's strays take turns with: as many as the strays, and
    ``RECHECK_CASES`` in all at least, picked at random among those making as many calls a
    round as any stray (so no stray is left alone in a turn) where there are enough."""
    others = [i for i in range(len(calls)) if i not in stray]
    enough = [i for i in others if calls[i] >= max(calls[j] for j in stray)]
    pool = enough if len(enough) >= len(stray) else others
    return rng.sample(pool, min(len(pool), max(len(stray), RECHECK_CASES - len(stray))))


def _lines(cases: list[tuple[str, int, Clock, Callable[[], None]]], times_s: list[float]) -> dict[str, dict]:
    """Each line's sizes, times and fitted ``alpha_s``, ``s_per_byte``."""
    out: dict[str, dict] = {}
    for (key, nbytes, _, _), t in zip(cases, times_s):
        e = out.setdefault(key, {"sizes_bytes": [], "times_s": []})
        e["sizes_bytes"].append(nbytes)
        e["times_s"].append(t)
    for e in out.values():
        e["alpha_s"], e["s_per_byte"] = fit_alpha_beta(e["sizes_bytes"], e["times_s"])
    return out


def _strays(cases: list[tuple[str, int, Clock, Callable[[], None]]], lines: dict[str, dict]) -> list[bool]:
    """Whether each case's time strays more than ``RECHECK_ABOVE`` from its line's fit."""
    seen: dict[str, int] = {}
    out = []
    for key, nbytes, _, _ in cases:
        k = seen[key] = seen.get(key, -1) + 1  # the case's place in its line
        e = lines[key]
        out.append(abs((e["alpha_s"] + e["s_per_byte"] * nbytes) / e["times_s"][k] - 1) > RECHECK_ABOVE)
    return out


def round_order(n: int, round_index: int) -> list[int]:
    """The order in which round ``round_index`` of a sweep takes its ``n`` cases: a shuffle
    seeded by the round, so every rank makes the same calls in the same order."""
    return random.Random(round_index).sample(range(n), n)


def _full_mesh(mesh: DeviceMesh, axis: int, placement, local: tuple[int, ...]) -> DTensor:
    """A DTensor of random local values of shape ``local``, ``placement`` on ``axis``, replicated
    on the others."""
    placements = [Replicate()] * mesh.ndim
    placements[axis] = placement
    t = torch.randn(local, device=mesh.device_type)
    return DTensor.from_local(t, mesh, placements, run_check=False)


def _redistribute(x: DTensor, placements: list) -> Callable[[], None]:
    spec = short(tuple(placements))

    def run() -> None:
        local = reshard(x, spec).to_local()
        if hasattr(local, "wait"):  # an async collective's result
            local.wait()

    return run


def profile_optimizer(mesh: DeviceMesh, sizes_bytes: Sequence[int] = SWEEP_BYTES, repeats: int = 3) -> dict:
    """An AdamW step per parameter (DTensor parameters, as the emitted module's) against its bytes."""
    clock = Clock(torch.device(mesh.device_type), core_share(mesh))
    per_param, count = [], 8
    for size in sizes_bytes:
        params = [torch.nn.Parameter(_full_mesh(mesh, 0, Replicate(), (size // 4,))) for _ in range(count)]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = torch.optim.AdamW(params, lr=1e-4)
        per_param.append(clock(opt.step, repeats) / count)
    times = rank_mean(per_param, torch.device(mesh.device_type))
    alpha, beta = fit_alpha_beta(list(sizes_bytes), times)
    return {
        mesh_key(mesh.shape): {
            "alpha_s": alpha,
            "s_per_byte": beta,
            "sizes_bytes": list(sizes_bytes),
            "times_s": times,
        }
    }
