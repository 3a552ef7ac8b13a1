"""Fused kernels and vocabulary-parallel cross entropy in the emitted module, on 4 gloo ranks.

Tiny HF GPT-2 and LLaMA (vocabulary 4096, priced for the CPU mesh, where the planner shards
the loss by vocabulary) are planned with ``kernels="fused"`` and with ``kernels="eager"``.
The fused module runs its LayerNorm / RMSNorm / GELU chains as kernels (Triton, interpreted
on CPU, when triton is installed) and both compute the loss from vocabulary-sharded logits.
Each must give the single-device loss and gradients, and the same parameters after two
optimizer steps: the fused module steps with ``autopar.optim.AdamW`` (the CPU C++ AdamW on
its DTensor shards), the reference with ``torch.optim.AdamW``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from autopar import autoparallelize
from autopar.models import zoo
from autopar.optim import AdamW
from autopar.runtime.kernels import resolve
from tests.distributed.harness import run_on_mesh

CASES = [("gpt2-124m", "auto"), ("llama3-8b", "megatron")]
KERNELS = ("fused", "eager")
#: the chains each tiny model has: 2 blocks x 2 LayerNorms + the final one, and 2 GELUs; LLaMA:
#: 2 blocks x 2 RMSNorms + the final one. A plan fuses those its layouts let run fused.
CHAINS = {"gpt2-124m": {"layer_norm": 5, "gelu": 2}, "llama3-8b": {"rms_norm": 5}}
TOL = 2e-5


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _case(name: str, strategy: str, kernels: str) -> dict:
    torch.manual_seed(0)
    model, inputs = zoo.build(name, "tiny", batch=4, seq=16, overrides={"vocab_size": 4096})
    inputs["labels"][:, :3] = -100  # ignored targets, unevenly over the batch
    ref = copy.deepcopy(model)
    mesh = init_device_mesh("cpu", (2, 2))
    pm = autoparallelize(
        model, (), mesh, example_kwargs=inputs, strategy=strategy, gpu="cpu", kernels=kernels
    )
    opt = (
        AdamW(pm.parameters(), lr=1e-4) if kernels == "fused" else torch.optim.AdamW(pm.parameters(), lr=1e-4)
    )
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-4)
    params, ref_params = dict(pm.named_parameters()), dict(ref.named_parameters())
    out: dict = {}
    for step in range(2):
        for o in (opt, ref_opt):
            o.zero_grad()
        loss, ref_loss = pm(**inputs).loss, ref(**inputs).loss
        loss.backward()
        ref_loss.backward()
        if step == 0:
            out["loss_err"] = abs(_full(loss).item() - ref_loss.item())
            out["grad_err"] = max(
                (_full(p.grad) - ref_params[n].grad).abs().max().item() for n, p in params.items()
            )
        opt.step()
        ref_opt.step()
    out["param_err"] = max(
        (_full(p.detach()) - ref_params[n].detach()).abs().max().item() for n, p in params.items()
    )
    ce = next(n for n in pm.plan.nodes if "cross_entropy" in n.op)
    out["loss_logits_spec"] = ce.input_specs[0]
    kinds: dict[str, int] = {}
    for f in pm.plan.fusions:
        kinds[f["kind"]] = kinds.get(f["kind"], 0) + 1
    out["fusions"] = kinds
    out["fused_calls"] = sum("fused_call" in str(n.target) for n in pm.graph.nodes)
    return out


def check_all() -> dict:
    res = {f"{m}-{s}-{k}": _case(m, s, k) for m, s in CASES for k in KERNELS}
    res["backend"] = resolve("auto", torch.device("cpu"), "layer_norm")
    return res


@pytest.fixture(scope="module")
def results() -> dict:
    return run_on_mesh(check_all, triton=True)


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("name,strategy", CASES)
def test_same_numbers_as_single_device(results, name, strategy, kernels):
    r = results[f"{name}-{strategy}-{kernels}"]
    assert r["loss_err"] < TOL and r["grad_err"] < TOL and r["param_err"] < TOL, r


@pytest.mark.parametrize("name,strategy", CASES)
def test_the_loss_is_computed_from_vocabulary_sharded_logits(results, name, strategy):
    for kernels in KERNELS:
        assert "S1" in results[f"{name}-{strategy}-{kernels}"]["loss_logits_spec"]


@pytest.mark.parametrize("name,strategy", CASES)
def test_fused_plans_run_every_chain_as_a_kernel(results, name, strategy):
    fused, eager = results[f"{name}-{strategy}-fused"], results[f"{name}-{strategy}-eager"]
    assert fused["fusions"].keys() == CHAINS[name].keys()
    assert all(n <= CHAINS[name][kind] for kind, n in fused["fusions"].items())
    assert fused["fused_calls"] == sum(fused["fusions"].values())
    assert eager["fusions"] == {} and eager["fused_calls"] == 0


def test_the_kernels_ran_in_triton(results):
    pytest.importorskip("triton", reason="without triton the fused module runs the torch kernels")
    assert results["backend"] == "triton"
