"""The model zoo: the families large-model training is done on, at a real and a tiny size.

``build(name, size, batch=, seq=)`` returns ``(model, example_kwargs)``; random weights from a
config, nothing downloaded. Real sizes are meant for the meta device (``with
torch.device("meta")``), tiny sizes run on CPU. HuggingFace families come from
``transformers`` unchanged; PaLM-style and DLRM-style models are autopar's own
(``models/palm.py``, ``models/dlrm.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn

from autopar.errors import AutoparError

Size = Literal["real", "tiny"]


@dataclass(frozen=True)
class ZooModel:
    family: str
    description: str
    #: size -> config keyword arguments for the family's builder
    real: dict[str, Any]
    tiny: dict[str, Any]


_HF_TEXT_COMMON = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}


def _llama(description: str, layers: int, hidden: int, heads: int, ffn: int) -> ZooModel:
    real = {
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": 8,
        "intermediate_size": ffn,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
        "max_position_embeddings": 8192,
    }
    tiny = {
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
        "vocab_size": 96,
    }
    return ZooModel("llama", description, real, tiny)


def _gpt2(real: dict[str, Any]) -> ZooModel:
    tiny = {"n_layer": 2, "n_embd": 32, "n_head": 4, "vocab_size": 96, "n_positions": 64}
    return ZooModel("gpt2", "GPT-2 architecture (HF GPT2LMHeadModel, tied LM head)", real, tiny)


ZOO: dict[str, ZooModel] = {
    "gpt2-124m": _gpt2(
        {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257, "n_positions": 1024}
    ),
    "gpt2-1.5b": _gpt2(
        {"n_layer": 48, "n_embd": 1600, "n_head": 25, "vocab_size": 50257, "n_positions": 1024}
    ),
    "gpt3-6.7b": _gpt2(
        {"n_layer": 32, "n_embd": 4096, "n_head": 32, "vocab_size": 50257, "n_positions": 2048}
    ),
    "gpt3-175b": _gpt2(
        {"n_layer": 96, "n_embd": 12288, "n_head": 96, "vocab_size": 50257, "n_positions": 2048}
    ),
    "llama3-8b": _llama("LLaMA-3 8B (RMSNorm, rotary, grouped-query attention, SwiGLU)", 32, 4096, 32, 14336),
    "llama3-70b": _llama("LLaMA-3 70B", 80, 8192, 64, 28672),
    "mixtral-8x7b": ZooModel(
        "mixtral",
        "Mixtral 8x7B (top-2 router over 8 SwiGLU experts)",
        {
            "num_hidden_layers": 32,
            "hidden_size": 4096,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "intermediate_size": 14336,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "vocab_size": 32000,
        },
        {
            "num_hidden_layers": 2,
            "hidden_size": 32,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 48,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "vocab_size": 96,
        },
    ),
    "bert-large": ZooModel(
        "bert",
        "BERT-large, masked-LM head",
        {"num_hidden_layers": 24, "hidden_size": 1024, "num_attention_heads": 16, "intermediate_size": 4096},
        {
            "num_hidden_layers": 2,
            "hidden_size": 32,
            "num_attention_heads": 4,
            "intermediate_size": 64,
            "vocab_size": 96,
            "max_position_embeddings": 64,
        },
    ),
    "opt-13b": ZooModel(
        "opt",
        "OPT-13B (learned positions, ReLU MLP)",
        {
            "num_hidden_layers": 40,
            "hidden_size": 5120,
            "num_attention_heads": 40,
            "ffn_dim": 20480,
            "word_embed_proj_dim": 5120,
            "vocab_size": 50272,
            "max_position_embeddings": 2048,
        },
        {
            "num_hidden_layers": 2,
            "hidden_size": 32,
            "num_attention_heads": 4,
            "ffn_dim": 64,
            "word_embed_proj_dim": 32,
            "vocab_size": 96,
            "max_position_embeddings": 64,
        },
    ),
    "vit-large": ZooModel(
        "vit",
        "ViT-large/16, 224x224 images, 1000 classes",
        {
            "num_hidden_layers": 24,
            "hidden_size": 1024,
            "num_attention_heads": 16,
            "intermediate_size": 4096,
            "image_size": 224,
            "patch_size": 16,
            "num_labels": 1000,
        },
        {
            "num_hidden_layers": 2,
            "hidden_size": 32,
            "num_attention_heads": 4,
            "intermediate_size": 64,
            "image_size": 16,
            "patch_size": 4,
            "num_labels": 8,
        },
    ),
    "resnet-50": ZooModel(
        "resnet",
        "ResNet-50 (bottleneck blocks, batch norm), 224x224 images, 1000 classes",
        {
            "depths": [3, 4, 6, 3],
            "hidden_sizes": [256, 512, 1024, 2048],
            "embedding_size": 64,
            "num_labels": 1000,
            "image_size": 224,
        },
        {"depths": [1, 1], "hidden_sizes": [16, 32], "embedding_size": 8, "num_labels": 8, "image_size": 32},
    ),
    "palm-8b": ZooModel(
        "palm",
        "PaLM-style (parallel attention+MLP from one norm, SwiGLU, multi-query attention)",
        {"layers": 32, "hidden": 4096, "heads": 16, "ffn": 16384, "vocab": 256000},
        {"layers": 2, "hidden": 32, "heads": 4, "ffn": 64, "vocab": 96},
    ),
    "dlrm": ZooModel(
        "dlrm",
        "DLRM-style recommender (26 embedding tables, bottom/top MLPs, dot interaction)",
        {
            "tables": 26,
            "rows": 1_000_000,
            "dim": 128,
            "dense": 13,
            "bottom": (512, 256),
            "top": (1024, 1024, 512, 256),
        },
        {"tables": 4, "rows": 64, "dim": 8, "dense": 13, "bottom": (16,), "top": (16,)},
    ),
}


def names() -> list[str]:
    return sorted(ZOO)


def build(
    name: str, size: Size = "real", *, batch: int = 8, seq: int = 128, overrides: dict[str, Any] | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """The zoo model ``name`` at ``size`` and example keyword inputs (with labels, so the
    model returns its training loss). Build real sizes under ``torch.device("meta")``.
    ``overrides`` replaces config entries (``{"num_hidden_layers": 8}``)."""
    if name not in ZOO:
        raise AutoparError(f"unknown zoo model {name!r}; the zoo has {', '.join(names())}")
    if size not in ("real", "tiny"):
        raise AutoparError(f"size must be 'real' or 'tiny', not {size!r}")
    entry = ZOO[name]
    cfg = dict(entry.real if size == "real" else entry.tiny, **(overrides or {}))
    return _BUILDERS[entry.family](cfg, batch, seq)


def _tokens(vocab: int, batch: int, seq: int, limit: int | None, name: str) -> dict[str, torch.Tensor]:
    if limit is not None and seq > limit:
        raise AutoparError(f"seq {seq} exceeds the model's {limit} positions ({name})")
    ids = torch.randint(0, vocab, (batch, seq))
    return {"input_ids": ids, "labels": torch.randint(0, vocab, (batch, seq))}


def _hf_causal(config_cls: str, model_cls: str, limit_key: str | None) -> Callable:
    def builder(cfg: dict[str, Any], batch: int, seq: int):
        import transformers

        config = getattr(transformers, config_cls)(**_HF_TEXT_COMMON, **_no_dropout(config_cls), **cfg)
        model = getattr(transformers, model_cls)(config)
        limit = getattr(config, limit_key) if limit_key else None
        return model, _tokens(config.vocab_size, batch, seq, limit, model_cls)

    return builder


def _no_dropout(config_cls: str) -> dict[str, float]:
    """Dropout off: on CPU each rank draws its own masks, so runs could not be compared with
    one device (see docs/architecture.md). Set the config's dropout to train with it."""
    keys = {
        "GPT2Config": ("resid_pdrop", "embd_pdrop", "attn_pdrop"),
        "BertConfig": ("hidden_dropout_prob", "attention_probs_dropout_prob"),
        "OPTConfig": ("dropout", "attention_dropout"),
        "ViTConfig": ("hidden_dropout_prob", "attention_probs_dropout_prob"),
    }
    return dict.fromkeys(keys.get(config_cls, ()), 0.0)


def _bert(cfg: dict[str, Any], batch: int, seq: int):
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(pad_token_id=0, **_no_dropout("BertConfig"), **cfg)
    inputs = _tokens(config.vocab_size, batch, seq, config.max_position_embeddings, "BertForMaskedLM")
    return BertForMaskedLM(config), inputs


def _images(cfg: dict[str, Any], batch: int, size: int) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.randn(batch, 3, size, size),
        "labels": torch.randint(0, cfg["num_labels"], (batch,)),
    }


def _vit(cfg: dict[str, Any], batch: int, seq: int):
    from transformers import ViTConfig, ViTForImageClassification

    model = ViTForImageClassification(ViTConfig(**_no_dropout("ViTConfig"), **cfg))
    return model, _images(cfg, batch, cfg["image_size"])


def _resnet(cfg: dict[str, Any], batch: int, seq: int):
    from transformers import ResNetConfig, ResNetForImageClassification

    cfg = dict(cfg)
    size = cfg.pop("image_size")
    model = ResNetForImageClassification(ResNetConfig(layer_type="bottleneck", **cfg))
    return model, _images(cfg, batch, size)


def _palm(cfg: dict[str, Any], batch: int, seq: int):
    from autopar.models.palm import PaLM, PaLMConfig

    c = PaLMConfig(**cfg)
    return PaLM(c), _tokens(c.vocab, batch, seq, None, "PaLM")


def _dlrm(cfg: dict[str, Any], batch: int, seq: int):
    from autopar.models.dlrm import DLRM, DLRMConfig

    c = DLRMConfig(**cfg)
    return DLRM(c), DLRM.example_inputs(c, batch)


_BUILDERS: dict[str, Callable] = {
    "gpt2": _hf_causal("GPT2Config", "GPT2LMHeadModel", "n_positions"),
    "llama": _hf_causal("LlamaConfig", "LlamaForCausalLM", "max_position_embeddings"),
    "mixtral": _hf_causal("MixtralConfig", "MixtralForCausalLM", "max_position_embeddings"),
    "opt": _hf_causal("OPTConfig", "OPTForCausalLM", "max_position_embeddings"),
    "bert": _bert,
    "vit": _vit,
    "resnet": _resnet,
    "palm": _palm,
    "dlrm": _dlrm,
}
