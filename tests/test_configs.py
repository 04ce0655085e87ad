"""Shipped model configs: each loads, big ones have the expected size, tiny ones build and run."""

from __future__ import annotations

import json

import pytest
import torch

from runlora.configs import (
    build_model,
    count_parameters,
    default_target_modules,
    default_task,
    list_configs,
    load_config,
    max_seq_len,
)

#: name -> (low, high) parameter count, embeddings and heads included.
EXPECTED_PARAMS = {
    "llama_tiny": (0.1e6, 0.3e6),
    "llama_9m": (8.5e6, 9.5e6),
    "llama_20m": (19e6, 20e6),
    "llama_60m": (57e6, 59e6),
    "llama_130m": (130e6, 138e6),
    "llama_250m": (240e6, 255e6),
    "llama_350m": (360e6, 375e6),
    "llama_1.3b": (1.30e9, 1.38e9),
    "llama_3b": (2.6e9, 2.8e9),
    "llama2_7b": (6.7e9, 6.8e9),
    "roberta_base": (120e6, 130e6),
    "roberta_large": (350e6, 360e6),
    "opt_350m": (325e6, 335e6),
    "vit_base": (85e6, 88e6),
}

#: ReLoRA/GaLore llama_*m sizes: hidden, intermediate, heads, layers.
LLAMA_SHAPES = {
    "llama_9m": (128, 352, 4, 4),
    "llama_20m": (256, 688, 4, 4),
    "llama_60m": (512, 1376, 8, 8),
    "llama_130m": (768, 2048, 12, 12),
    "llama_250m": (768, 2560, 16, 24),
    "llama_350m": (1024, 2736, 16, 24),
    "llama_1.3b": (2048, 5461, 32, 24),
    "llama_3b": (2560, 6848, 32, 32),
    "llama2_7b": (4096, 11008, 32, 32),
}

#: overrides that make each family tiny enough to build and run in a test.
TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_hidden_layers": 1,
}


def test_every_shipped_config_is_listed_and_sized():
    assert set(list_configs()) == set(EXPECTED_PARAMS)
    for name, (low, high) in EXPECTED_PARAMS.items():
        config = load_config(name)
        assert config.model_type, name
        assert low <= count_parameters(config) <= high, name


@pytest.mark.parametrize("name", sorted(LLAMA_SHAPES))
def test_llama_sizes(name):
    c = load_config(name)
    assert (
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads,
        c.num_hidden_layers,
    ) == LLAMA_SHAPES[name]
    assert c.vocab_size == 32000
    assert c.max_position_embeddings == (4096 if name == "llama2_7b" else 1024)


def test_tasks_targets_and_lengths():
    assert default_task(load_config("llama_60m")) == "causal_lm"
    assert default_task(load_config("opt_350m")) == "causal_lm"
    assert default_task(load_config("roberta_base")) == "masked_lm"
    assert default_task(load_config("vit_base")) == "image_classification"
    assert max_seq_len(load_config("roberta_base")) == 512  # positions start at pad_token_id+1
    assert max_seq_len(load_config("vit_base")) is None
    llama = build_model(load_config("llama_tiny"))
    assert default_target_modules(llama) == [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ]


def test_llama_tiny_builds_and_trains():
    model = build_model(load_config("llama_tiny"), dtype=torch.bfloat16)
    assert model.training and next(model.parameters()).dtype == torch.bfloat16
    ids = torch.randint(0, 512, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()


def test_same_seed_same_weights():
    config = load_config("llama_tiny")
    a, b = build_model(config, seed=3), build_model(config, seed=3)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["roberta_base", "opt_350m", "vit_base"])
def test_other_families_build_tiny(name):
    overrides = dict(TINY)
    if name == "opt_350m":
        overrides = {
            "hidden_size": 32,
            "ffn_dim": 64,
            "word_embed_proj_dim": 16,
            "num_attention_heads": 2,
            "num_hidden_layers": 1,
        }
    if name == "vit_base":
        overrides.update(image_size=32, patch_size=16, num_labels=3)
    model = build_model(load_config(name, **overrides))
    if name == "vit_base":
        out = model(pixel_values=torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 2]))
    else:
        ids = torch.randint(3, 100, (2, 8))
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    targets = default_target_modules(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    adapted = [n for n in linears if any(n.endswith("." + t) for t in targets)]
    assert len(adapted) == 6  # q, k, v, out; the MLP's two: heads and poolers stay frozen
    assert all(any(part.isdigit() for part in n.split(".")) for n in adapted)


def test_load_from_json_path_and_model_dir(tmp_path):
    source = load_config("llama_tiny").to_dict()
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(source))
    assert load_config(path).hidden_size == 64
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(source))
    assert load_config(str(model_dir)).num_hidden_layers == 2


def test_unknown_model_says_what_is_accepted(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'llama_6m'.*llama_60m"):
        load_config("llama_6m")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read a model config"):
        load_config(bad)
