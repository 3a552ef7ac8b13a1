"""Replace every parameter and buffer with a DTensor in its planned layout.

Each rank keeps only its own shard (a copy of its slice); every alias of a tied weight
gets the same new Parameter, so names (FQNs) and tying are kept. An offloaded parameter's
shard is kept in host memory (``runtime.zero``).
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

from autopar.runtime.layout import to_dtensor
from autopar.runtime.zero import host_copy
from autopar.solver.plan import Plan
from autopar.solver.specs import parse, replicated


def shard_parameters(
    gm: fx.GraphModule, plan: Plan, mesh: DeviceMesh, weights: nn.Module | None = None
) -> fx.GraphModule:
    """Under mixed precision ``gm`` holds meta stand-ins in the compute dtype: the values come
    from ``weights`` (the user's model), by name."""
    specs, modes = plan.param_specs(), plan.param_modes()
    source: dict[str, torch.Tensor] = {}
    if plan.mixed_precision and weights is not None:
        source = dict(weights.named_parameters(remove_duplicate=False))
        source |= dict(weights.named_buffers(remove_duplicate=False))
    aliases: dict[int, list[tuple[str, bool]]] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append((name, True))
    for name, b in gm.named_buffers(remove_duplicate=False):
        aliases.setdefault(id(b), []).append((name, False))
    for names in aliases.values():
        first, is_param = names[0]
        tensor = gm.get_parameter(first) if is_param else gm.get_buffer(first)
        tensor = next((source[n] for n, _ in names if n in source), tensor)
        spec_name = next((specs[n] for n, _ in names if n in specs), None)
        spec = parse(spec_name) if spec_name else replicated(mesh.ndim)
        with torch.no_grad():  # a copy: training the result leaves the user's model untouched
            dt = to_dtensor(tensor.detach(), spec, mesh)
            if any(modes.get(n) == "offload" for n, _ in names):
                dt = host_copy(dt)
        new = nn.Parameter(dt, requires_grad=tensor.requires_grad) if is_param else dt
        for name, _ in names:
            owner, _, attr = name.rpartition(".")
            mod = gm.get_submodule(owner) if owner else gm
            if is_param:
                mod._parameters[attr] = new
            else:
                mod._buffers[attr] = new
    return gm
