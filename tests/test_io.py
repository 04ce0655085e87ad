"""Adapters in PEFT's file format, both ways; atomic saves; errors that name the file."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import gpt2, llama, text_batch

import runlora.io
from runlora import LoraConfig, RunLoRAModel, get_runlora_model

peft = pytest.importorskip("peft")

CONFIGS = {
    "llama_patterns": (
        llama,
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "up_proj"],
            rank_pattern={"v_proj": 2},
            alpha_pattern={"up_proj": 32},
        ),
    ),
    "llama_rslora_save": (
        llama,
        dict(
            r=4,
            lora_alpha=8,
            target_modules="all-linear",
            use_rslora=True,
            modules_to_save=["lm_head"],
        ),
    ),
    "llama_save_in_blocks": (
        llama,
        dict(r=2, target_modules=["q_proj"], modules_to_save=["post_attention_layernorm"]),
    ),
    "gpt2_bias_all": (
        gpt2,
        dict(r=4, target_modules=["c_attn", "c_proj"], bias="all", fan_in_fan_out=True),
    ),
    "gpt2_lora_only_save": (
        gpt2,
        dict(
            r=2,
            target_modules=["c_fc"],
            bias="lora_only",
            modules_to_save=["ln_f"],
            fan_in_fan_out=True,
        ),
    ),
}


def trained(model):
    """Make every trainable tensor differ from its initial value (so a lost tensor shows)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(**text_batch()).logits


@pytest.mark.parametrize("case", list(CONFIGS))
def test_runlora_saves_what_peft_loads(case, tmp_path):
    build, kwargs = CONFIGS[case]
    base = build()
    ours = trained(get_runlora_model(copy.deepcopy(base), LoraConfig(**kwargs)))
    ours.save_pretrained(tmp_path)
    expected = logits(ours)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    torch.testing.assert_close(logits(loaded), expected)
    # The same file keys and shapes PEFT writes for the same config.
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    peft_model.save_pretrained(tmp_path / "peft")
    ours_file = load_file(tmp_path / "adapter_model.safetensors")
    peft_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    peft_file = {
        k: v
        for k, v in peft_file.items()
        if ".original_module." not in k and ".modules_to_save." not in k
    }
    assert {k: v.shape for k, v in ours_file.items()} == {k: v.shape for k, v in peft_file.items()}
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORA" and data["r"] == kwargs["r"]


@pytest.mark.parametrize("case", list(CONFIGS))
def test_peft_saves_what_runlora_loads(case, tmp_path):
    build, kwargs = CONFIGS[case]
    base = build()
    peft_model = trained(peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs)))
    peft_model.save_pretrained(str(tmp_path))
    ours = RunLoRAModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(ours), logits(peft_model))
    assert not ours.training and not any(p.requires_grad for p in ours.parameters())
    again = RunLoRAModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    assert {n for n, p in again.named_parameters() if p.requires_grad} == {
        n for n, p in peft_model.named_parameters() if p.requires_grad
    }


@pytest.mark.parametrize("case", list(CONFIGS))
def test_checkpoint_wrapped_blocks_save_peft_keys(case, tmp_path):
    """torch's checkpoint_wrapper (accelerate's FSDP activation checkpointing) puts
    ``_checkpoint_wrapped_module`` into module names but not into state-dict keys: the file's
    keys and tensors are those of the unwrapped model."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
    )

    build, kwargs = CONFIGS[case]
    ours = trained(get_runlora_model(build(), LoraConfig(**kwargs)))
    ours.save_pretrained(tmp_path / "plain")
    blocks = ("LlamaDecoderLayer", "GPT2Block")
    apply_activation_checkpointing(ours, check_fn=lambda m: type(m).__name__ in blocks)
    assert any("_checkpoint_wrapped_module" in n for n, _ in ours.named_modules())
    ours.save_pretrained(tmp_path / "wrapped")
    plain = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    wrapped = load_file(tmp_path / "wrapped" / "adapter_model.safetensors")
    assert wrapped.keys() == plain.keys() and plain
    for key, value in plain.items():
        assert torch.equal(wrapped[key], value), key
    fresh = get_runlora_model(build(), LoraConfig(**kwargs))
    apply_activation_checkpointing(fresh, check_fn=lambda m: type(m).__name__ in blocks)
    runlora.io.load_adapter_weights(fresh, tmp_path / "wrapped")  # and back into wrapped blocks
    assert runlora.io.adapter_state_dict(fresh).keys() == plain.keys()
    for key, value in runlora.io.adapter_state_dict(fresh).items():
        assert torch.equal(value, plain[key]), key


def test_round_trip_runlora_to_runlora(tmp_path):
    base = llama()
    kwargs = CONFIGS["llama_patterns"][1]
    ours = trained(get_runlora_model(copy.deepcopy(base), LoraConfig(**kwargs)))
    ours.save_pretrained(tmp_path)
    loaded = RunLoRAModel.from_pretrained(copy.deepcopy(base), tmp_path, criterion="flops")
    torch.testing.assert_close(logits(loaded), logits(ours))
    assert loaded.peft_config["default"].rank_pattern == {"v_proj": 2}


def test_crash_mid_save_leaves_previous_adapter(tmp_path, monkeypatch):
    ours = trained(get_runlora_model(llama(), LoraConfig(r=4, target_modules=["q_proj"])))
    ours.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    trained(ours)
    real = runlora.io._write_weights

    def crash(tensors, path):
        real(dict(list(tensors.items())[:1]), path)  # half the adapter is on disk, then:
        raise OSError("disk full")

    monkeypatch.setattr(runlora.io, "_write_weights", crash)
    with pytest.raises(OSError, match="disk full"):
        ours.save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def _saved(tmp_path, **kwargs):
    ours = get_runlora_model(
        llama(), LoraConfig(**{"r": 4, "target_modules": ["q_proj"], **kwargs})
    )
    ours.save_pretrained(tmp_path)
    return tmp_path


def test_rank_mismatch_names_layer_and_shapes(tmp_path):
    directory = _saved(tmp_path)
    data = json.loads((directory / "adapter_config.json").read_text())
    data["r"] = 8
    (directory / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(
        ValueError,
        match=r"layer 'base_model.model.model.layers.0.self_attn."
        r"q_proj': lora_A has shape \(4, 64\) in the file but \(8, 64\)",
    ):
        RunLoRAModel.from_pretrained(llama(), directory)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        RunLoRAModel.from_pretrained(llama(), tmp_path)
    directory = _saved(tmp_path)
    (directory / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        RunLoRAModel.from_pretrained(llama(), directory)


def test_corrupt_files_are_named(tmp_path):
    directory = _saved(tmp_path)
    weights = directory / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(ValueError, match="adapter_model.safetensors is not a readable"):
        RunLoRAModel.from_pretrained(llama(), directory)
    (directory / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json is not a readable JSON"):
        RunLoRAModel.from_pretrained(llama(), directory)


def test_unsupported_peft_features_are_refused(tmp_path):
    base = llama()
    peft.get_peft_model(
        base, peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)
    ).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="use_dora=True is a PEFT feature"):
        RunLoRAModel.from_pretrained(llama(), tmp_path)
