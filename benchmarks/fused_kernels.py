"""Speed of the fused kernels against the eager torch they replace.

CPU: one AdamW step of ``--params-m`` million fp32 parameters in several tensors (an
offloaded optimizer state's step): ``autopar.optim.AdamW`` (the C++ CPU Adam) against
``torch.optim.AdamW(foreach=True)`` and ``(fused=True)``; median of ``--steps`` steps after
two warm-up steps, the optimizers taking turns. The C++ extension's build (or load from
cache) is timed apart.

CUDA (when there is a device): each kernel's achieved bandwidth, the bytes it must move over
its time (CUDA events, median of ``--iters`` calls), as a fraction of the device's HBM peak
from ``autopar.cost.hardware``, and its speed-up over the eager torch version: the Triton
bias_gelu, layer_norm, rms_norm (forward, backward), the cross-entropy pieces and adamw, and
the ``cuda_ext`` AdamW and LayerNorm where that extension builds.

Run: python benchmarks/fused_kernels.py [--params-m 32] [--rows 16384] [--hidden 4096] [--vocab 50257]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn

from autopar.cost.hardware import HARDWARE, Hardware
from autopar.errors import KernelError
from autopar.optim import AdamW
from autopar.runtime.kernels import adamw, cpu_adam, cross_entropy, cuda_ext, gelu, norms

ADAMW_HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)


def _adamw_shapes(total: int) -> list[tuple[int, ...]]:
    """Tensors of a transformer block's shapes (two matrices, two vectors) adding up to ~``total``."""
    d = 1024
    block = [(d, 4 * d), (4 * d, d), (d,), (4 * d,)]
    per_block = sum(s[0] * (s[1] if len(s) > 1 else 1) for s in block)
    return block * max(1, round(total / per_block))


def bench_cpu(params_m: float, steps: int) -> None:
    t0 = time.perf_counter()
    cpu_adam.module()
    load_s = time.perf_counter() - t0
    shapes = _adamw_shapes(int(params_m * 1e6))
    n = sum(torch.Size(s).numel() for s in shapes)
    grads = [torch.randn(s) for s in shapes]

    def params() -> list[nn.Parameter]:
        ps = [nn.Parameter(torch.randn(s)) for s in shapes]
        for p, g in zip(ps, grads):
            p.grad = g
        return ps

    opts: dict[str, torch.optim.Optimizer] = {
        "torch.optim.AdamW(foreach=True)": torch.optim.AdamW(params(), foreach=True),
        "torch.optim.AdamW(fused=True)": torch.optim.AdamW(params(), fused=True),
        "autopar.optim.AdamW (C++ CPU Adam)": AdamW(params()),
    }
    times: dict[str, list[float]] = {name: [] for name in opts}
    for i in range(steps + 2):  # round robin, so that a busy machine slows all alike
        for name, opt in opts.items():
            t0 = time.perf_counter()
            opt.step()
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    step_s = {name: statistics.median(ts) for name, ts in times.items()}
    moved_bytes = 7 * 4 * n  # reads param, grad and both moments; writes param and moments
    print(f"CPU AdamW step: {n / 1e6:.1f}M fp32 parameters in {len(shapes)} tensors, "
          f"{torch.get_num_threads()} threads, median of {steps} steps")  # fmt: skip
    print(f"C++ CPU Adam extension built or loaded in {load_s:.2f} s (not in the times below)")
    print(f"{'optimizer':<38}{'ms/step':>10}{'GB/s':>8}{'foreach time / time':>22}")
    base_s = step_s["torch.optim.AdamW(foreach=True)"]
    for name, s in step_s.items():
        print(f"{name:<38}{s * 1e3:>10.1f}{moved_bytes / s / 1e9:>8.1f}{base_s / s:>22.2f}")


def _hardware() -> Hardware | None:
    """The table's entry for this GPU: the longest kind name in the device's name ("a100" before "a10")."""
    name = torch.cuda.get_device_name().lower()
    for kind in sorted(HARDWARE, key=len, reverse=True):
        if kind != "cpu" and kind in name:
            return HARDWARE[kind]
    return None


def _cuda_time_s(fn: Callable[[], object], iters: int) -> float:
    """Median seconds of one ``fn()`` on the current stream, after warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


@dataclass
class Case:
    name: str
    moved_bytes: int  # what the kernel must read and write at least
    fused: Callable[[], object]
    eager: Callable[[], object]


def _backward(f: Callable[..., torch.Tensor], inputs: list[torch.Tensor]) -> Callable[[], object]:
    """A call of ``f``'s backward alone (its forward runs once, here)."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = f(*leaves)
    grad = torch.randn_like(out)
    return lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True)


def _fwd_bwd(name: str, fused: Callable, eager: Callable, inputs: list[torch.Tensor]) -> list[Case]:
    """Forward (reads x, writes y) and backward (reads x and dy, writes dx) of an activation op."""
    act = inputs[0].numel() * inputs[0].element_size()
    return [
        Case(f"{name} fwd", 2 * act, lambda: fused(*inputs), lambda: eager(*inputs)),
        Case(f"{name} bwd", 3 * act, _backward(fused, inputs), _backward(eager, inputs)),
    ]


def _cases(a: argparse.Namespace) -> list[Case]:
    dev, dt = torch.device("cuda"), torch.bfloat16
    x = torch.randn(a.rows, a.hidden, device=dev, dtype=dt)
    w, b = torch.randn(a.hidden, device=dev, dtype=dt), torch.randn(a.hidden, device=dev, dtype=dt)
    cases = []
    for name, f, inputs in (
        ("bias_gelu", partial(gelu.bias_gelu, approximate="tanh"), [x, b]),
        ("layer_norm", partial(norms.layer_norm, eps=1e-5), [x, w, b]),
        ("rms_norm", partial(norms.rms_norm, eps=1e-6), [x, w]),
    ):
        cases += _fwd_bwd(name, partial(f, backend="triton"), partial(f, backend="torch"), inputs)

    logits = torch.randn(a.ce_rows, a.vocab, device=dev, dtype=dt)
    target = torch.randint(0, a.vocab, (a.ce_rows,), device=dev)
    row_max = cross_entropy.row_max(logits, "torch")
    sumexp, _ = cross_entropy.sumexp_and_target(logits, row_max, target, 0, "torch")
    grad_loss = torch.ones(a.ce_rows, device=dev)
    size = logits.numel() * logits.element_size()
    pieces = {  # each reads the logits once; logits_grad also writes their gradient
        "row_max": (1, (logits,)),
        "sumexp_and_target": (1, (logits, row_max, target, 0)),
        "logits_grad": (2, (logits, row_max, sumexp, target, 0, grad_loss)),
    }
    for name, (passes, args) in pieces.items():
        f = partial(getattr(cross_entropy, name), *args)
        cases.append(
            Case(f"ce {name}", passes * size, partial(f, backend="triton"), partial(f, backend="torch"))
        )

    state = [[torch.randn(s, device=dev) for s in _adamw_shapes(int(a.params_m * 1e6))] for _ in range(4)]
    state[3] = [v.abs() for v in state[3]]  # exp_avg_sq >= 0
    adamw_bytes = 7 * sum(t.numel() * t.element_size() for t in state[0])  # 4 reads, 3 writes
    step = partial(adamw.adamw_step, *state, step=10, **ADAMW_HYPER)
    eager_step = partial(step, backend="torch")
    cases.append(Case("adamw fp32 (triton)", adamw_bytes, partial(step, backend="triton"), eager_step))
    try:
        cuda_ext.load()
    except KernelError as exc:
        print(f"cuda_ext not measured: {exc}")
        return cases
    ext_step = partial(cuda_ext.cuda_adamw_step, *state, step=10, **ADAMW_HYPER)
    cases.append(Case("adamw fp32 (cuda_ext)", adamw_bytes, ext_step, eager_step))
    ln_eager = partial(norms.layer_norm, eps=1e-5, backend="torch")
    return cases + _fwd_bwd(
        "layer_norm (cuda_ext)", partial(cuda_ext.cuda_layer_norm, eps=1e-5), ln_eager, [x, w, b]
    )


def bench_cuda(a: argparse.Namespace) -> None:
    hw = _hardware()
    peak = f"{hw.hbm_bytes_per_s / 1e12:.2f} TB/s HBM ({hw.name})" if hw else "no HBM peak in the table"
    print(f"\n{torch.cuda.get_device_name()}: {peak}; activations {a.rows}x{a.hidden} bf16, "
          f"logits {a.ce_rows}x{a.vocab} bf16, AdamW {a.params_m}M fp32")  # fmt: skip
    print(f"{'kernel':<28}{'us':>9}{'GB/s':>8}{'of peak':>9}{'eager us':>10}{'speed-up':>10}")
    for case in _cases(a):
        fused_s, eager_s = _cuda_time_s(case.fused, a.iters), _cuda_time_s(case.eager, a.iters)
        rate = case.moved_bytes / fused_s
        share = f"{rate / hw.hbm_bytes_per_s:.0%}" if hw else "-"
        times = f"{fused_s * 1e6:>9.1f}{rate / 1e9:>8.0f}{share:>9}{eager_s * 1e6:>10.1f}"
        print(f"{case.name:<28}{times}{eager_s / fused_s:>10.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params-m", type=float, default=32.0, help="AdamW parameters, in millions")
    ap.add_argument("--steps", type=int, default=7, help="timed CPU AdamW steps")
    ap.add_argument("--rows", type=int, default=16384, help="CUDA: activation rows")
    ap.add_argument("--hidden", type=int, default=4096, help="CUDA: activation width")
    ap.add_argument("--ce-rows", type=int, default=8192, help="CUDA: cross-entropy rows")
    ap.add_argument("--vocab", type=int, default=50257, help="CUDA: cross-entropy vocabulary")
    ap.add_argument("--iters", type=int, default=20, help="CUDA: timed calls per kernel")
    a = ap.parse_args()
    bench_cpu(a.params_m, a.steps)
    if torch.cuda.is_available():
        bench_cuda(a)


if __name__ == "__main__":
    main()
