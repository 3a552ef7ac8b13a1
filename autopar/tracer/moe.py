"""Mixture-of-experts layers in a form with static shapes, for HuggingFace models.

HuggingFace's experts loop over the experts a batch hit (data-dependent control flow) or
sort tokens by expert into groups of data-dependent sizes; neither has static shapes to
shard. While tracing, autopar selects its own experts implementation (registered with
``transformers``' ``ExpertsInterface``): every expert's projections are einsums over all
tokens, and the top-k routing weights, scattered into a ``[tokens, experts]`` combine matrix,
weight the sum. The numbers are the eager loop's (unselected experts get weight zero); the
expert dimension is an ordinary tensor dim, so sharding it is expert parallelism, and the
planner prices the extra expert FLOPs (experts / top-k) against the communication it saves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

IMPLEMENTATION = "autopar_dense"


def dense_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    experts = self.num_experts
    combine = (F.one_hot(top_k_index, experts).to(top_k_weights.dtype) * top_k_weights.unsqueeze(-1)).sum(1)
    up_weight = self.gate_up_proj if self.has_gate else self.up_proj
    pattern = "th,ehf->tef" if self.is_transposed else "th,efh->tef"
    h = torch.einsum(pattern, hidden_states, up_weight)  # [tokens, experts, (2x) intermediate]
    if self.has_bias:
        h = h + (self.gate_up_proj_bias if self.has_gate else self.up_proj_bias)
    h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
    pattern = "tei,eih->teh" if self.is_transposed else "tei,ehi->teh"
    out = torch.einsum(pattern, h, self.down_proj)  # [tokens, experts, hidden]
    if self.has_bias:
        out = out + self.down_proj_bias
    if getattr(self, "has_post_expert_norm", False):
        out = self.post_expert_norm(out)
    return torch.einsum("teh,te->th", out, combine.to(out.dtype)).to(hidden_states.dtype)


def _register() -> bool:
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:  # transformers absent or too old to have pluggable experts
        return False
    ExpertsInterface.register(IMPLEMENTATION, dense_experts_forward)
    return True


@contextlib.contextmanager
def static_experts(model: nn.Module) -> Iterator[None]:
    """Use the dense experts implementation inside the block (HF models with experts)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_experts_implementation") or not _register():
        yield
        return
    before = config._experts_implementation
    config._experts_implementation = IMPLEMENTATION
    try:
        yield
    finally:
        config._experts_implementation = before
