"""HuggingFace models, unchanged: tiny GPT-2 (fused qkv Conv1D, tied LM head) and LLaMA (RMSNorm,
rotary embeddings, grouped-query attention, SwiGLU) on a (2, 2) mesh of 4 gloo ranks.

The output keeps its ModelOutput type; loss, logits, every parameter's gradient and the
parameters after one AdamW step match the single-device model within 1e-5 (fp32).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from autopar import autoparallelize
from tests.distributed.harness import run_on_mesh
from tests.distributed.opzoo import hf_models

TOL = 1e-5


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def check_hf() -> dict:
    out = {}
    for name, (model, inputs) in hf_models().items():
        ref = copy.deepcopy(model)
        mesh = init_device_mesh("cpu", (2, 2))
        pm = autoparallelize(model, (), mesh, example_kwargs=inputs, gpu="cpu")
        opt = torch.optim.AdamW(pm.parameters(), lr=1e-4)
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-4)
        res, ref_res = pm(**inputs), ref(**inputs)
        res.loss.backward()
        ref_res.loss.backward()
        params, ref_params = dict(pm.named_parameters()), dict(ref.named_parameters())
        grad_err = max((_full(p.grad) - ref_params[n].grad).abs().max().item() for n, p in params.items())
        opt.step()
        ref_opt.step()
        out[name] = {
            "type": type(res).__name__,
            "ref_type": type(ref_res).__name__,
            "loss_err": abs(_full(res.loss).item() - ref_res.loss.item()),
            "logits_err": (_full(res.logits) - ref_res.logits).abs().max().item(),
            "grad_err": grad_err,
            "step_err": max(
                (_full(p.detach()) - ref_params[n].detach()).abs().max().item() for n, p in params.items()
            ),
            "names_match": sorted(params) == sorted(ref_params),
            "state_dict_keys_match": sorted(pm.state_dict()) == sorted(ref.state_dict()),
            "fallback_ops": pm.plan.fallback_ops,
        }
    return out


@pytest.fixture(scope="module")
def results() -> dict:
    return run_on_mesh(check_hf)


@pytest.mark.parametrize("name", ["hf-gpt2", "hf-llama"])
def test_hf_model_same_numbers(results, name):
    r = results[name]
    assert r["type"] == r["ref_type"]
    assert r["loss_err"] < TOL and r["logits_err"] < TOL and r["grad_err"] < TOL and r["step_err"] < TOL
    assert r["names_match"] and r["state_dict_keys_match"]


@pytest.mark.parametrize("name", ["hf-gpt2", "hf-llama"])
def test_hf_model_only_mask_indexing_lacks_a_rule(results, name):
    # advanced indexing in HF's attention-mask construction is the one op left replicated (issue 3)
    assert results[name]["fallback_ops"] == ["aten.index.Tensor"]
