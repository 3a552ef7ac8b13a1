"""Fused kernels (``autopar.runtime.kernels``): the Triton kernels, interpreted on CPU
(``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` without CUDA), have the numbers of their torch
references and of the plain torch ops, forward and backward; backend selection fails loudly."""

from __future__ import annotations

import subprocess
import sys
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from autopar.errors import KernelError
from autopar.runtime import kernels
from autopar.runtime.kernels import adamw, cross_entropy, gelu, norms, resolve, triton_runs_on

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# a few ulps: the interpreter's fp32 -> bf16/fp16 rounding can differ from torch's by one
TOL = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 4e-3, "atol": 4e-3},
    torch.bfloat16: {"rtol": 3e-2, "atol": 3e-2},
}
FEW = settings(max_examples=10, deadline=None)

leading_dims = st.lists(st.integers(1, 3), min_size=1, max_size=3)
widths = st.integers(1, 300)
seeds = st.integers(0, 2**31 - 1)  # for torch's random numbers


@pytest.fixture(scope="module")
def triton_ok() -> None:
    pytest.importorskip("triton", reason="the Triton kernels need triton (pip install triton)")
    if not triton_runs_on(DEVICE):
        pytest.skip("Triton needs CUDA, or TRITON_INTERPRET=1 on CPU (tests/conftest.py sets it)")


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    """``actual`` matches ``expected`` to a few ulps of ``dtype``, the absolute tolerance times ``scale``:
    the square root of the rows for a sum over rows (a bias or weight gradient), times a norm's largest
    ``rstd`` (rounding errors in ``x - mean`` are multiplied by it)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    tol = TOL[dtype]
    torch.testing.assert_close(actual, expected, rtol=tol["rtol"], atol=tol["atol"] * scale)


def _input(leading: list[int], width: int, dtype: torch.dtype, contiguous: bool = True) -> torch.Tensor:
    if contiguous:
        x = torch.randn(*leading, width, device=DEVICE)
    else:
        x = torch.randn(width, *leading, device=DEVICE).movedim(0, -1)
    return x.to(dtype).requires_grad_()


def _grads(out: torch.Tensor, inputs: list[torch.Tensor | None], grad_out: torch.Tensor) -> list:
    wanted = [t for t in inputs if t is not None]
    return list(torch.autograd.grad(out, wanted, grad_out))


def _exact(op, inputs: list[torch.Tensor | None], grad_out: torch.Tensor) -> tuple[torch.Tensor, list]:
    """``op``'s output and input gradients in float64 from the same (rounded) inputs: the numbers a
    kernel with fp32 math should match to a few ulps of the inputs' dtype. (Torch's own fp16 ops can
    be further off, e.g. ``layer_norm``'s backward on CPU over 2 columns.)"""
    wide = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    out = op(*wide)
    return out, _grads(out, wide, grad_out.double())


def _close_exact(actual: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    _close(actual, exact.to(actual.dtype), dtype, scale)


# --- backend selection --------------------------------------------------------------------------


def test_unknown_backend_is_a_kernel_error() -> None:
    with pytest.raises(KernelError, match="unknown backend 'cuda'"):
        resolve("cuda", torch.device("cpu"), "bias_gelu")
    with pytest.raises(KernelError, match="bias_gelu: unknown backend"):
        gelu.bias_gelu(torch.randn(2, 3), None, backend="fast")


def test_triton_on_cpu_without_interpreter_is_a_kernel_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "INTERPRETED", False)
    with pytest.raises(KernelError, match="backend='triton' cannot run here"):
        resolve("triton", torch.device("cpu"), "layer_norm")
    with pytest.raises(KernelError, match="layer_norm: backend='triton'"):
        norms.layer_norm(torch.randn(2, 3), None, None, 1e-5, backend="triton")
    assert resolve("auto", torch.device("cpu"), "layer_norm") == "torch"


def test_without_triton_auto_runs_torch_and_triton_says_not_installed() -> None:
    script = """
import sys
sys.modules["triton"] = None  # import triton fails, find_spec finds nothing
import torch, torch.nn.functional as F
from autopar.errors import KernelError
from autopar.runtime.kernels import adamw, cross_entropy, gelu, norms
x = torch.randn(3, 8)
assert torch.equal(gelu.bias_gelu(x, None), F.gelu(x))
assert torch.equal(norms.layer_norm(x, None, None, 1e-5), F.layer_norm(x, (8,), None, None, 1e-5))
assert torch.equal(cross_entropy.row_max(x), x.amax(-1))
try:
    norms.rms_norm(x, None, 1e-6, backend="triton")
except KernelError as e:
    assert "triton is not installed" in str(e), e
else:
    raise AssertionError("backend='triton' ran without triton")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# --- bias + GELU --------------------------------------------------------------------------------


@pytest.mark.usefixtures("triton_ok")
@FEW
@given(
    leading=leading_dims,
    width=widths,
    dtype=st.sampled_from(DTYPES),
    approximate=st.sampled_from(gelu.APPROXIMATIONS),
    bias_kind=st.sampled_from(["none", "same", "fp32"]),
    seed=seeds,
)
def test_bias_gelu_matches_torch(leading, width, dtype, approximate, bias_kind, seed) -> None:
    torch.manual_seed(seed)
    x = _input(leading, width, dtype)
    bias = None
    if bias_kind != "none":
        bias = torch.randn(width, device=DEVICE, dtype=dtype if bias_kind == "same" else torch.float32)
        bias.requires_grad_()

    def op(x, bias):
        return F.gelu(x if bias is None else x + bias, approximate=approximate)

    plain = op(x, bias)
    grad_out = torch.randn_like(plain)
    plain_grads = _grads(plain, [x, bias], grad_out)
    exact, exact_grads = _exact(op, [x, bias], grad_out)
    scale = (x.numel() // width) ** 0.5
    out = gelu.bias_gelu(x, bias, approximate, backend="triton")
    got = _grads(out, [x, bias], grad_out)
    assert out.dtype == plain.dtype
    _close_exact(out, exact, dtype)
    for g, e, p in zip(got, exact_grads, plain_grads, strict=True):
        assert g.dtype == p.dtype
        _close_exact(g, e, dtype, scale)
    if dtype == torch.float32:
        _close(out, plain, dtype)
        for g, p in zip(got, plain_grads):
            _close(g, p, dtype, scale)
    reference = gelu.bias_gelu(x, bias, approximate, backend="torch")
    assert torch.equal(reference, plain)
    for g, p in zip(_grads(reference, [x, bias], grad_out), plain_grads):
        _close(g, p, dtype, scale)


@pytest.mark.usefixtures("triton_ok")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bias_gelu_saves_only_its_inputs(backend: str) -> None:
    x = torch.randn(4, 33, device=DEVICE, requires_grad=True)
    bias = torch.randn(33, device=DEVICE, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = gelu.bias_gelu(x, bias, backend=backend)
    assert len(saved) == 2 and saved[0] is x and saved[1] is bias
    out.sum().backward()
    assert x.grad is not None and bias.grad is not None


# --- LayerNorm and RMSNorm ----------------------------------------------------------------------


@pytest.mark.usefixtures("triton_ok")
@FEW
@given(
    leading=leading_dims,
    # width 1 normalizes to exactly 0; torch's rounding noise there is amplified by 1/sqrt(eps)
    width=st.integers(2, 300),
    dtype=st.sampled_from(DTYPES),
    affine=st.sampled_from([(True, True), (True, False), (False, True), (False, False)]),
    contiguous=st.booleans(),
    narrow_blocks=st.booleans(),
    seed=seeds,
)
def test_layer_norm_matches_torch(leading, width, dtype, affine, contiguous, narrow_blocks, seed) -> None:
    torch.manual_seed(seed)
    x = _input(leading, width, dtype, contiguous)
    weight = torch.randn(width, device=DEVICE, dtype=dtype).requires_grad_() if affine[0] else None
    bias = torch.randn(width, device=DEVICE, dtype=dtype).requires_grad_() if affine[1] else None
    plain = F.layer_norm(x, (width,), weight, bias, 1e-5)
    grad_out = torch.randn_like(plain)
    exact, exact_grads = _exact(
        lambda *t: F.layer_norm(t[0], (width,), *t[1:], 1e-5), [x, weight, bias], grad_out
    )
    rstd = (x.detach().double().var(-1, unbiased=False) + 1e-5).rsqrt().max().item()
    scale = (x.numel() // width) ** 0.5 * max(1.0, rstd)
    # narrow blocks make rows of more than 16 columns loop over several column blocks
    with mock.patch.object(norms, "_MAX_BLOCK_COLS", 16 if narrow_blocks else norms._MAX_BLOCK_COLS):
        out = norms.layer_norm(x, weight, bias, 1e-5, backend="triton")
        got = _grads(out, [x, weight, bias], grad_out)
    assert out.dtype == plain.dtype
    assert [g.dtype for g in got] == [t.dtype for t in (x, weight, bias) if t is not None]
    _close_exact(out, exact, dtype, scale)
    for g, e in zip(got, exact_grads, strict=True):
        _close_exact(g, e, dtype, scale)
    if dtype == torch.float32:
        _close(out, plain, dtype, scale)
        for g, p in zip(got, _grads(plain, [x, weight, bias], grad_out)):
            _close(g, p, dtype, scale)
    assert torch.equal(norms.layer_norm(x, weight, bias, 1e-5, backend="torch"), plain)


def _hf_rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """HuggingFace LlamaRMSNorm.forward, verbatim."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = h.to(x.dtype)
    return weight * out if weight is not None else out


@pytest.mark.usefixtures("triton_ok")
@FEW
@given(
    leading=leading_dims,
    width=widths,
    dtype=st.sampled_from(DTYPES),
    weight_kind=st.sampled_from(["none", "same", "fp32"]),
    contiguous=st.booleans(),
    narrow_blocks=st.booleans(),
    seed=seeds,
)
def test_rms_norm_matches_huggingface(
    leading, width, dtype, weight_kind, contiguous, narrow_blocks, seed
) -> None:
    torch.manual_seed(seed)
    x = _input(leading, width, dtype, contiguous)
    weight = None
    if weight_kind != "none":
        weight = torch.randn(width, device=DEVICE, dtype=dtype if weight_kind == "same" else torch.float32)
        weight.requires_grad_()
    plain = _hf_rms_norm(x, weight, 1e-6)
    grad_out = torch.randn_like(plain)
    exact, exact_grads = _exact(lambda x, w: _hf_rms_norm(x, w, 1e-6), [x, weight], grad_out)
    rstd = (x.detach().double().pow(2).mean(-1) + 1e-6).rsqrt().max().item()
    scale = (x.numel() // width) ** 0.5 * max(1.0, rstd)
    with mock.patch.object(norms, "_MAX_BLOCK_COLS", 16 if narrow_blocks else norms._MAX_BLOCK_COLS):
        out = norms.rms_norm(x, weight, 1e-6, backend="triton")
        got = _grads(out, [x, weight], grad_out)
    assert out.dtype == plain.dtype
    assert [g.dtype for g in got] == [t.dtype for t in (x, weight) if t is not None]
    # in x's dtype's ulps: HF rounds the normalized row to x's dtype before the weight
    _close_exact(out, exact, dtype, scale)
    for g, e in zip(got, exact_grads, strict=True):
        _close_exact(g, e, dtype, scale)
    if dtype == torch.float32:
        _close(out, plain, dtype, scale)
        for g, p in zip(got, _grads(plain, [x, weight], grad_out)):
            _close(g, p, dtype, scale)
    assert torch.equal(norms.rms_norm(x, weight, 1e-6, backend="torch"), plain)


# --- vocabulary-parallel cross-entropy ----------------------------------------------------------


def _vocab_parallel(logits, target, grad_rows, bounds, backend):
    """Loss and logits' gradient from the local pieces on the shards ``logits[:, lo:hi]``, combined
    as the caller's all-reduces would: max of the row maxima, sums of sumexp and target logits."""
    shards = [(lo, logits[:, lo:hi]) for lo, hi in zip(bounds, bounds[1:])]
    global_max = torch.stack([cross_entropy.row_max(s, backend) for _, s in shards]).amax(0)
    pieces = [cross_entropy.sumexp_and_target(s, global_max, target, lo, backend) for lo, s in shards]
    sumexp = sum(p[0] for p in pieces)
    target_logit = sum(p[1] for p in pieces)
    kept = target != -100
    loss = torch.where(kept, torch.log(sumexp) + global_max - target_logit, 0.0)
    grad_loss = torch.where(kept, grad_rows, 0.0)
    grads = [
        cross_entropy.logits_grad(s, global_max, sumexp, target, lo, grad_loss, backend) for lo, s in shards
    ]
    return loss, torch.cat(grads, dim=1)


@pytest.mark.usefixtures("triton_ok")
@FEW
@given(
    n=st.integers(1, 8),
    vocab=st.integers(3, 500),
    dtype=st.sampled_from(DTYPES),
    cuts=st.lists(st.floats(0.05, 0.95), max_size=2, unique=True),
    narrow_blocks=st.booleans(),
    data=st.data(),
    seed=seeds,
)
def test_cross_entropy_pieces_compose_to_f_cross_entropy(
    n, vocab, dtype, cuts, narrow_blocks, data, seed
) -> None:
    torch.manual_seed(seed)
    bounds = sorted({0, vocab, *(int(c * vocab) for c in cuts)})
    logits = (3 * torch.randn(n, vocab, device=DEVICE)).to(dtype)
    target = torch.tensor(data.draw(st.lists(st.integers(-1, vocab - 1), min_size=n, max_size=n)))
    target = torch.where(target < 0, -100, target).to(DEVICE)  # -1 drawn: an ignored row
    grad_rows = torch.randn(n, device=DEVICE)
    reference = logits.float().requires_grad_()
    expected_loss = F.cross_entropy(reference, target, reduction="none", ignore_index=-100)
    (expected_grad,) = torch.autograd.grad(expected_loss, reference, grad_rows)
    with mock.patch.object(cross_entropy, "_MAX_BLOCK_VOCAB", 64 if narrow_blocks else 4096):
        loss, grad = _vocab_parallel(logits, target, grad_rows, bounds, "triton")
    torch_loss, torch_grad = _vocab_parallel(logits, target, grad_rows, bounds, "torch")
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch_loss, expected_loss, rtol=1e-5, atol=1e-5)
    _close(grad, expected_grad.to(dtype), dtype)
    _close(torch_grad, expected_grad.to(dtype), dtype)


@pytest.mark.usefixtures("triton_ok")
def test_sumexp_and_target_picks_only_local_targets() -> None:
    logits = torch.arange(12, dtype=torch.float32, device=DEVICE).view(2, 6)
    target = torch.tensor([7, 2], device=DEVICE)  # row 0: local column 1 of the shard at 6; row 1: elsewhere
    for backend in ("torch", "triton"):
        sumexp, target_logit = cross_entropy.sumexp_and_target(
            logits, torch.zeros(2, device=DEVICE), target, 6, backend
        )
        assert target_logit.tolist() == [1.0, 0.0]
        torch.testing.assert_close(sumexp, logits.exp().sum(-1))


# --- AdamW --------------------------------------------------------------------------------------


@pytest.mark.usefixtures("triton_ok")
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adamw_step_matches_torch_adamw(backend: str, weight_decay: float, dtype: torch.dtype) -> None:
    shapes = [(37,), (5, 3), (1,), (1029,)]
    torch.manual_seed(0)
    start = [torch.randn(s, device=DEVICE).to(dtype) for s in shapes]
    reference = [p.clone().requires_grad_() for p in start]
    optimizer = torch.optim.AdamW(
        reference, lr=0.1, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay, foreach=False
    )
    params = [p.clone() for p in start]
    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    for step in range(1, 5):
        grads = [torch.randn_like(p) for p in params]
        for r, g in zip(reference, grads):
            r.grad = g.clone()
        optimizer.step()
        adamw.adamw_step(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            step=step,
            lr=0.1,
            beta1=0.9,
            beta2=0.95,
            eps=1e-8,
            weight_decay=weight_decay,
            backend=backend,
        )
    for p, m, v, r in zip(params, exp_avgs, exp_avg_sqs, reference):
        _close(p, r.detach(), dtype)
        _close(m, optimizer.state[r]["exp_avg"], dtype)
        _close(v, optimizer.state[r]["exp_avg_sq"], dtype)
