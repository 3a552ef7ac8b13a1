"""What the emitted module calls for a chain the plan fuses (``passes.fuse``).

``fused_call(kind, spec, x, *params, *consts)`` runs the chain's kernel on this rank's shards
(``local_call``) and wraps the result in the planned layout ``spec``.
"""

from __future__ import annotations

from typing import Any

from autopar.runtime.kernels import gelu, norms
from autopar.runtime.local_ops import local_call

#: kind (``solver.fusion.Fusion.kind``) -> the kernel and the names of its constants, in order
KERNELS = {
    "gelu": (gelu.bias_gelu, ("approximate",)),
    "layer_norm": (norms.layer_norm, ("eps",)),
    "rms_norm": (norms.rms_norm, ("eps",)),
}


def fused_call(kind: str, spec: str, *args: Any) -> Any:
    return local_call(KERNELS[kind][0], spec, *args)
