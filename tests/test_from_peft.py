"""from_peft: a PEFT model switched to runlora's op in place, same tensors, same results."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import gpt2, llama, text_batch

import runlora.layer
from runlora import from_peft

peft = pytest.importorskip("peft")


def count_op_calls(monkeypatch) -> list:
    calls = []
    real = runlora.layer.lora_linear
    monkeypatch.setattr(
        runlora.layer, "lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    return calls


@pytest.mark.parametrize("build,targets", [(llama, ["q_proj", "v_proj"]), (gpt2, ["c_attn"])])
def test_same_tensors_same_training(build, targets, monkeypatch, tmp_path):
    base = build()
    config = peft.LoraConfig(r=4, target_modules=targets, init_lora_weights=False)
    reference = peft.get_peft_model(copy.deepcopy(base), config)
    model = copy.deepcopy(reference)
    params = {n: p for n, p in model.named_parameters()}
    opts = [
        torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
        for m in (reference, model)
    ]  # built before the switch
    assert from_peft(model) is model
    assert {n: p for n, p in model.named_parameters()} == params  # the very same tensors
    assert isinstance(model, peft.PeftModel)
    calls = count_op_calls(monkeypatch)
    for step in range(3):
        losses = []
        for m, opt in zip((reference, model), opts, strict=True):
            opt.zero_grad()
            torch.manual_seed(step)
            loss = m(**text_batch(seed=step)).loss
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    assert calls, "runlora's op was never called"
    for (name, p), (_, q) in zip(
        reference.named_parameters(), model.named_parameters(), strict=True
    ):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=name)
    model.save_pretrained(str(tmp_path))  # PEFT's own save still works
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and all(".lora_" in k for k in saved)


def test_peft_features_fall_back_to_peft(monkeypatch):
    base = llama()
    model = from_peft(
        peft.get_peft_model(
            base, peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
        )
    )
    batch = text_batch()
    calls = count_op_calls(monkeypatch)
    with torch.no_grad():
        adapted = model(**batch).logits
        assert calls
        calls.clear()
        with model.disable_adapter():
            plain = model(**batch).logits
        model.merge_adapter()
        torch.testing.assert_close(model(**batch).logits, adapted, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
    assert not calls
    assert not torch.allclose(plain, adapted)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert repr(layer).startswith("runlora.lora.RunLoRAPeftLinear(")


def test_dora_layers_keep_peft_forward(monkeypatch):
    base = llama()
    reference = peft.get_peft_model(
        base, peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)
    )
    model = from_peft(copy.deepcopy(reference))
    calls = count_op_calls(monkeypatch)
    with torch.no_grad():
        torch.testing.assert_close(model(**text_batch()).logits, reference(**text_batch()).logits)
    assert not calls


def test_model_without_lora_layers_is_refused():
    with pytest.raises(ValueError, match="holds no peft LoRA Linear layer"):
        from_peft(llama())
