"""Ops the tracer rewrites into ops the planner can shard better.

- mean cross entropy (no class weights) becomes ``sum of losses / number of counted
  targets``: sharded over the batch, both are partial sums, so the mean is exact even when
  ``ignore_index`` targets (padding, HF's shifted labels) are spread unevenly over the shards.
  A mean of per-shard means would not be.

- ``batch_norm`` in training becomes two reductions and elementwise ops: the batch statistics
  are then means over a possibly sharded batch, i.e. partial sums that the planner all-reduces
  (synchronized batch norm, priced like any other reduction) instead of gathering whole
  activations. The running statistics are updated in place as the op does.
"""

from __future__ import annotations

import contextlib

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

aten = torch.ops.aten


def exact_mean_losses(gm: fx.GraphModule) -> None:
    """Rewrite every ``cross_entropy_loss(..., reduction=mean)`` without class weights."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.cross_entropy_loss.default:
            continue
        names = ("input", "target", "weight", "reduction", "ignore_index", "label_smoothing")
        defaults = (None, None, None, 1, -100, 0.0)
        a = dict(zip(names, defaults)) | dict(zip(names, node.args)) | dict(node.kwargs)
        if a["reduction"] != 1 or a["weight"] is not None:
            continue
        logits = a["input"]
        dtype = logits.meta["val"].dtype
        target, ignore = a["target"], a["ignore_index"]
        with graph.inserting_before(node):
            loss_op = aten.cross_entropy_loss.default
            total = _op(graph, loss_op, logits, target, None, 2, ignore, a["label_smoothing"])
            counted = _op(graph, aten.to.dtype, _op(graph, aten.ne.Scalar, target, ignore), dtype)
            count = _op(graph, aten.sum.default, counted)
            mean = _op(graph, aten.div.Tensor, total, count)
        for new in (total, counted, counted.args[0], count, mean):
            new.meta.update({k: v for k, v in node.meta.items() if k != "val"})
        node.replace_all_uses_with(mean)
        graph.erase_node(node)
    gm.recompile()


def _op(graph: fx.Graph, op, *args) -> fx.Node:
    """A new node for ``op(*args)`` with its fake value in ``meta["val"]``."""
    new = graph.call_function(op, args)
    vals = fx.node.map_arg(args, lambda n: n.meta["val"])
    mode = detect_fake_mode(vals)
    with mode if mode is not None else contextlib.nullcontext():
        new.meta["val"] = op(*vals)
    return new


def batch_norm_functional(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    training: bool,
    momentum: float,
    eps: float,
) -> tuple[torch.Tensor, ...]:
    """``_native_batch_norm_legit_functional``: (out, mean, rstd, new running mean, new running var)."""
    dims = [0, *range(2, x.dim())]
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    if training:
        mean = x.mean(dims, keepdim=True)
        centered = x - mean
        var = (centered * centered).mean(dims, keepdim=True)
        n = x.numel() // x.shape[1]
        new_mean = running_mean * (1 - momentum) + mean.detach().flatten() * momentum
        new_var = running_var * (1 - momentum) + var.detach().flatten() * (momentum * n / max(n - 1, 1))
    else:
        centered = x - running_mean.view(shape)
        var = running_var.view(shape)
        new_mean, new_var = running_mean, running_var
    rstd = torch.rsqrt(var + eps)
    out = centered * rstd
    if weight is not None:
        out = out * weight.view(shape)
    if bias is not None:
        out = out + bias.view(shape)
    return out, mean.flatten() if training else running_mean, rstd.flatten(), new_mean, new_var


LOWERINGS = {aten._native_batch_norm_legit_functional.default: batch_norm_functional}
#: Ops in an exported graph that call for functionalization and the lowerings above.
LOWERED_FROM = (aten.batch_norm.default,)
