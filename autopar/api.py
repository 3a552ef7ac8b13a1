"""The public entry points: ``make_plan`` (offline, no ranks) and ``autoparallelize``."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

from autopar import errors
from autopar.passes import apply_plan
from autopar.solver.plan import Plan
from autopar.solver.planner import plan_traced
from autopar.tracer import trace


def make_plan(
    model: nn.Module,
    example_inputs: tuple,
    mesh_shape: Sequence[int],
    *,
    mesh_dim_names: Sequence[str] | None = None,
    example_kwargs: dict[str, Any] | None = None,
    gpu: str = "h100",
    memory_budget: int | str | None = None,
    strategy: str = "auto",
    time_limit_s: float | None = None,
    mixed_precision: str | None = None,
    progress: Callable[[str], None] | None = None,
    profile: str | None = None,
    kernels: str = "auto",
) -> Plan:
    """Plan offline: no ranks, no real memory (the model and inputs may be on the meta device).
    ``mixed_precision="bf16"`` (or ``"fp16"``) computes in that dtype and keeps master weights,
    gradients and AdamW moments in the model's dtype. ``progress`` hears each phase's name
    (the CLI shows them; a library call is quiet). ``profile``: a profile database
    (``autopar profile``, :func:`profile_model`) whose measurements for ``gpu`` price the plan.
    ``kernels``: "auto" runs chains such as LayerNorm, RMSNorm and GELU as fused kernels where
    ``gpu`` runs them (GPUs), "fused" everywhere, "eager" nowhere; the plan is priced so."""
    if progress is not None:
        progress("tracing")
    t0 = time.perf_counter()
    traced = trace(model, example_inputs, example_kwargs, param_dtype(mixed_precision))
    return plan_traced(
        traced,
        tuple(mesh_shape),
        mesh_dim_names=mesh_dim_names,
        gpu=gpu,
        memory_budget=memory_budget,
        strategy=strategy,
        time_limit_s=time_limit_s,
        mixed_precision=mixed_precision or "",
        timings_s={"trace_s": time.perf_counter() - t0},
        progress=progress,
        profile=profile,
        kernels=kernels,
    )


def autoparallelize(
    model: nn.Module,
    example_inputs: tuple,
    device_mesh: DeviceMesh,
    *,
    example_kwargs: dict[str, Any] | None = None,
    gpu: str | None = None,
    memory_budget: int | str | None = None,
    strategy: str = "auto",
    plan: Plan | None = None,
    mixed_precision: str | None = None,
    profile: str | None = None,
    kernels: str = "auto",
    time_limit_s: float | None = None,
) -> nn.Module:
    """Trace, plan (or check ``plan``), and emit the distributed module for this rank.

    Every rank calls this with the same model and inputs and traces it; rank 0 plans and sends
    the plan to all (as JSON), so all apply one plan (with ``time_limit_s``, the best plan rank
    0 found in that time, as in :func:`make_plan`). A planning error on rank 0 is raised on
    every rank, with its fields (``min_budget_bytes``, ...). The returned module's parameters
    are DTensors with the original names; call it with the same global inputs on every rank.
    With ``mixed_precision`` (or a plan made with it) the parameters stay in the model's dtype
    and are cast for compute.
    """
    if plan is not None and mixed_precision is not None and (mixed_precision or "") != plan.mixed_precision:
        raise errors.AutoparError(
            f"mixed_precision={mixed_precision!r} but the plan was made with "
            f"{plan.mixed_precision or None!r}; pass the plan alone or make a new one"
        )
    precision = plan.mixed_precision if plan is not None else mixed_precision
    traced = trace(model, example_inputs, example_kwargs, param_dtype(precision))
    if plan is None:
        plan = _plan_on_rank0(
            lambda: plan_traced(
                traced,
                tuple(device_mesh.shape),
                mesh_dim_names=device_mesh.mesh_dim_names,
                gpu=gpu or ("cpu" if device_mesh.device_type == "cpu" else "h100"),
                memory_budget=memory_budget,
                strategy=strategy,
                time_limit_s=time_limit_s,
                mixed_precision=precision or "",
                profile=profile,
                kernels=kernels,
            ),
            device_mesh,
        )
    return apply_plan(traced.gm, plan, device_mesh, weights=model)


def param_dtype(mixed_precision: str | None) -> torch.dtype | None:
    """The compute dtype ``mixed_precision`` names (None: the model's own)."""
    if not mixed_precision:
        return None
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if mixed_precision not in dtypes:
        raise errors.AutoparError(
            f"mixed_precision={mixed_precision!r} is not one of {', '.join(dtypes)} (or None)"
        )
    return dtypes[mixed_precision]


def _plan_on_rank0(make: Callable[[], Plan], mesh: DeviceMesh) -> Plan:
    """Rank 0 plans; its plan, or its error, goes to every rank as JSON bytes (no pickling)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return make()
    failure: Exception | None = None
    data = b""
    if dist.get_rank() == 0:
        try:
            data = make().to_json().encode()
        except Exception as exc:  # every rank must hear of it, or they wait forever
            failure = exc
            ours = isinstance(exc, errors.AutoparError) and hasattr(errors, type(exc).__name__)
            error = {
                "error_type": type(exc).__name__ if ours else "AutoparError",
                "message": f"planning failed on rank 0: {exc}",
                # min_budget_bytes, n_vars (not add_note's __notes__)
                "fields": {k: v for k, v in vars(exc).items() if not k.startswith("_")} if ours else {},
            }
            data = json.dumps(error).encode()
    device = mesh.device_type
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    dist.broadcast(size, src=0)
    buf = torch.zeros(int(size.item()), dtype=torch.uint8, device=device)
    if dist.get_rank() == 0:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buf, src=0)
    if failure is not None:
        raise failure
    text = bytes(buf.cpu().tolist()).decode()
    payload = json.loads(text)
    if "error_type" in payload:
        raise getattr(errors, payload["error_type"])(payload["message"], **payload["fields"])
    return Plan.from_json(text)
