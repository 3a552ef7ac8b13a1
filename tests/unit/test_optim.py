"""The fused AdamW (autopar.optim) and its C++ CPU kernel against torch.optim.AdamW.

The C++ extension is compiled once per machine (about 30 s, then cached in torch's
extensions directory) and loaded once per test session.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor, init_device_mesh

from autopar import AutoparError, KernelError
from autopar.optim import AdamW
from autopar.runtime.kernels import cpu_adam, cuda_ext

# odd sizes; 70_001 and 200_003 elements span several of the kernel's 65_536-element chunks
SHAPES = [(7,), (333, 129), (1,), (70_001,), (3, 5, 7), (200_003,)]
HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
TIGHT = dict(rtol=1e-6, atol=1e-6)  # a few fp32 roundings apart after several steps


def _params(seed: int = 0) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def _steps(opt: torch.optim.Optimizer, params: list[nn.Parameter], steps: range) -> None:
    """Optimizer steps with gradients that depend on the step number alone."""
    for k in steps:
        g = torch.Generator().manual_seed(1000 + k)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


def _assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x.detach(), y.detach(), **TIGHT)


def _assert_same_state(ours: torch.optim.Optimizer, theirs: torch.optim.Optimizer, pa, pb) -> None:
    for x, y in zip(pa, pb, strict=True):
        sx, sy = ours.state[x], theirs.state[y]
        assert sx["step"].item() == sy["step"].item()
        _assert_same([sx["exp_avg"], sx["exp_avg_sq"]], [sy["exp_avg"], sy["exp_avg_sq"]])


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_cpu_adam_kernel_matches_torch_adamw(weight_decay):
    ours, ref = _params(), _params()
    moments = [torch.zeros_like(p) for p in ours], [torch.zeros_like(p) for p in ours]
    opt = torch.optim.AdamW(ref, **HYPER, weight_decay=weight_decay)
    for step in range(1, 6):
        _steps(opt, ref, range(step, step + 1))
        with torch.no_grad():
            cpu_adam.cpu_adamw_step(
                ours, [p.grad for p in ref], *moments, step=step, lr=1e-2, beta1=0.9, beta2=0.99,
                eps=1e-8, weight_decay=weight_decay,
            )  # fmt: skip
        _assert_same(ours, ref)
    _assert_same(moments[0], [opt.state[p]["exp_avg"] for p in ref])
    _assert_same(moments[1], [opt.state[p]["exp_avg_sq"] for p in ref])


def test_cpu_adam_kernel_rejects_what_it_cannot_update():
    p = torch.zeros(4, 4)
    with pytest.raises(RuntimeError, match="contiguous fp32 CPU"):
        cpu_adam.cpu_adamw_step(
            [p.t()], [p], [p], [p], step=1, lr=1, beta1=0.9, beta2=0.9, eps=1, weight_decay=0
        )
    with pytest.raises(RuntimeError, match="step counts from 1"):
        cpu_adam.cpu_adamw_step([p], [p], [p], [p], step=0, lr=1, beta1=0.9, beta2=0.9, eps=1, weight_decay=0)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_adamw_matches_torch_and_state_dicts_interchange(backend):
    pa, pb = _params(), _params()
    ours = AdamW(pa, **HYPER, weight_decay=0.05, backend=backend)
    theirs = torch.optim.AdamW(pb, **HYPER, weight_decay=0.05, foreach=True)
    _steps(ours, pa, range(3))
    _steps(theirs, pb, range(3))
    _assert_same(pa, pb)
    _assert_same_state(ours, theirs, pa, pb)

    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert sd_ours["param_groups"][0].keys() == sd_theirs["param_groups"][0].keys()
    assert sd_ours["state"][0].keys() == sd_theirs["state"][0].keys()
    assert sd_ours["state"][0]["step"].dtype == torch.float32

    # torch continues from our state and we from torch's: the same numbers as going on
    pa2 = [nn.Parameter(p.detach().clone()) for p in pa]
    pb2 = [nn.Parameter(p.detach().clone()) for p in pb]
    theirs_from_ours = torch.optim.AdamW(pa2, lr=0.5)
    theirs_from_ours.load_state_dict(copy.deepcopy(sd_ours))
    ours_from_theirs = AdamW(pb2, lr=0.5, backend=backend)
    ours_from_theirs.load_state_dict(copy.deepcopy(sd_theirs))
    for opt, params in ((ours, pa), (theirs, pb), (theirs_from_ours, pa2), (ours_from_theirs, pb2)):
        _steps(opt, params, range(3, 6))
    _assert_same(pa2, pa)
    _assert_same(pb2, pb)
    _assert_same(pa, pb)
    _assert_same_state(ours_from_theirs, theirs, pb2, pb)


def test_adamw_skips_parameters_without_gradient_and_counts_steps_per_parameter():
    pa, pb = _params(), _params()
    ours, theirs = AdamW(pa, **HYPER), torch.optim.AdamW(pb, **HYPER)
    for step in range(4):
        for params, opt in ((pa, ours), (pb, theirs)):
            for i, p in enumerate(params):  # parameter 1 has a gradient every other step only
                p.grad = torch.full(p.shape, float(step + i)) if i != 1 or step % 2 else None
            opt.step()
    assert ours.state[pa[1]]["step"].item() == 2
    _assert_same(pa, pb)
    _assert_same_state(ours, theirs, pa, pb)


@pytest.fixture
def one_rank_mesh():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _sharded_steps(mesh, steps: int) -> tuple[nn.Module, AdamW, list[nn.Parameter]]:
    """Our AdamW on DTensor copies of _params() (shard 0 of a one-rank mesh) and torch's on the
    plain ones, ``steps`` steps; half the gradients come replicated, as a layout change would leave them."""
    plain = _params()
    model = nn.Module()
    for i, p in enumerate(plain):
        model.register_parameter(
            f"p{i}", nn.Parameter(distribute_tensor(p.detach().clone(), mesh, [Shard(0)]))
        )
    ours, theirs = AdamW(model.parameters(), **HYPER), torch.optim.AdamW(plain, **HYPER)
    for k in range(steps):
        g = torch.Generator().manual_seed(k)
        for i, (p, q) in enumerate(zip(model.parameters(), plain)):
            q.grad = torch.randn(q.shape, generator=g)
            p.grad = distribute_tensor(q.grad.clone(), mesh, [Replicate() if i % 2 else Shard(0)])
        ours.step()
        theirs.step()
    return model, ours, plain


def test_adamw_on_dtensor_parameters_keeps_dtensor_moments(one_rank_mesh):
    model, ours, plain = _sharded_steps(one_rank_mesh, 3)
    for p in model.parameters():
        state = ours.state[p]
        assert isinstance(state["exp_avg"], DTensor) and state["exp_avg"].placements == p.placements
        assert isinstance(state["exp_avg_sq"], DTensor) and not isinstance(state["step"], DTensor)
    _assert_same([p.full_tensor() for p in model.parameters()], plain)


def test_adamw_state_round_trips_through_a_distributed_checkpoint(one_rank_mesh, tmp_path):
    model, ours, _ = _sharded_steps(one_rank_mesh, 2)
    dcp.save({"optim": get_optimizer_state_dict(model, ours)}, checkpoint_id=tmp_path)
    fresh_model, _, _ = _sharded_steps(one_rank_mesh, 0)
    fresh = AdamW(fresh_model.parameters(), **HYPER)
    loaded = get_optimizer_state_dict(fresh_model, fresh)
    dcp.load({"optim": loaded}, checkpoint_id=tmp_path)
    set_optimizer_state_dict(fresh_model, fresh, loaded)
    for p, q in zip(model.parameters(), fresh_model.parameters()):
        a, b = ours.state[p], fresh.state[q]
        assert a["step"].item() == b["step"].item() == 2
        _assert_same([a["exp_avg"].full_tensor(), a["exp_avg_sq"].full_tensor()],
                     [b["exp_avg"].full_tensor(), b["exp_avg_sq"].full_tensor()])  # fmt: skip


def test_adamw_rejects_what_it_does_not_implement():
    for flag in ("amsgrad", "maximize", "capturable"):
        with pytest.raises(AutoparError, match=flag):
            AdamW(_params(), **{flag: True})
    with pytest.raises(KernelError, match="unknown backend"):
        AdamW(_params(), backend="cuda")
    params = _params()
    opt = AdamW(params)
    opt.load_state_dict(torch.optim.AdamW(_params(), amsgrad=True).state_dict())
    with pytest.raises(AutoparError, match="amsgrad"):
        _steps(opt, params, range(1))


def test_failed_cpu_build_falls_back_with_one_warning_under_auto(monkeypatch):
    def no_compiler():
        raise KernelError("cpu_adamw: building the C++ extension failed: c++: not found")

    monkeypatch.setattr(cpu_adam, "module", no_compiler)
    pa, pb = _params(), _params()
    ours, theirs = AdamW(pa, **HYPER), torch.optim.AdamW(pb, **HYPER)
    with pytest.warns(UserWarning, match="c\\+\\+: not found") as caught:
        _steps(ours, pa, range(3))
    assert len(caught) == 1
    _steps(theirs, pb, range(3))
    _assert_same(pa, pb)
    with pytest.raises(KernelError, match="not found"):
        _steps(AdamW(pa, backend="triton"), pa, range(1))


def test_compiler_failure_is_a_kernel_error(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    with pytest.raises(KernelError) as err:
        cpu_adam.build_extension(
            "cpu_adamw", "autopar_cpu_adam_nocxx", [cpu_adam.SOURCE], build_directory=tmp_path
        )
    message = str(err.value)
    assert message.startswith("cpu_adamw: building the C++ extension")
    assert "no-such-c++: not found" in message and "backend='torch'" in message
    assert "Traceback" not in message


def test_a_failed_build_is_not_retried():
    calls = []

    def build():
        calls.append(1)
        raise KernelError("k: failed")

    load = cpu_adam.load_once(build)
    for _ in range(3):
        with pytest.raises(KernelError, match="k: failed"):
            load()
    assert len(calls) == 1


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch has CUDA: the extension may build")
def test_cuda_ext_without_cuda_torch_says_why():
    with pytest.raises(KernelError, match="torch.version.cuda is None"):
        cuda_ext.load()
