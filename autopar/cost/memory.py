"""What an op keeps for its backward, found by running it once on the meta device.

Autograd decides what each op saves (a matmul keeps both operands, ``relu`` its output,
layer norm its input plus per-row mean and reciprocal std). :func:`saved_for_backward` runs
the op on meta tensors shaped like the traced ones, under ``saved_tensors_hooks``, and sorts
every saved tensor by the storage it lives in: one of the op's inputs, the op's own output, or
a buffer of its own (``extra_bytes``: statistics, masks, attention's log-sum-exp). Nothing is
allocated; results are cached by the op's signature, so a stack of identical layers is
probed once.

Per-device bytes kept by the optimizer (AdamW: two moments per parameter element, in the
parameter's dtype, as ``torch.optim.AdamW`` allocates them) are here too.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.fx as fx

from autopar.solver.repeats import val_key

#: AdamW keeps exp_avg and exp_avg_sq per parameter element.
ADAMW_STATES_PER_PARAM = 2


@dataclass(frozen=True)
class Saved:
    """What one call of an op keeps for backward."""

    #: positions (in ``tensor_args`` order) of the inputs it keeps
    inputs: tuple[int, ...]
    #: whether it keeps its own output
    output: bool
    #: bytes of tensors it keeps that are neither an input nor its output
    extra_bytes: int
    #: other nodes whose output it keeps (a fused chain's kernel keeps the chain's input)
    others: tuple[str, ...] = ()


_CACHE: dict[tuple, Saved] = {}


def _attention(node: fx.Node) -> Saved:
    """Fused attention (flash on CUDA, its CPU twin) keeps its inputs (q, k, v, a mask), the
    output and one fp32 log-sum-exp per query row; the meta kernel is the math path, which
    would keep the whole attention matrix."""
    q = node.args[0].meta["val"]
    lse_bytes = 4 * q.numel() // q.shape[-1]
    mask = node.args[3] if len(node.args) > 3 and isinstance(node.args[3], fx.Node) else None
    if mask is not None and mask.meta["val"].dtype == torch.bool:  # kept as an additive float mask
        return Saved((0, 1, 2), True, lse_bytes + 4 * mask.meta["val"].numel())
    return Saved((0, 1, 2, 3) if mask is not None else (0, 1, 2), True, lse_bytes)


#: ops whose meta kernel keeps something other than what runs on devices
OVERRIDES = {torch.ops.aten.scaled_dot_product_attention.default: _attention}


def saved_for_backward(node: fx.Node, tensor_nodes: list[fx.Node], requires_grad: list[bool]) -> Saved:
    """What ``node`` keeps for backward when the given inputs require grad (cached by the
    op, its arguments' shapes and dtypes, and which inputs require grad)."""
    key = (
        str(node.target),
        repr(fx.node.map_aggregate((node.args, node.kwargs), _arg_key)),
        tuple(requires_grad),
    )
    if node.target in OVERRIDES and any(requires_grad):
        return OVERRIDES[node.target](node)
    if key not in _CACHE:
        _CACHE[key] = _probe(node, tensor_nodes, requires_grad) if any(requires_grad) else Saved((), False, 0)
    return _CACHE[key]


def _arg_key(a: object) -> object:
    return ("tensor", val_key(a.meta.get("val"))) if isinstance(a, fx.Node) else a


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _probe(node: fx.Node, tensor_nodes: list[fx.Node], requires_grad: list[bool]) -> Saved:
    metas: dict[fx.Node, torch.Tensor] = {}
    for a, req in zip(tensor_nodes, requires_grad):
        v = a.meta["val"]
        t = torch.empty_strided(tuple(v.shape), tuple(v.stride()), dtype=v.dtype, device="meta")
        metas[a] = t.requires_grad_(bool(req and v.is_floating_point()))
    position = {_storage(t): k for k, t in enumerate(metas.values())}
    kept: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept.append(t)
        return t

    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: metas.get(a, a))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = node.target(*args, **kwargs)
    except Exception:  # an op without a meta kernel: assume it keeps every input
        return Saved(tuple(range(len(tensor_nodes))), False, 0)
    outs = out if isinstance(out, (list, tuple)) else [out]
    out_storages = {_storage(o) for o in outs if isinstance(o, torch.Tensor)}
    inputs: set[int] = set()
    output, extra, seen = False, 0, set()
    for t in kept:
        sid = _storage(t)
        if sid in seen:
            continue
        seen.add(sid)
        if sid in position:
            inputs.add(position[sid])
        elif sid in out_storages:
            output = True
        else:
            extra += t.untyped_storage().nbytes()
    return Saved(tuple(sorted(inputs)), output, extra)
