"""The matmul family, described by einsum equations (mm, bmm, addmm, linear, matmul, einsum).

Each dimension letter is classed by where it appears: in the output and both operands
(batch), in the output and one operand (free), in both operands but not the output
(contracting). One-axis options: replicate everything; shard a batch or free letter in the
operands that carry it and in the output; shard a contracting letter in both operands,
giving a partial-sum output; or pass one operand's partial sum through (the op is linear in
each operand). A bias is aligned to the output's trailing dims. The family runs on local shards
(``runtime.local_ops``), so any letter may be sharded, by any mesh axes.
"""

from __future__ import annotations

import string

import torch.fx as fx
from torch.distributed.tensor import Partial, Replicate, Shard

from autopar.solver.rules.base import Option, RuleFn, shape

aten = __import__("torch").ops.aten
R = Replicate()
P = Partial()


def equation(node: fx.Node) -> tuple[str, str, str]:
    """(lhs letters, rhs letters, output letters) for the node's two matrix operands."""
    op = node.target
    if op is aten.einsum.default:
        inputs, out = node.args[0].replace(" ", "").split("->")
        lhs, rhs = inputs.split(",")
        return lhs, rhs, out
    if op is aten.linear.default:
        n = len(shape(node.args[0]))
        batch = string.ascii_lowercase[: n - 1]
        return batch + "k", "nk", batch + "n"
    a, b = _operands(node)
    na, nb = len(shape(a)), len(shape(b))
    if na == 2 and nb == 2:
        return "mk", "kn", "mn"
    if nb == 2:
        batch = string.ascii_lowercase[: na - 2].replace("k", "z")
        return batch + "mk", "kn", batch + "mn"
    if na == nb:
        batch = "abcdefg"[: na - 2]
        return batch + "mk", batch + "kn", batch + "mn"
    raise NotImplementedError(f"matmul of ranks {na} and {nb}")


def _operands(node: fx.Node) -> tuple[fx.Node, fx.Node]:
    if node.target is aten.addmm.default:
        return node.args[1], node.args[2]
    if node.target is aten.einsum.default:
        return node.args[1][0], node.args[1][1]
    return node.args[0], node.args[1]


def _bias(node: fx.Node) -> fx.Node | None:
    if node.target is aten.addmm.default:
        return node.args[0]
    if node.target is aten.linear.default and len(node.args) > 2 and isinstance(node.args[2], fx.Node):
        return node.args[2]
    return None


def einsum_supported(node: fx.Node) -> bool:
    """Two operands, explicit output, no ellipsis, no letter repeated within an operand."""
    eq = node.args[0].replace(" ", "")
    if len(node.args[1]) != 2 or "->" not in eq or "." in eq:
        return False
    return all(len(set(part)) == len(part) for part in eq.replace("->", ",").split(","))


def matmul_options(node: fx.Node) -> list[Option]:
    lhs, rhs, out = equation(node)
    bias = _bias(node)
    out_shape = shape(node)

    def opt(out_p, a_p, b_p, bias_p) -> Option:
        if node.target is aten.addmm.default:
            return Option(out_p, (bias_p, a_p, b_p))
        return Option(out_p, (a_p, b_p) + ((bias_p,) if bias is not None else ()))

    def bias_shard(out_dim: int):
        if bias is None:
            return R
        bshape = shape(bias)
        d = out_dim - (len(out_shape) - len(bshape))
        return Shard(d) if d >= 0 and bshape[d] == out_shape[out_dim] else R

    options = [opt(R, R, R, R)]
    for letter in dict.fromkeys(lhs + rhs):
        a_p = Shard(lhs.index(letter)) if letter in lhs else R
        b_p = Shard(rhs.index(letter)) if letter in rhs else R
        if letter in out:
            o = out.index(letter)
            options.append(opt(Shard(o), a_p, b_p, bias_shard(o)))
        else:
            options.append(opt(P, a_p, b_p, P))
    options.append(opt(P, P, R, P))
    options.append(opt(P, R, P, P))
    return options


def matmul_flops(node: fx.Node) -> float:
    lhs, rhs, out = equation(node)
    a, _ = _operands(node)
    contracting = 1
    for letter in lhs:
        if letter in rhs and letter not in out:
            contracting *= shape(a)[lhs.index(letter)]
    n_out = 1
    for s in shape(node):
        n_out *= s
    return 2.0 * n_out * contracting


OPS = (
    aten.mm.default,
    aten.bmm.default,
    aten.addmm.default,
    aten.linear.default,
    aten.matmul.default,
    aten.einsum.default,
)
RULES: dict[object, RuleFn] = {op: matmul_options for op in OPS}
FLOPS = {op: matmul_flops for op in OPS}
#: Other einsums (ellipsis, three operands, repeated letters) take the fallback path.
SUPPORTED = {aten.einsum.default: einsum_supported}
