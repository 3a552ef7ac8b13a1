"""Tracing with ``torch.export`` (non-strict): aten-level graph on fake tensors.

``fx.symbolic_trace`` fails on HuggingFace models, so autopar exports. The result is
``ep.module()``: parameters and buffers are ``get_attr`` nodes named by their fully
qualified names, inputs are placeholders, and every node's ``meta["val"]`` is a fake
tensor with the global shape and dtype.

With ``param_dtype`` (mixed precision) the model is traced as it will compute: a copy whose
parameters are uninitialized tensors of that dtype on the parameters' device (no weight is
copied; a model on the meta device costs nothing, a materialized one its size in the compute
dtype while tracing; the device matters: models capture ``.to(x.device)``), floating inputs
cast to it. Each parameter node's ``meta[MASTER_DTYPE]`` keeps the dtype the weights are kept
and updated in (the model's own); buffers keep their dtype.
"""

from __future__ import annotations

import copy
import os
import traceback
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from autopar.errors import TraceError
from autopar.tracer.lowerings import LOWERED_FROM, LOWERINGS, exact_mean_losses
from autopar.tracer.moe import static_experts

aten = torch.ops.aten
#: ``node.meta`` key of a parameter node traced in a lower precision: its master weights' dtype
MASTER_DTYPE = "autopar_master_dtype"


@dataclass
class Traced:
    gm: fx.GraphModule
    #: get_attr target -> True for trainable parameters, False for buffers and constants
    trainable: dict[str, bool]


def trace(
    model: nn.Module,
    args: tuple,
    kwargs: dict[str, Any] | None = None,
    param_dtype: torch.dtype | None = None,
) -> Traced:
    """Export ``model(*args, **kwargs)``, computing in ``param_dtype`` if given; a failure
    names the module and the line."""
    kwargs = dict(kwargs or {})
    _untie_aliased_inputs(args, kwargs)
    masters: dict[str, torch.dtype] = {}
    if param_dtype is not None:
        masters = {n: p.dtype for n, p in model.named_parameters(remove_duplicate=False)}
        model, args, kwargs = _in_precision(model, args, kwargs, param_dtype)
    if hasattr(getattr(model, "config", None), "use_cache"):
        model.config.use_cache = False
    try:
        with static_experts(model):
            ep = torch.export.export(model, tuple(args), kwargs, strict=False)
        if _mutates(ep.graph_module):
            ep = ep.run_decompositions(LOWERINGS)
    except Exception as exc:  # any failure inside user code or torch's tracer
        raise TraceError(_describe_failure(model, exc)) from exc
    gm = ep.module()
    _drop_checks(gm)
    _views_as_reshapes(gm)
    exact_mean_losses(gm)
    for node in gm.graph.nodes:
        if node.op == "get_attr" and masters.get(node.target, param_dtype) != param_dtype:
            node.meta[MASTER_DTYPE] = masters[node.target]
    trainable = {name: p.requires_grad for name, p in gm.named_parameters(remove_duplicate=False)}
    for name, _ in gm.named_buffers(remove_duplicate=False):
        trainable.setdefault(name, False)
    return Traced(gm, trainable)


def _in_precision(model: nn.Module, args: tuple, kwargs: dict, dtype: torch.dtype):
    """A copy of ``model`` with uninitialized parameters in ``dtype`` (``deepcopy`` given the
    replacements, so no weight is copied), and the inputs with floating tensors cast."""
    memo: dict[int, object] = {}
    for p in model.parameters():
        low = torch.empty_like(p, dtype=dtype if p.is_floating_point() else p.dtype)
        memo[id(p)] = nn.Parameter(low, requires_grad=p.requires_grad)
    copy_ = copy.deepcopy(model, memo)

    def cast(x: object) -> object:
        return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    return copy_, tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def _mutates(gm: fx.GraphModule) -> bool:
    """Whether the graph has in-place ops (batch norm's running statistics, ``x += y``).

    Such graphs are functionalized (``run_decompositions``), with autopar's lowerings: the
    only in-place ops left are writes into buffers, which the planner keeps replicated.
    Other graphs are kept as exported: decomposing would turn ``reshape`` into ``view``
    under the traced strides, which a kernel on local shards need not reproduce.
    """
    for node in gm.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op == "call_function" and (
            schema is not None and schema.is_mutable or node.target in LOWERED_FROM
        ):
            return True
    return False


def _untie_aliased_inputs(args: tuple, kwargs: dict[str, Any]) -> None:
    """The same tensor passed twice (``input_ids`` and ``labels``) exports as one input."""
    seen: set[int] = set()
    for k, v in list(kwargs.items()):
        if isinstance(v, torch.Tensor):
            if id(v) in seen or any(v is a for a in args):
                kwargs[k] = v.clone()
            seen.add(id(v))


def _drop_checks(gm: fx.GraphModule) -> None:
    """Export's input guards check global shapes (autopar checks inputs itself), and its
    ``_assert_tensor_metadata`` nodes check dtype/device of traced values; neither computes."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
            delattr(gm, "_guards_fn")
        elif node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default:
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()


def _views_as_reshapes(gm: fx.GraphModule) -> None:
    """``view`` (and ``_unsafe_view``) needs the traced strides, and a kernel run on local
    shards (attention on CPU, a lookup, a clone of a sharded expand) may lay out its result
    differently; ``reshape`` is the same op without that
    demand. Safe because the graph writes through no view (in-place ops were functionalized)."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (aten.view.default, aten._unsafe_view.default):
            node.target = aten.reshape.default
    gm.recompile()


def _describe_failure(model: nn.Module, exc: Exception) -> str:
    """Name the innermost user frame (file:line) and the nn.Module whose forward it is in."""
    names = {id(m): (n or type(model).__name__) for n, m in model.named_modules()}
    torch_dir = os.path.dirname(torch.__file__)
    where, module = None, None
    tb = exc.__traceback__
    for frame, lineno in traceback.walk_tb(tb):
        fname = frame.f_code.co_filename
        library = "site-packages" in fname and "transformers" not in fname  # HF code is "user" code
        if fname.startswith(torch_dir) or library or fname.startswith(os.path.dirname(__file__)):
            continue
        where = f"{fname}:{lineno} (in {frame.f_code.co_name})"
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            module = f"{names[id(owner)]} ({type(owner).__name__})"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (
        f"cannot trace {type(model).__name__}: {type(exc).__name__}: {first}\n"
        f"  module: {module or 'unknown'}\n  line: {where or 'unknown'}\n"
        "  autopar captures the model with torch.export (non-strict); make that forward "
        "exportable (no data-dependent Python control flow on tensor values, no .item()), "
        "or pass inputs that avoid the branch."
    )
