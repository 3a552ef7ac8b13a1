"""Every strategy of every rule, executed on 4 gloo ranks against the single-device op.

For each distinct op node of small models covering all rule families (and of the zoo's tiny
models, up to three shapes per op), and for meshes (4,) and (2, 2), each strategy the rules
offer is run the way the emitted module runs it (``local_call`` on local shards, or DTensor
dispatch for ``rules.DISPATCHED``) with inputs laid out as the strategy says. It must (1)
communicate nothing but the collectives the rule declares inside the op (vocabulary-parallel
cross entropy's all-reduces, ``rules.INNER_COLLECTIVES``), (2) produce exactly the planned
output placements, (3) give the single-device values, and, given the output's gradient in
the output's layout made whole, (4) communicate nothing in backward, (5) give each input's
gradient in the layout the plan prices (``solver.graph.grad_spec``), and (6) give the
single-device input gradients. A wrong rule fails here.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.debug import CommDebugMode

from autopar.models import zoo
from autopar.passes.layouts import runs_locally
from autopar.runtime.layout import MeshContext, as_replicated, reshard, to_dtensor
from autopar.runtime.local_ops import local_call
from autopar.solver import rules
from autopar.solver.graph import grad_spec
from autopar.solver.rules.base import is_tensor_node, tensor_args
from autopar.solver.specs import no_partial, short
from autopar.tracer import trace
from tests.distributed.harness import run_on_mesh
from tests.distributed.opzoo import models

MESHES = ((4,), (2, 2))
#: zoo models add their nodes only for ops seen in fewer distinct shapes than this (time)
ZOO_SHAPES_PER_OP = 3


def _signature(node: fx.Node) -> str:
    shapes = [tuple(a.meta["val"].shape) for a in tensor_args(node)]
    consts = fx.node.map_arg((node.args, node.kwargs), lambda a: None)
    return f"{node.target}|{shapes}|{consts}"


def _int_bound(node: fx.Node) -> int:
    """Integer inputs are drawn below this: indices must be valid for the looked-up tensor."""
    if node.target is torch.ops.aten.one_hot.default:
        return node.args[1]
    if node.target is torch.ops.aten.cross_entropy_loss.default:  # targets in every vocabulary shard
        return node.args[0].meta["val"].shape[1]
    if node.target in rules.lookup.OPS:
        return min(4, *node.args[0].meta["val"].shape)
    return 4


def _inputs(node: fx.Node, gen: torch.Generator) -> list[torch.Tensor]:
    out = []
    for a in tensor_args(node):
        v = a.meta["val"]
        if v.is_floating_point():
            out.append(torch.randn(v.shape, dtype=v.dtype, generator=gen))
        elif v.dtype == torch.bool:
            out.append(torch.randint(0, 2, v.shape, generator=gen).bool())
        else:
            out.append(torch.randint(0, _int_bound(node), v.shape, dtype=v.dtype, generator=gen))
    return out


def _call(node: fx.Node, tensors: list, spec: str, ctx: MeshContext | None):
    it = iter(tensors)
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: next(it) if is_tensor_node(a) else a)
    if ctx is None:
        return node.target(*args, **kwargs)
    if runs_locally(node):
        return local_call(node.target, spec, *args, **kwargs)
    if not tensors:
        return as_replicated(node.target(*args, **kwargs), ctx)
    return node.target(*args, **kwargs)


def _grad(node: fx.Node, k: int, t: torch.Tensor) -> bool:
    """Float inputs take gradients, except the buffer an in-place op writes into."""
    return t.is_floating_point() and not (k == 0 and node.target in rules.elementwise.INPLACE)


def _outs(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float32 summation order: the absolute tolerance scales with the tensor's
    largest value (a sum of hundreds of products differs in its last bits)."""
    a, b = a.float(), b.float()
    atol = 1e-5 * max(1.0, b.abs().max().item()) if b.numel() else 1e-5
    return a.shape == b.shape and torch.allclose(a, b, atol=atol, rtol=1e-4, equal_nan=True)


def check_all_rules() -> dict:
    checked: dict[str, int] = {}
    failures: list[str] = []
    gen = torch.Generator().manual_seed(0)
    meshes = {shape: init_device_mesh("cpu", shape) for shape in MESHES}
    seen: set[str] = set()
    per_op: dict[object, int] = {}
    for name, (model, kwargs) in models().items():
        gm = trace(model, (), kwargs).gm
        for node in gm.graph.nodes:
            if node.op != "call_function" or node.target is operator.getitem:
                continue
            sig = _signature(node)
            if sig in seen or (name in zoo.ZOO and per_op.get(node.target, 0) >= ZOO_SHAPES_PER_OP):
                continue
            seen.add(sig)
            per_op[node.target] = per_op.get(node.target, 0) + 1
            full = _inputs(node, gen)
            ref_in = [t.clone().requires_grad_(_grad(node, k, t)) for k, t in enumerate(full)]
            ref = _outs(_call(node, ref_in, "", None))
            weights = [torch.randn(r.shape, generator=gen) for r in ref]
            grads_ref = _ref_grads(ref, ref_in, weights)
            for shape, mesh in meshes.items():
                ctx = MeshContext(mesh)
                for s in rules.strategies(node, shape):
                    try:
                        problem = _check_one(node, s, full, ref, weights, grads_ref, mesh, ctx)
                    except Exception as exc:  # a rule DTensor cannot execute is a wrong rule
                        problem = f"raised {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                    checked[str(node.target)] = checked.get(str(node.target), 0) + 1
                    if problem:
                        failures.append(
                            f"{name}:{node.name} {node.target} on {shape} {short(s.out)} <- "
                            f"{[short(i) for i in s.ins]}: {problem}"
                        )
    return {"checked": checked, "failures": failures}


def _ref_grads(ref, ref_in, weights):
    if not any(t.requires_grad for t in ref_in) or not all(r.requires_grad for r in ref):
        return None
    loss = sum((r.float() * w).sum() for r, w in zip(ref, weights))
    loss.backward()
    return [t.grad if t.requires_grad else None for t in ref_in]


def _check_one(node, s, full, ref, weights, grads_ref, mesh, ctx) -> str:
    leaves = [
        to_dtensor(t, no_partial(spec), mesh).requires_grad_(_grad(node, k, t))
        for k, (t, spec) in enumerate(zip(full, s.ins))
    ]
    ins = [reshard(x, short(spec)) if spec != no_partial(spec) else x for x, spec in zip(leaves, s.ins)]
    with CommDebugMode() as comm:
        out = _outs(_call(node, ins, short(s.out), ctx))
    inner = rules.INNER_COLLECTIVES.get(node.target)
    declared = len(inner(node, s, tuple(mesh.shape))) if inner else 0
    if comm.get_total_counts() != declared:
        return f"communicated {dict(comm.get_comm_counts())}, declared {declared} collectives"
    for o, r in zip(out, ref):
        if not isinstance(o, DTensor):
            return f"output is {type(o).__name__}, not a DTensor"
        if [(type(p), p) for p in o.placements] != [(type(p), p) for p in s.out]:
            return f"placements {o.placements} != planned {s.out}"
        if not _close(o.redistribute(mesh, no_partial(s.out)).full_tensor(), r):
            return "values differ from single device"
    if grads_ref is None:
        return ""
    # the gradient arrives as the plan prices it: in the output's layout, made whole
    grad_outs = [to_dtensor(w.to(o.dtype), no_partial(s.out), mesh) for o, w in zip(out, weights)]
    wanted = [k for k, t in enumerate(full) if _grad(node, k, t)]
    with CommDebugMode() as comm:
        grads = torch.autograd.grad(out, [ins[k] for k in wanted], grad_outs, allow_unused=True)
    if comm.get_total_counts():
        return f"backward communicated {dict(comm.get_comm_counts())}"
    for k, g in zip(wanted, grads):
        if g is None:
            if grads_ref[k] is not None and grads_ref[k].any():
                return f"input {k} has no gradient; on one device it has one"
            continue
        if tuple(g.placements) != grad_spec(s, k):
            return f"input {k}'s gradient is {short(g.placements)}, priced as {short(grad_spec(s, k))}"
        if not _close(g.full_tensor(), grads_ref[k]):
            return f"input {k}'s gradient differs from single device"
    return ""


@pytest.fixture(scope="module")
def results() -> dict:
    return run_on_mesh(check_all_rules)


def test_every_strategy_matches_single_device(results):
    assert results["failures"] == []


@pytest.mark.parametrize(
    "family,ops",
    [
        ("matmul", rules.matmul.OPS[:4] + (torch.ops.aten.matmul.default,)),
        (
            "elementwise",
            (
                torch.ops.aten.add.Tensor,
                torch.ops.aten.mul.Tensor,
                torch.ops.aten.gelu.default,
                torch.ops.aten.dropout.default,
                torch.ops.aten.sub.Tensor,
                torch.ops.aten.div.Tensor,
            ),
        ),
        (
            "views",
            (
                torch.ops.aten.transpose.int,
                torch.ops.aten.reshape.default,
                torch.ops.aten.permute.default,
                torch.ops.aten.unsqueeze.default,
                torch.ops.aten.expand.default,
                torch.ops.aten.t.default,
            ),
        ),
        (
            "reductions",
            (
                torch.ops.aten.sum.dim_IntList,
                torch.ops.aten.mean.dim,
                torch.ops.aten.softmax.int,
                torch.ops.aten.log_softmax.int,
            ),
        ),
        ("norms", (torch.ops.aten.layer_norm.default,)),
        (
            "lookup",
            (
                torch.ops.aten.embedding.default,
                torch.ops.aten.gather.default,
                torch.ops.aten.index.Tensor,
                torch.ops.aten.one_hot.default,
            ),
        ),
        (
            "conv",
            (
                torch.ops.aten.conv2d.default,
                torch.ops.aten.max_pool2d.default,
                torch.ops.aten.adaptive_avg_pool2d.default,
            ),
        ),
        ("einsum", (torch.ops.aten.einsum.default,)),
        ("copy", (torch.ops.aten.copy_.default,)),
        ("attention", (torch.ops.aten.scaled_dot_product_attention.default,)),
        (
            "loss",
            (
                torch.ops.aten.cross_entropy_loss.default,
                torch.ops.aten.binary_cross_entropy_with_logits.default,
            ),
        ),
        ("creation", (torch.ops.aten.arange.default, torch.ops.aten.new_ones.default)),
        ("fallback", (torch.ops.aten.erfinv.default,)),
        (
            "along_dim",
            (
                torch.ops.aten.cumsum.default,
                torch.ops.aten.cat.default,
                torch.ops.aten.pad.default,
                torch.ops.aten.diff.default,
                torch.ops.aten.topk.default,
            ),
        ),
    ],
)
def test_each_family_was_exercised(results, family, ops):
    missing = [str(op) for op in ops if results["checked"].get(str(op), 0) == 0]
    assert not missing, (
        f"{family}: no strategy of {missing} was executed (op names seen: {sorted(results['checked'])})"
    )
