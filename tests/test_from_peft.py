"""from_peft and from_pretrained: a PEFT model switched to runlora's op in place, same tensors,
same results; adapters PEFT adds to it later run the op too."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import count_op_calls
from safetensors.torch import load_file
from tiny_models import gpt2, llama, text_batch

import runlora
import runlora.layers.layer
from runlora import from_peft
from runlora.integrations.peft import is_accelerated

peft = pytest.importorskip("peft")


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
    assert isinstance(layer, peft.tuners.lora.Linear) and is_accelerated(layer)


def test_dora_layers_run_the_dora_op(monkeypatch):
    base = llama()
    reference = peft.get_peft_model(
        base, peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)
    )
    model = from_peft(copy.deepcopy(reference))
    calls = count_op_calls(monkeypatch)
    with torch.no_grad():
        torch.testing.assert_close(model(**text_batch()).logits, reference(**text_batch()).logits)
    assert len(calls) == 2


def test_model_without_lora_layers_warns():
    model = llama()
    with pytest.warns(UserWarning, match="holds no PEFT LoRA layer"):
        assert from_peft(model) is model


def lora_layers(model) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


def test_adapters_added_later_run_the_op(tmp_path, monkeypatch):
    """add_adapter / load_adapter with targets the model had no LoRA layer on yet (down_proj):
    the new layers run the op too (no patch_peft needed), with from_peft's criterion."""
    base = llama()
    first = peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    second = peft.LoraConfig(r=2, target_modules=["down_proj"], init_lora_weights=False)
    saved = peft.get_peft_model(copy.deepcopy(base), second)
    saved.save_pretrained(tmp_path)
    reference = peft.get_peft_model(copy.deepcopy(base), first)
    model = from_peft(copy.deepcopy(reference), criterion="roofline")
    for m in (reference, model):
        m.add_adapter("b", second)
        m.load_adapter(tmp_path, adapter_name="c")
    layers = lora_layers(model)
    assert any(n.endswith("mlp.down_proj") for n in layers)
    assert all(is_accelerated(m) and m.criterion == "roofline" for m in layers.values())
    assert not any(is_accelerated(m) for m in lora_layers(reference).values())
    model.load_state_dict(reference.state_dict())
    calls = count_op_calls(monkeypatch)
    batch = text_batch()
    with torch.no_grad():
        for name in ("default", "b", "c"):
            for m in (reference, model):
                m.set_adapter(name)
            calls.clear()
            torch.testing.assert_close(model(**batch).logits, reference(**batch).logits)
            assert len(calls) == 2, name  # its two layers, on the op


def test_from_peft_twice_changes_the_criterion_and_nothing_else():
    model = peft.get_peft_model(llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    from_peft(model)
    classes = {type(m) for m in lora_layers(model).values()}
    params = dict(model.named_parameters())
    assert from_peft(model, criterion="roofline") is model
    assert {type(m) for m in lora_layers(model).values()} == classes
    assert {m.criterion for m in lora_layers(model).values()} == {"roofline"}
    assert dict(model.named_parameters()) == params
    with pytest.raises(ValueError, match="unknown criterion 'fastest'"):
        from_peft(model, criterion="fastest")
    assert {m.criterion for m in lora_layers(model).values()} == {"roofline"}


def test_from_pretrained_loads_a_peft_adapter_on_the_op(tmp_path):
    base = llama()
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    reference = peft.get_peft_model(copy.deepcopy(base), config)
    reference.save_pretrained(tmp_path)
    model = runlora.from_pretrained(copy.deepcopy(base), tmp_path)
    assert isinstance(model, peft.PeftModel)
    assert all(is_accelerated(m) for m in lora_layers(model).values())
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**text_batch()).logits, reference(**text_batch()).logits)
    trainable = runlora.from_pretrained(
        copy.deepcopy(base), tmp_path, adapter_name="x", is_trainable=True, criterion="roofline"
    )
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        n.replace(".default.", ".x.") for n, p in reference.named_parameters() if p.requires_grad
    }
    assert {m.criterion for m in lora_layers(trainable).values()} == {"roofline"}
    with pytest.raises(ValueError, match="unknown criterion"):
        runlora.from_pretrained(copy.deepcopy(base), tmp_path, criterion="fastest")
