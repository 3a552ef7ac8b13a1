"""The Plan: plain, versioned, fingerprinted data; JSON on disk, never pickle.

A plan records, per node of the traced graph, the chosen output spec, the specs its inputs
are resharded to, the recompute flag and the estimated compute / communication / memory;
plus the mesh, hardware, strategy and solver outcome. ``fingerprint`` hashes the graph's
node list (name, op, shape, dtype) so a plan is only ever applied to the graph it was made
for; a mismatch names the first node that differs.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.fx as fx

from autopar.errors import PlanFormatError, StalePlanError
from autopar.solver.repeats import ranges

FORMAT_VERSION = 4


@dataclass
class NodePlan:
    name: str
    op: str
    kind: str  # input | param | buffer | op | getitem
    module: str  # owning module's qualified name ("" at top level)
    target: str  # parameter / buffer FQN, or the op
    spec: str  # output layout, short form (see solver.specs)
    input_specs: list[str]
    recompute: str  # the block instance it is recomputed with in backward ("" if kept)
    #: a parameter's mode (``solver.zero``): "" (as read), zero2, zero3 or offload
    mode: str
    #: the ILP decision that sets this node's layout (a root of the strategy graph, shared by
    #: the same node of identical blocks)
    decision: str
    compute_s: float
    comm_s: float
    #: bytes this device sends for the layout changes into the node, forward and backward
    comm_bytes: int
    memory_bytes: int


@dataclass
class Plan:
    fingerprint: str
    graph_signature: list[str]
    mesh_shape: list[int]
    mesh_dim_names: list[str]
    hardware: str
    strategy: str
    #: "bf16" / "fp16": computes in that dtype, master weights and AdamW in the model's ("": off)
    mixed_precision: str
    nodes: list[NodePlan]
    estimated_step_s: float
    peak_memory_bytes: int
    fallback_ops: list[str]
    #: peak bytes per device and its parts: resident (weights, AdamW moments, buffers,
    #: inputs), gradients and saved activations at the peak, and where the peak is
    memory: dict = field(default_factory=dict)
    #: the repeated blocks recomputed in backward ("model.layers.0", ...)
    recompute: list[str] = field(default_factory=list)
    #: per decision, the strategies the ILP turned down, cheapest first (``solver.explain``)
    alternatives: dict = field(default_factory=dict)
    #: where the prices came from: the hardware table, or a profile database (its device,
    #: the ops priced from measurements and those estimated, the collectives measured)
    costs: dict = field(default_factory=dict)
    #: the chains run as one fused kernel (``solver.fusion.Fusion`` as dicts: kind, nodes, x,
    #: params, consts); ``passes.fuse`` swaps them in
    fusions: list[dict] = field(default_factory=list)
    solver: dict = field(default_factory=dict)
    timings_s: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    # ---- lookup
    def node(self, name: str) -> NodePlan:
        return self._by_name()[name]

    def _by_name(self) -> dict[str, NodePlan]:
        return {n.name: n for n in self.nodes}

    @property
    def comm_bytes(self) -> int:
        """Bytes each device sends per training step for layout changes (not counting the
        extra gathers of ZeRO-3 and recomputation)."""
        return sum(n.comm_bytes for n in self.nodes)

    def param_modes(self) -> dict[str, str]:
        """Parameter FQN -> its mode, for the parameters not simply laid out as read."""
        return {n.target: n.mode for n in self.nodes if n.kind == "param" and n.mode}

    def param_specs(self) -> dict[str, str]:
        """Parameter / buffer FQN -> layout."""
        return {n.target: n.spec for n in self.nodes if n.kind in ("param", "buffer")}

    # ---- persistence
    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @staticmethod
    def from_json(text: str) -> Plan:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanFormatError(f"plan is not valid JSON: {exc}") from exc
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise StalePlanError(
                f"plan format version {version} is not {FORMAT_VERSION}; make the plan again "
                "with this autopar version (autopar plan ...)"
            )
        try:
            d["nodes"] = [NodePlan(**n) for n in d["nodes"]]
            return Plan(**d)
        except TypeError as exc:
            raise PlanFormatError(f"plan file has unexpected fields: {exc}") from exc

    # ---- matching
    def check_matches(self, gm: fx.GraphModule, mesh_shape: tuple[int, ...]) -> None:
        """Refuse a plan made for another graph or mesh; name the first difference."""
        if tuple(self.mesh_shape) != tuple(mesh_shape):
            raise StalePlanError(
                f"plan was made for mesh {tuple(self.mesh_shape)}, the mesh is {tuple(mesh_shape)}; "
                "make a plan for this mesh"
            )
        sig = graph_signature(gm)
        if fingerprint(sig) == self.fingerprint:
            return
        for i, (a, b) in enumerate(zip(self.graph_signature, sig)):
            if a != b:
                raise StalePlanError(
                    f"plan does not match this model: node {i} differs: plan has {a!r}, the "
                    f"traced graph has {b!r}. Make the plan again for this model and inputs."
                )
        raise StalePlanError(
            f"plan does not match this model: the plan has {len(self.graph_signature)} nodes, the "
            f"traced graph {len(sig)} (first extra: "
            f"{(self.graph_signature + sig)[min(len(sig), len(self.graph_signature))]!r})"
        )

    # ---- report
    def explain(self, name: str) -> str:
        """Why node ``name`` has its layout: the decision that sets it, the layout chosen, and
        the alternatives turned down with the step time each would add."""
        by_name = self._by_name()
        if name not in by_name:
            close = difflib.get_close_matches(name, list(by_name), n=5)
            raise PlanFormatError(
                f"no node {name!r} in this plan" + (f"; did you mean {', '.join(close)}?" if close else "")
            )
        n = by_name[name]
        root = by_name[n.decision]
        members = sum(m.decision == n.decision for m in self.nodes)
        lines = [
            f"{n.name} ({n.op}, module {n.module or '-'}): {n.spec}"
            + (f" <- {', '.join(n.input_specs)}" if n.input_specs else "")
            + (f", {n.mode}" if n.mode else ""),
            f"set by decision {n.decision} ({members} nodes follow it): {root.spec} <- "
            f"{', '.join(root.input_specs) or '-'}",
            "turned down (step time it would add, the rest of the plan held fixed; peak memory not checked):",
        ]
        for alt in self.alternatives.get(n.decision, []):
            lines.append(
                f"  {alt['out']:<8} <- {', '.join(alt['ins']) or '-':<24} +{alt['delta_s'] * 1e3:.4f} ms"
            )
        if not self.alternatives.get(n.decision):
            lines.append("  (no other strategy)")
        return "\n".join(lines)

    def _memory_lines(self) -> list[str]:
        m = self.memory
        if not m:
            return []
        return [
            f"peak memory at {m['at']}: resident {_mib(m['resident_bytes'])} (weights, AdamW moments, "
            f"buffers, inputs), gradients {_mib(m['gradient_bytes'])}, saved activations "
            f"{_mib(m['activation_bytes'])}, transients {_mib(m['transient_bytes'])}",
            "recompute in backward: " + self.recompute_summary(),
            "parameters: " + self._mode_counts(),
        ]

    def recompute_summary(self) -> str:
        """``model.layers.{0-12}`` (13 of 32 blocks) per stack of blocks."""
        if not self.recompute:
            return "nothing"
        stacks: dict[str, list[int]] = defaultdict(list)
        for block in self.recompute:
            prefix, _, i = block.rpartition(".")
            stacks[prefix].append(int(i))
        sizes: dict[str, set[str]] = defaultdict(set)
        for n in self.nodes:  # how many blocks each stack has, from the parameters' names
            for prefix in stacks:
                rest = n.target[len(prefix) + 1 :] if n.target.startswith(prefix + ".") else ""
                if rest.split(".")[0].isdigit():
                    sizes[prefix].add(rest.split(".")[0])
        return ", ".join(
            f"{prefix}.{{{ranges(sorted(ix))}}} ({len(ix)} of {len(sizes[prefix]) or '?'} blocks)"
            for prefix, ix in stacks.items()
        )

    def _mode_counts(self) -> str:
        params = [n for n in self.nodes if n.kind == "param"]
        modes = self.param_modes()
        words = {
            "zero2": "stored sharded, gathered once (ZeRO-2)",
            "zero3": "stored sharded, gathered again in backward (ZeRO-3)",
            "offload": "in host memory, AdamW step on the CPU (offload)",
        }
        parts = [f"{len(params) - len(modes)} as read"]
        parts += [f"{n} {words[m]}" for m in words if (n := sum(v == m for v in modes.values()))]
        return ", ".join(parts)

    def layers(self) -> dict[str, dict]:
        """Per layer (``model.layers.3``, or a top-level module): its last op's layout, compute
        and communication seconds, resident bytes, and its parameters' layouts."""
        rows = defaultdict(lambda: {"params": [], "compute_s": 0.0, "comm_s": 0.0, "mem": 0, "out": ""})
        for n in self.nodes:
            layer = _layer_of(n.module)
            r = rows[layer]
            r["compute_s"] += n.compute_s
            r["comm_s"] += n.comm_s
            r["mem"] += n.memory_bytes
            if n.kind == "param":
                label = n.target[len(layer) + 1 :] if n.target.startswith(layer + ".") else n.target
                r["params"].append(f"{label}={n.spec}" + (f"[{n.mode}]" if n.mode else ""))
            elif n.kind == "op":
                r["out"] = n.spec
        return dict(rows)

    def headline(self) -> list[str]:
        """The report's first lines: mesh, step, peak and its parts, recomputation, modes."""
        mesh = "x".join(map(str, self.mesh_shape))
        names = ",".join(self.mesh_dim_names)
        return [
            f"autopar plan: mesh {mesh} ({names}) on {self.hardware}, strategy {self.strategy}"
            + (f", {self.mixed_precision} compute with master weights" if self.mixed_precision else ""),
            f"estimated step {self.estimated_step_s * 1e3:.3f} ms, peak memory "
            f"{self.peak_memory_bytes / 2**20:.1f} MiB per device, solver {self.solver.get('status', '?')} "
            f"(gap {self.solver.get('gap', 0.0):.2%}) in {self.solver.get('solve_s', 0.0):.2f} s",
            *self._memory_lines(),
            *(f"repeated blocks: {line}" for line in self.solver.get("shared_blocks", [])),
        ]

    def report(self) -> str:
        """A per-layer table: layouts, compute and communication seconds, memory."""
        lines = [
            *self.headline(),
            "",
            f"{'layer':<22} {'out':<7} {'compute ms':>10} {'comm ms':>9} {'MiB':>8}  parameters",
        ]
        for layer, r in self.layers().items():
            lines.append(
                f"{layer:<22} {r['out']:<7} {r['compute_s'] * 1e3:>10.4f} {r['comm_s'] * 1e3:>9.4f} "
                f"{r['mem'] / 2**20:>8.2f}  {' '.join(r['params'])}"
            )
        lines.append("")
        lines.append(
            "fallback ops (replicated, no sharding rule): " + (", ".join(self.fallback_ops) or "none")
        )
        lines.append(self.kernels_line())
        lines.append(self.cost_line())
        return "\n".join(lines)

    def kernels_line(self) -> str:
        """Which chains run as fused kernels (``fusions``)."""
        if not self.fusions:
            return "fused kernels: none (eager ops)"
        kinds: dict[str, int] = defaultdict(int)
        for f in self.fusions:
            kinds[f["kind"]] += 1
        ops = sum(len(f["nodes"]) for f in self.fusions)
        parts = ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items()))
        return f"fused kernels: {len(self.fusions)} chains of {ops} ops ({parts})"

    def cost_line(self) -> str:
        """Where the prices came from (``costs``)."""
        c = self.costs
        if "device" not in c:
            return f"costs: {c.get('source', 'hardware table')}"
        n_est = len(c["estimated_ops"])
        shown = ", ".join(c["estimated_ops"][:8]) + (" ..." if n_est > 8 else "")
        return (
            f"costs: measured on {c['device']} ({c['source']}): {c['measured_ops']} ops measured, "
            f"{n_est} estimated" + (f" ({shown})" if n_est else "")
        )


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _layer_of(module: str) -> str:
    parts = module.split(".") if module else ["(top)"]
    keep = 2 if len(parts) > 1 and parts[1].isdigit() else 1
    return ".".join(parts[: keep + (1 if len(parts) > keep else 0)]) or "(top)"


def graph_signature(gm: fx.GraphModule) -> list[str]:
    sig = []
    for n in gm.graph.nodes:
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor):
            desc = f"{list(v.shape)} {str(v.dtype).removeprefix('torch.')}"
        elif isinstance(v, (list, tuple)):
            desc = str([list(t.shape) for t in v if isinstance(t, torch.Tensor)])
        else:
            desc = ""
        sig.append(f"{n.name} {n.op} {n.target} {desc}".strip())
    return sig


def fingerprint(signature: list[str]) -> str:
    return hashlib.sha256("\n".join(signature).encode()).hexdigest()[:16]


def load_plan(path: str | Path) -> Plan:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise PlanFormatError(f"cannot read plan {path}: {exc}") from exc
    return Plan.from_json(text)
