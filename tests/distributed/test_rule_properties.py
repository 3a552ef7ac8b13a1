"""Property tests for the rule families added for the model zoo, on 4 gloo ranks.

hypothesis draws an op's shapes and arguments (convolution and pooling, lookups, top-k and
sort, two-operand einsum, binary cross entropy), builds the one-op fx node, and draws
strategies from what the rules offer on meshes (4,) and (2, 2). Each drawn strategy is
executed as the emitted module would run it and must match the single-device op in values
and input gradients, with no communication inside the op (``test_rules._check_one``).

Examples are derandomized so every rank draws the same ones (the checks gather tensors).
"""

from __future__ import annotations

import string

import pytest
import torch
import torch.fx as fx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.distributed.device_mesh import init_device_mesh

from autopar.runtime.layout import MeshContext
from autopar.solver import rules
from autopar.solver.specs import short
from tests.distributed.harness import run_on_mesh
from tests.distributed.test_rules import _call, _check_one, _inputs, _outs, _ref_grads

aten = torch.ops.aten
SIZES = st.sampled_from([2, 4])
SETTINGS = settings(
    max_examples=8,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
STRATEGIES_PER_MESH = 6


def _node(op, args: tuple, tensors: dict[int, tuple[tuple[int, ...], torch.dtype]], kwargs=None) -> fx.Node:
    """A graph holding ``op(*args)`` where ``args[i]`` for ``i`` in ``tensors`` is a placeholder
    of that shape and dtype (a list of them for a tuple entry); ``meta["val"]`` on meta tensors."""
    graph = fx.Graph()
    counter = iter(range(100))

    def placeholder(shape, dtype):
        p = graph.placeholder(f"x{next(counter)}")
        p.meta["val"] = torch.empty(shape, dtype=dtype, device="meta")
        return p

    built = []
    for i, a in enumerate(args):
        if i not in tensors:
            built.append(a)
        elif isinstance(tensors[i], list):
            built.append([None if t is None else placeholder(*t) for t in tensors[i]])
        else:
            built.append(placeholder(*tensors[i]))
    node = graph.call_function(op, tuple(built), kwargs or {})
    metas = fx.node.map_arg(tuple(built), lambda n: n.meta["val"])
    node.meta["val"] = op(*metas, **(kwargs or {}))
    return node


@st.composite
def conv_nodes(draw):
    b, cin, hw = draw(SIZES), draw(SIZES), draw(st.sampled_from([4, 6]))
    kind = draw(st.sampled_from(["conv", "grouped", "max_pool", "avg_pool"]))
    x = ((b, cin, hw, hw), torch.float32)
    if kind in ("conv", "grouped"):
        groups = cin if kind == "grouped" else 1
        cout = cin * draw(SIZES) if kind == "grouped" else draw(SIZES)
        k, stride, pad = (
            draw(st.sampled_from([1, 3])),
            draw(st.sampled_from([1, 2])),
            draw(st.sampled_from([0, 1])),
        )
        w = ((cout, cin // groups, k, k), torch.float32)
        bias = ((cout,), torch.float32) if draw(st.booleans()) else None
        tensors = {0: x, 1: w} | ({2: bias} if bias else {})
        args = (0, 1, 2 if bias else None, [stride, stride], [pad, pad], [1, 1], groups)
        return _node(aten.conv2d.default, args, tensors)
    if kind == "max_pool":
        return _node(aten.max_pool2d.default, (0, [2, 2], [2, 2]), {0: x})
    return _node(aten.adaptive_avg_pool2d.default, (0, [draw(st.sampled_from([1, 2])), 2]), {0: x})


@st.composite
def lookup_nodes(draw):
    kind = draw(st.sampled_from(["embedding", "gather", "index", "one_hot"]))
    if kind == "embedding":
        idx = tuple(draw(st.lists(SIZES, min_size=1, max_size=2)))
        weight = ((draw(st.sampled_from([4, 8])), draw(SIZES)), torch.float32)
        return _node(aten.embedding.default, (0, 1), {0: weight, 1: (idx, torch.int64)})
    if kind == "gather":
        table = tuple(draw(st.lists(SIZES, min_size=2, max_size=3)))
        dim = draw(st.integers(0, len(table) - 1))
        index = tuple(s if d == dim else draw(st.sampled_from([s, s // 2])) for d, s in enumerate(table))
        return _node(aten.gather.default, (0, dim, 2), {0: (table, torch.float32), 2: (index, torch.int64)})
    if kind == "index":
        shape = tuple(draw(st.lists(SIZES, min_size=2, max_size=3)))
        used = draw(st.lists(st.booleans(), min_size=len(shape), max_size=len(shape)).filter(any))
        n = draw(SIZES)
        idx = [((n,), torch.int64) if u else None for u in used]
        while idx and idx[-1] is None:
            idx.pop()
        return _node(aten.index.Tensor, (0, 1), {0: (shape, torch.float32), 1: idx})
    shape = tuple(draw(st.lists(SIZES, min_size=1, max_size=2)))
    return _node(aten.one_hot.default, (0, draw(st.sampled_from([4, 6]))), {0: (shape, torch.int64)})


@st.composite
def along_dim_nodes(draw):
    shape = tuple(draw(st.lists(SIZES, min_size=1, max_size=3)))
    dim = draw(st.integers(0, len(shape) - 1))
    x = {0: (shape, torch.float32)}
    if draw(st.booleans()):
        return _node(aten.topk.default, (0, draw(st.integers(1, shape[dim])), dim), x)
    return _node(aten.sort.default, (0, dim), x)


@st.composite
def einsum_nodes(draw):
    letters = string.ascii_lowercase[:5]
    size = {c: draw(SIZES) for c in letters}
    lhs = "".join(draw(st.permutations(letters))[: draw(st.integers(1, 3))])
    rhs = "".join(draw(st.permutations(letters))[: draw(st.integers(1, 3))])
    both = set(lhs) & set(rhs)
    keep = [c for c in dict.fromkeys(lhs + rhs) if c not in both or draw(st.booleans())]
    out = "".join(draw(st.permutations(keep))) if keep else ""
    tensors = {
        1: [(tuple(size[c] for c in lhs), torch.float32), (tuple(size[c] for c in rhs), torch.float32)]
    }
    return _node(aten.einsum.default, (f"{lhs},{rhs}->{out}", 1), tensors)


@st.composite
def bce_nodes(draw):
    shape = tuple(draw(st.lists(SIZES, min_size=1, max_size=2)))
    args = (0, 1, None, None, draw(st.sampled_from([0, 1, 2])))
    return _node(
        aten.binary_cross_entropy_with_logits.default,
        args,
        {0: (shape, torch.float32), 1: (shape, torch.float32)},
    )


FAMILIES = {
    "conv": conv_nodes(),
    "lookup": lookup_nodes(),
    "along_dim": along_dim_nodes(),
    "einsum": einsum_nodes(),
    "bce": bce_nodes(),
}


def _check_node(node: fx.Node, meshes: dict, gen: torch.Generator, data) -> list[str]:
    full = _inputs(node, gen)
    ref_in = [t.clone().requires_grad_(t.is_floating_point()) for t in full]
    ref = _outs(_call(node, ref_in, "", None))
    weights = [torch.randn(r.shape, generator=gen) for r in ref]
    grads_ref = _ref_grads(ref, ref_in, weights)
    failures = []
    for shape, mesh in meshes.items():
        options = rules.strategies(node, shape)
        picks = data.draw(st.lists(st.sampled_from(options), max_size=STRATEGIES_PER_MESH, unique=True))
        for s in picks:
            try:
                problem = _check_one(node, s, full, ref, weights, grads_ref, mesh, MeshContext(mesh))
            except Exception as exc:
                problem = f"raised {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            if problem:
                ins = [short(i) for i in s.ins]
                failures.append(f"{node.format_node()} on {shape} {short(s.out)} <- {ins}: {problem}")
    return failures


def check_properties() -> dict:
    meshes = {shape: init_device_mesh("cpu", shape) for shape in ((4,), (2, 2))}
    out = {}
    for family, nodes in FAMILIES.items():
        out[family] = _run_family(nodes, meshes)
    return out


def _run_family(nodes, meshes: dict) -> dict:
    gen = torch.Generator().manual_seed(0)
    seen = {"examples": 0}

    @SETTINGS
    @given(node=nodes, data=st.data())
    def prop(node, data):
        seen["examples"] += 1
        assert rules.has_rule(node), node.target
        failures = _check_node(node, meshes, gen, data)
        assert not failures, failures

    try:
        prop()
    except AssertionError as exc:
        return {"failure": str(exc)[:3000], "examples": seen["examples"]}
    return {"failure": None, "examples": seen["examples"]}


@pytest.fixture(scope="module")
def results() -> dict:
    return run_on_mesh(check_properties)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_rule_family_matches_single_device(results, family):
    assert results[family]["failure"] is None, results[family]["failure"]
    assert results[family]["examples"] >= 8
