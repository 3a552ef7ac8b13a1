"""The fused kernels on a CUDA device, at model-like sizes, against eager torch: the Triton
kernels (``autopar.runtime.kernels``), the CUDA C++ extension (``cuda_ext/``) and
``autopar.optim.AdamW``. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from autopar.errors import KernelError
from autopar.optim import AdamW
from autopar.runtime.kernels import adamw, cross_entropy, cuda_ext, gelu, norms

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CUDA = torch.device("cuda")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# torch's own half-precision ops round in their dtype at every step, the kernels once in fp32
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
    torch.bfloat16: dict(rtol=4e-2, atol=4e-2),
}
SHAPES = [(4096, 1024), (1000, 4097), (3, 5, 7), (50_257,), (1,), (21_000_001,)]  # odd; the last > 320 chunks
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)


@pytest.fixture(scope="module")
def ext():
    """The CUDA C++ extension; skipped only where no nvcc can build it (a compile error fails)."""
    try:
        return cuda_ext.load()
    except KernelError as exc:
        if "nvcc not found" in str(exc):
            pytest.skip(str(exc))
        raise


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """Gradients of ``inputs`` for a seeded output gradient of ``dtype``'s precision (the
    kernel's dtype, so the fp32 reference sees the same numbers)."""
    g = torch.randn(out.shape, device=out.device, generator=torch.Generator(out.device).manual_seed(0))
    return list(torch.autograd.grad(out, inputs, g.to(dtype).to(out.dtype)))


def _leaf(*shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device=CUDA) * scale).to(dtype).requires_grad_()


def _fp32(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().float().requires_grad_() for t in ts]


def _close(actual: list[torch.Tensor], expected: list[torch.Tensor], dtype: torch.dtype, scale: float = 1.0):
    tol = TOL[dtype]
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a.float(), e.float(), rtol=tol["rtol"], atol=tol["atol"] * scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_triton_bias_gelu(dtype, approximate):
    x, b = _leaf(8, 512, 3072, dtype=dtype), _leaf(3072, dtype=dtype)
    out = gelu.bias_gelu(x, b, approximate, backend="triton")
    xr, br = _fp32([x, b])
    ref = F.gelu(xr + br, approximate=approximate)
    _close([out], [ref], dtype)
    _close(_grads(out, [x, b], dtype), _grads(ref, [xr, br], dtype), dtype, scale=64)  # dbias sums 4096 rows


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [768, 4099, 8192])
def test_triton_norms(dtype, width):
    x, w, b = _leaf(2048, width, dtype=dtype), _leaf(width, dtype=dtype), _leaf(width, dtype=dtype)
    xr, wr, br = _fp32([x, w, b])
    out = norms.layer_norm(x, w, b, 1e-5, backend="triton")
    ref = F.layer_norm(xr, (width,), wr, br, 1e-5)
    _close([out], [ref], dtype)
    _close(_grads(out, [x, w, b], dtype), _grads(ref, [xr, wr, br], dtype), dtype, scale=45)
    out = norms.rms_norm(x, w, 1e-6, backend="triton")
    ref = wr * (xr * torch.rsqrt(xr.pow(2).mean(-1, keepdim=True) + 1e-6))
    _close([out], [ref], dtype)
    _close(_grads(out, [x, w], dtype), _grads(ref, [xr, wr], dtype), dtype, scale=45)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_cross_entropy_pieces_on_two_vocab_shards(dtype):
    n, vocab = 1024, 50_257
    logits = (torch.randn(n, vocab, device=CUDA) * 4).to(dtype)
    target = torch.randint(0, vocab, (n,), device=CUDA)
    halves = [logits[:, : vocab // 2], logits[:, vocab // 2 :]]
    offsets = [0, vocab // 2]
    row_max = torch.stack([cross_entropy.row_max(h, "triton") for h in halves]).amax(0)
    pieces = [
        cross_entropy.sumexp_and_target(h, row_max, target, o, "triton") for h, o in zip(halves, offsets)
    ]
    sumexp, target_logit = (sum(p[i] for p in pieces) for i in range(2))
    loss = (torch.log(sumexp) + row_max - target_logit).mean()
    ref_logits = logits.float().requires_grad_()
    ref = F.cross_entropy(ref_logits, target)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    grad_loss = torch.full((n,), 1.0 / n, device=CUDA)
    grad = torch.cat(
        [
            cross_entropy.logits_grad(h, row_max, sumexp, target, o, grad_loss, "triton")
            for h, o in zip(halves, offsets)
        ],
        dim=1,
    )
    (ref_grad,) = torch.autograd.grad(ref, ref_logits)
    _close([grad], [ref_grad], dtype, scale=1e-3)  # entries are about 1/n


def _adamw_reference(shapes, dtype, steps: int, seed: int = 0):
    """Parameters, the per-step gradients, and torch.optim.AdamW's result on fp32 copies.
    Gradients are 0.5 to 1.5 in size: fp16 moments of smaller ones underflow (in torch too)."""
    g = torch.Generator(CUDA).manual_seed(seed)

    def grad(shape) -> torch.Tensor:
        size = torch.rand(shape, device=CUDA, generator=g) + 0.5
        return (size * torch.randn(shape, device=CUDA, generator=g).sign()).to(dtype)

    params = [torch.randn(s, device=CUDA, generator=g).to(dtype) for s in shapes]
    grads = [[grad(s) for s in shapes] for _ in range(steps)]
    ref = [nn.Parameter(p.float()) for p in params]
    opt = torch.optim.AdamW(ref, lr=HYPER["lr"], betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, foreach=True)
    for step_grads in grads:
        for r, gr in zip(ref, step_grads):
            r.grad = gr.float()
        opt.step()
    return params, grads, [r.detach() for r in ref]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", ["triton", "cuda_ext"])
def test_adamw_kernels(dtype, kernel, request):
    shapes = SHAPES if dtype == torch.float32 else SHAPES[:-1]
    shapes = shapes + [(17,)] * 40  # more tensors than one cuda_ext launch takes
    params, grads, expected = _adamw_reference(shapes, dtype, steps=3)
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    if kernel == "cuda_ext":
        request.getfixturevalue("ext")
    for step, step_grads in enumerate(grads, start=1):
        if kernel == "triton":
            adamw.adamw_step(params, step_grads, m, v, step=step, **HYPER, backend="triton")
        else:
            cuda_ext.cuda_adamw_step(params, step_grads, m, v, step=step, **HYPER)
    _close(params, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [1000, 4096, 8193])
@pytest.mark.parametrize("with_bias", [True, False])
def test_cuda_ext_layer_norm(ext, dtype, width, with_bias):
    x, w, b = _leaf(4, 517, width, dtype=dtype), _leaf(width, dtype=dtype), _leaf(width, dtype=dtype)
    bias = b if with_bias else None
    out = cuda_ext.cuda_layer_norm(x, w, bias, 1e-5)
    xr, wr, br = _fp32([x, w, b])
    ref = F.layer_norm(xr, (width,), wr, br if with_bias else None, 1e-5)
    _close([out], [ref], dtype)
    inputs, ref_inputs = ([x, w, b], [xr, wr, br]) if with_bias else ([x, w], [xr, wr])
    _close(
        _grads(out, inputs, dtype), _grads(ref, ref_inputs, dtype), dtype, scale=45
    )  # dweight, dbias sum 2068 rows


@pytest.mark.parametrize("backend", ["auto", "cuda_ext"])
def test_optim_adamw_on_cuda_with_offloaded_parameters(backend, request):
    """CUDA parameters step with the device kernel, host (offloaded) ones with the CPU Adam."""
    if backend == "cuda_ext":
        request.getfixturevalue("ext")
    devices = [CUDA, CUDA, "cpu", CUDA]
    shapes = [(1024, 1024), (4097,), (333, 129), (7,)]
    pa = [nn.Parameter(torch.randn(s, device=d)) for s, d in zip(shapes, devices)]
    pb = [nn.Parameter(p.detach().clone()) for p in pa]
    ours = AdamW(pa, lr=1e-2, weight_decay=0.1, backend=backend)
    theirs = torch.optim.AdamW(pb, lr=1e-2, weight_decay=0.1, foreach=True)
    for k in range(4):
        torch.manual_seed(k)
        for p, q in zip(pa, pb):
            p.grad = torch.randn(p.shape, device=p.device)
            q.grad = p.grad.clone()
        ours.step()
        theirs.step()
    _close(pa, pb, torch.float32)
    sd = ours.state_dict()
    assert sd["param_groups"][0].keys() == theirs.state_dict()["param_groups"][0].keys()
    assert [ours.state[p]["exp_avg"].device for p in pa] == [p.device for p in pa]
