"""The hardware table: peak compute, memory bandwidth and links, per device kind.

Vendor figures for dense math; links priced per mesh axis with latency ``alpha_s`` and
bandwidth ``link_bytes_per_s`` (alpha-beta model). A mesh axis whose devices all sit in one
node (by ``gpus_per_node``) uses the intra-node link, otherwise the inter-node one.

Offloaded optimizer states (``solver.zero``) are priced by ``host_link`` (the device's PCIe
link to its host, one direction, pinned memory) and ``host_bytes_per_s``: the host memory
bandwidth one device's share of the CPU gets for its optimizer step (a server socket's
DRAM bandwidth divided among the GPUs it feeds).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from autopar.errors import UnknownGPUError


@dataclass(frozen=True)
class Link:
    alpha_s: float
    bytes_per_s: float
    #: ``(kind, alpha_s, s_per_byte)`` per collective kind measured on this link (``cost.profile_db``)
    fitted: tuple[tuple[str, float, float], ...] = ()


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops_per_s: dict[str, float]
    hbm_bytes_per_s: float
    memory_bytes: int
    intra_node: Link
    inter_node: Link
    host_link: Link | None = Link(10e-6, 25e9)  # None: no separate host memory to offload to
    host_bytes_per_s: float = 25e9
    gpus_per_node: int = 8
    #: whether the device runs autopar's Triton kernels (``runtime.kernels``); plans for it
    #: fuse the chains ``solver.fusion`` finds by default
    fused_kernels: bool = True
    notes: str = field(default="", compare=False)

    def peak_flops(self, dtype: torch.dtype) -> float:
        key = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
        return self.peak_flops_per_s[key]

    def axis_links(self, mesh_shape: Sequence[int]) -> tuple[Link, ...]:
        """The link each mesh axis communicates over; the last axes are the innermost."""
        links: list[Link] = []
        for i in range(len(mesh_shape)):
            inner = math.prod(mesh_shape[i:])
            links.append(self.intra_node if inner <= self.gpus_per_node else self.inter_node)
        return tuple(links)


_GIB = 1 << 30

HARDWARE: dict[str, Hardware] = {
    "a100": Hardware(
        "a100",
        {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "fp16": 312e12},
        2.0e12,
        80 * _GIB,
        Link(5e-6, 300e9),
        Link(10e-6, 25e9),
        notes="A100-SXM 80GB, NVLink 3, 200 Gb/s InfiniBand per GPU, PCIe 4 to the host",
    ),
    "h100": Hardware(
        "h100",
        {"fp32": 67e12, "tf32": 494e12, "bf16": 989e12, "fp16": 989e12},
        3.35e12,
        80 * _GIB,
        Link(5e-6, 450e9),
        Link(10e-6, 50e9),
        host_link=Link(10e-6, 50e9),
        notes="H100-SXM 80GB, NVLink 4, 400 Gb/s InfiniBand per GPU, PCIe 5 to the host",
    ),
    "h200": Hardware(
        "h200",
        {"fp32": 67e12, "tf32": 494e12, "bf16": 989e12, "fp16": 989e12},
        4.8e12,
        141 * _GIB,
        Link(5e-6, 450e9),
        Link(10e-6, 50e9),
        host_link=Link(10e-6, 50e9),
        notes="H200-SXM 141GB, NVLink 4, 400 Gb/s InfiniBand per GPU, PCIe 5 to the host",
    ),
    "a10": Hardware(
        "a10",
        {"fp32": 31.2e12, "tf32": 62.5e12, "bf16": 125e12, "fp16": 125e12},
        600e9,
        24 * _GIB,
        Link(10e-6, 25e9),
        Link(20e-6, 12.5e9),
        gpus_per_node=4,
        notes="A10 24GB (one workstation/cloud GPU), PCIe 4 between GPUs and to the host",
    ),
    "cpu": Hardware(
        "cpu",
        {"fp32": 50e9, "tf32": 50e9, "bf16": 20e9, "fp16": 20e9},
        10e9,
        16 * _GIB,
        Link(50e-6, 2e9),
        Link(50e-6, 2e9),
        host_link=None,
        gpus_per_node=64,
        fused_kernels=False,
        notes="a CPU process per rank, gloo over loopback",
    ),
}


def get_hardware(name: str | None) -> Hardware:
    """Look up a device kind by name (case-insensitive); ``None`` means h100."""
    key = (name or "h100").lower()
    if key not in HARDWARE:
        raise UnknownGPUError(
            f"unknown GPU {name!r}: known kinds are {', '.join(sorted(HARDWARE))}; "
            "pass one of them as gpu=..."
        )
    return HARDWARE[key]
