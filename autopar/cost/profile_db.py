"""The profile database: op and collective times measured on a device, and the prices read from it.

``autopar profile`` (``cost.profiler``) measures; this module stores, merges and reads. The
file is JSON, keyed first by the *device key* (device name and torch version: another GPU or
another torch is another key, so a stale entry is never read for the wrong machine)::

    {"format": 6,
     "devices": {"<device> | torch <version>": {
        "ops": {"<signature>": {"forward_s", "backward_s" (null: no gradient), "flops", "bytes",
                                "dtype"}},
        "collectives": {"<mesh>/axis<i>/<kind>": {"alpha_s", "s_per_byte", "sizes_bytes",
                                                  "times_s"}},
        "optimizer": {"<mesh>": {"alpha_s", "s_per_byte", "sizes_bytes", "times_s"}}}}}

An op's *signature* (:func:`op_signature`) is what its time depends on: the op, its
arguments with each tensor input's local shape under the layout (the work one device does),
dtype and whether it needs a gradient, and the mesh. Identical blocks of a model have identical signatures,
so they are measured once.

A collective is priced ``alpha_s + s_per_byte * B`` on its mesh axis (``B`` as in
``cost.comm``: the bytes of the local tensor at that step), fitted per axis and kind to the
measured sweep (:func:`fit_alpha_beta`: the line of the smallest worst relative error).
What was not measured is estimated: an op by its roofline (``cost.compute``) through
``t = overhead_s + roofline_s / efficiency``, both fitted on this device's measured ops
(:meth:`Profile.fallback`); a collective of a kind or mesh not measured keeps the hardware
table's alpha-beta link.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx as fx

from autopar.cost.comm import MOVE_KINDS
from autopar.cost.compute import roofline_s
from autopar.cost.hardware import Hardware, Link
from autopar.errors import ProfileError
from autopar.solver.specs import Spec, local_shape

#: 2: ops run, and are timed, on local shards (format 1 timed most through DTensor's dispatcher);
#: 3: ops take turns when timed, and on a CPU host with more ranks than cores count CPU time;
#: 4: each time is the mean over the ranks (format 3 kept the slowest rank's, which over-priced);
#: 5: a GPU time is its kernels' time by CUDA events (format 4 read the wall clock around a
#: synchronize, launch and sync latency included);
#: 6: on a CPU host with more ranks than cores, the local layout steps count CPU time as the
#: ops do (format 5 read their wall time, mostly of calls no other rank interrupted)
FORMAT = 6


def device_key(device: str) -> str:
    """The database key of this process's ``device`` kind ("cpu" or "cuda") and torch."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        import platform

        name = f"cpu {platform.machine()} {os.cpu_count()} cores"
    return f"{name} | torch {torch.__version__}"


def mesh_key(mesh_shape: Sequence[int]) -> str:
    return "x".join(str(n) for n in mesh_shape)


def op_signature(node: fx.Node, ins: Sequence[Spec], grads: Sequence[bool], mesh_shape: Sequence[int]) -> str:
    """What one op's time depends on (see the module docstring). ``ins`` and ``grads``: each
    tensor input's layout and whether a gradient flows to it, in ``tensor_args`` order. A
    layout enters through the local shape it gives: layouts that leave each device the same
    local work (``S0R`` and ``RS0`` on a 2x2 mesh, ``R`` and ``P``) are measured once."""
    it = iter(zip(ins, grads))

    def arg(a: object) -> object:
        if isinstance(a, torch.device):  # traced on meta or on the device: the same work
            return "device"
        v = a.meta.get("val") if isinstance(a, fx.Node) else None
        if not isinstance(v, torch.Tensor):
            return a if not isinstance(a, fx.Node) else repr(v)
        spec, grad = next(it)
        dtype = str(v.dtype).removeprefix("torch.")
        return f"T{list(local_shape(v.shape, spec, mesh_shape))}:{dtype}{':grad' if grad else ''}"

    args = fx.node.map_aggregate((node.args, node.kwargs), arg)
    return f"{node.target}{args!r} mesh {mesh_key(mesh_shape)}"


def fit_alpha_beta(sizes: Sequence[float], times: Sequence[float]) -> tuple[float, float]:
    """``t = alpha + beta * size`` with ``alpha, beta >= 0`` whose largest *relative* error
    over the samples, ``max |alpha + beta * size - t| / t``, is the smallest (the Chebyshev
    line): a sweep spans orders of magnitude, a small message's time matters as much as a
    large one's, and a price is judged by its worst size.

    It is the linear program ``min e`` over ``alpha, beta, e`` subject to
    ``-e <= (alpha + beta * size_i) / t_i - 1 <= e`` and ``alpha, beta >= 0``, whose optimum
    lies where three of its constraints hold with equality; a sweep has a handful of sizes,
    so every such triple is tried (on 6 sizes, 364)."""
    if not sizes:
        raise ValueError("no samples to fit")
    scale = max(max(sizes), 1e-300)  # sizes in units of the largest: the 3x3 systems stay well scaled
    rows = [(1.0 / max(t, 1e-12), x / scale / max(t, 1e-12)) for x, t in zip(sizes, times)]
    # each constraint c_a * alpha + c_b * beta + c_e * e <= r, as (c_a, c_b, c_e, r)
    bounds = [(a, b, -1.0, 1.0) for a, b in rows] + [(-a, -b, -1.0, -1.0) for a, b in rows]
    bounds += [(-1.0, 0.0, 0.0, 0.0), (0.0, -1.0, 0.0, 0.0)]

    def worst(alpha: float, beta: float) -> float:
        return max(abs(alpha * a + beta * b - 1) for a, b in rows)

    tol = 1e-9 * max(times)  # a zero computed as a rounding error below it
    best = (math.inf, 0.0, 0.0)
    for c in itertools.combinations(bounds, 3):
        vertex = _solve3([r[:3] for r in c], [r[3] for r in c])
        if vertex is not None and vertex[0] >= -tol and vertex[1] >= -tol:
            alpha, beta = (v if v > 0 else 0.0 for v in vertex[:2])
            err = worst(alpha, beta)
            if err < best[0] * (1 - 1e-12):
                best = (err, alpha, beta)
    return best[1], best[2] / scale


def _solve3(m: list[tuple[float, ...]], r: list[float]) -> tuple[float, float, float] | None:
    """``m x = r`` for a 3x3 ``m`` by Cramer's rule; None when ``m`` is singular."""

    def det(a: list[tuple[float, ...]]) -> float:
        return (
            a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1])
            - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0])
            + a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0])
        )

    d = det(m)
    if abs(d) < 1e-12 * max(abs(v) for row in m for v in row) ** 3:
        return None
    cols = []
    for j in range(3):
        mj = [tuple(r[i] if k == j else row[k] for k in range(3)) for i, row in enumerate(m)]
        cols.append(det(mj) / d)
    return cols[0], cols[1], cols[2]


def _relative_least_squares(sizes: Sequence[float], times: Sequence[float]) -> tuple[float, float]:
    """``t = alpha + beta * size`` with ``alpha, beta >= 0``, least squares of the *relative*
    error (weights ``1 / t**2``): the trend of many scattered samples spanning orders of
    magnitude (the measured ops against their roofline), where the Chebyshev line would
    follow the worst outliers and its search grows as the cube of the samples."""
    if not sizes:
        raise ValueError("no samples to fit")
    w = [1.0 / max(t, 1e-12) ** 2 for t in times]
    sw = sum(w)
    mx = sum(wi * x for wi, x in zip(w, sizes)) / sw
    my = sum(wi * y for wi, y in zip(w, times)) / sw
    sxx = sum(wi * (x - mx) ** 2 for wi, x in zip(w, sizes))
    beta = sum(wi * (x - mx) * (y - my) for wi, x, y in zip(w, sizes, times)) / sxx if sxx > 0 else 0.0
    if beta <= 0:
        return my, 0.0
    alpha = my - beta * mx
    if alpha < 0:  # through the origin
        sxy = sum(wi * x * y for wi, x, y in zip(w, sizes, times))
        return 0.0, sxy / sum(wi * x * x for wi, x in zip(w, sizes))
    return alpha, beta


@dataclass
class Profile:
    """One device key's measurements, as the cost model reads them."""

    key: str
    ops: dict[str, dict] = field(default_factory=dict)
    collectives: dict[str, dict] = field(default_factory=dict)
    optimizer: dict[str, dict] = field(default_factory=dict)
    path: str = ""

    def op_s(self, signature: str) -> tuple[float, float | None] | None:
        e = self.ops.get(signature)
        return None if e is None else (e["forward_s"], e["backward_s"])

    def axis_links(self, mesh_shape: Sequence[int], hw: Hardware) -> tuple[Link, ...]:
        """Each mesh axis's link with the fitted (alpha, beta) of every measured kind."""
        links = []
        for i, link in enumerate(hw.axis_links(mesh_shape)):
            fitted = []
            for kind in MOVE_KINDS:
                e = self.collectives.get(f"{mesh_key(mesh_shape)}/axis{i}/{kind}")
                if e is not None:
                    fitted.append((kind, e["alpha_s"], e["s_per_byte"]))
            links.append(Link(link.alpha_s, link.bytes_per_s, tuple(fitted)))
        return tuple(links)

    def optimizer_s(self, mesh_shape: Sequence[int], nbytes: float) -> float | None:
        """A parameter's AdamW step (``nbytes``: its local master weight) if measured here."""
        e = self.optimizer.get(mesh_key(mesh_shape))
        return None if e is None else e["alpha_s"] + e["s_per_byte"] * nbytes

    def fallback(self, hw: Hardware) -> tuple[float, float]:
        """(overhead_s, efficiency) fitted on the measured forward times against the roofline:
        ``forward_s = overhead_s + roofline_s / efficiency``; (0, 1) with nothing measured."""
        xs, ys = [], []
        for e in self.ops.values():
            dtype = getattr(torch, e["dtype"], torch.float32)
            xs.append(roofline_s(e["flops"], e["bytes"], dtype, hw))
            ys.append(e["forward_s"])
        if not xs:
            return 0.0, 1.0
        overhead, slope = _relative_least_squares(xs, ys)
        return overhead, (1.0 / slope if slope > 0 else math.inf)


def load(path: str | os.PathLike, gpu: str) -> Profile:
    """The entries of ``path`` for device kind ``gpu`` and this torch version: for "cpu" this
    machine's CPU, else the device whose name contains ``gpu`` ("h100" finds "NVIDIA H100 80GB
    HBM3"). Entries of another device or torch version are never read: no match is an error
    that lists what the file holds."""
    data = _read(Path(path))
    suffix = f" | torch {torch.__version__}"
    if gpu.lower() == "cpu":
        keys = [k for k in data["devices"] if k == device_key("cpu")]
    else:
        keys = [k for k in data["devices"] if k.endswith(suffix) and gpu.lower() in k.lower().split(" | ")[0]]
    if len(keys) != 1:
        held = "; ".join(sorted(data["devices"])) or "nothing"
        why = "several devices match" if keys else "it has no measurements for it"
        raise ProfileError(
            f"cannot price for gpu={gpu!r} with torch {torch.__version__} from {path}: {why} "
            f"(it holds: {held}). Run `autopar profile` on that device with this torch, or plan "
            "without a profile."
        )
    e = data["devices"][keys[0]]
    return Profile(keys[0], e.get("ops", {}), e.get("collectives", {}), e.get("optimizer", {}), str(path))


def merge(path: str | os.PathLike, key: str, update: dict[str, dict]) -> None:
    """Add ``update``'s sections (``ops``, ``collectives``, ``optimizer``) under ``key`` in the
    file at ``path``, created if absent; entries measured again replace the old ones."""
    p = Path(path)
    data = _read(p) if p.exists() else {"format": FORMAT, "devices": {}}
    entry = data["devices"].setdefault(key, {})
    for section, values in update.items():
        entry.setdefault(section, {}).update(values)
    p.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=p.parent, delete=False, suffix=".tmp") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(f.name, p)


def _read(p: Path) -> dict:
    if not p.exists():
        raise ProfileError(
            f"no profile database at {p}: run `autopar profile MODEL --mesh ... --db {p}` first"
        )
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ProfileError(f"cannot read the profile database {p}: {exc}") from None
    if (
        not isinstance(data, dict)
        or data.get("format") != FORMAT
        or not isinstance(data.get("devices"), dict)
    ):
        raise ProfileError(
            f"{p} is not an autopar profile database of format {FORMAT}; profile again into a new file"
        )
    return data
