"""The new path against PEFT itself, for Llama, GPT-2 (Conv1D, fan_in_fan_out), ViT and
all-MiniLM-L6-v2: a model from ``get_runlora_model`` or from ``peft.get_peft_model`` under
``patch_peft()`` is a ``peft.PeftModel`` whose outputs, LoRA gradients, state-dict keys and
adapter files equal those of an unpatched PEFT model with the same weights, and every targeted
layer runs runlora's op."""

from __future__ import annotations

import copy
import json
import logging
import warnings

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import gpt2, image_batch, llama, loss_of, minilm, text_batch, vit

import runlora
import runlora.layers.layer
from runlora.integrations.peft import is_accelerated

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("single_thread")

CASES = {
    "llama": (
        llama,
        text_batch,
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    ),
    "gpt2": (
        gpt2,
        text_batch,
        dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_fc", "c_proj"], fan_in_fan_out=True),
    ),
    "vit": (
        vit,
        image_batch,
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "fc1"],
            modules_to_save=["classifier"],
        ),
    ),
    "minilm": (
        minilm,
        lambda seed=0: text_batch(seed, vocab=1000),
        dict(r=4, lora_alpha=8, target_modules=["query", "value", "dense"]),
    ),
}
WAYS = ("get_runlora_model", "patch_peft")


@pytest.fixture(autouse=True)
def never_left_patched():
    yield
    runlora.unpatch_peft()


def build_ours(way: str, base, kwargs):
    if way == "get_runlora_model":
        return runlora.get_runlora_model(base, runlora.LoraConfig(**kwargs))
    with runlora.patch_peft():
        return peft.get_peft_model(base, peft.LoraConfig(**kwargs))


def pair(case: str, way: str):
    """(stock PEFT model, ours, base, batch_of, kwargs) with ours' tensors set to PEFT's."""
    build, batch_of, kwargs = CASES[case]
    kwargs = {**kwargs, "init_lora_weights": False}  # B != 0: the LoRA term shows
    base = build()
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    ours = build_ours(way, copy.deepcopy(base), kwargs)
    assert ours.state_dict().keys() == reference.state_dict().keys()
    ours.load_state_dict(reference.state_dict())
    return reference, ours, base, batch_of, kwargs


def lora_layers(model) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


def record_op_calls(monkeypatch) -> list:
    """The base weight (its data_ptr) of every call of runlora's op."""
    calls = []
    real = runlora.layers.layer.run_adapter

    def recording(x, base_args, *args, **kwargs):
        calls.append(base_args[0].data_ptr())
        return real(x, base_args, *args, **kwargs)

    monkeypatch.setattr(runlora.layers.layer, "run_adapter", recording)
    return calls


def grads(model) -> dict:
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("case", list(CASES))
def test_outputs_and_every_lora_gradient_equal_peft(case, way, monkeypatch):
    reference, ours, _, batch_of, _ = pair(case, way)
    assert isinstance(ours, peft.PeftModel) and type(ours) is type(reference)
    layers = lora_layers(ours)
    assert layers.keys() == lora_layers(reference).keys() and layers
    assert all(is_accelerated(m) for m in layers.values())
    assert not any(is_accelerated(m) for m in lora_layers(reference).values())
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in reference.named_parameters() if p.requires_grad
    }
    calls = record_op_calls(monkeypatch)
    batch = batch_of(seed=1)
    outs = []
    for model in (reference, ours):
        model.train()
        torch.manual_seed(3)  # the base models' own dropout (GPT-2, MiniLM) draws the same masks
        out = model(**batch)
        y = out.logits if hasattr(out, "logits") else out.last_hidden_state
        loss = out.loss if getattr(out, "loss", None) is not None else y.pow(2).mean()
        if getattr(out, "pooler_output", None) is not None:  # MiniLM's pooler is adapted too
            loss = loss + out.pooler_output.pow(2).mean()
        loss.backward()
        outs.append(y)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    expected, actual = grads(reference), grads(ours)
    assert actual.keys() == expected.keys()
    for name, grad in expected.items():
        assert grad is not None and actual[name] is not None, name
        torch.testing.assert_close(actual[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # every targeted layer ran the op, once
    ptrs = {m.get_base_layer().weight.data_ptr(): n for n, m in layers.items()}
    ran = {ptrs[p] for p in calls if p in ptrs}
    assert ran == set(layers), f"never ran the op: {sorted(set(layers) - ran)}"
    assert len(calls) == len(layers)
    assert all(row.engine == "runlora" for row in runlora.describe(ours, file=None))


def as_sets(config: dict) -> dict:
    """adapter_config.json content, with the lists PEFT writes from sets (in their set's
    iteration order, which depends on insertion order and hashing) as sets."""
    return {
        k: set(v) if k in ("target_modules", "exclude_modules") and isinstance(v, list) else v
        for k, v in config.items()
    }


def _warnings_and_logs(caplog, fn):
    """``fn()``, and every warning and log record (WARNING or above) it gave, as text."""
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        result = fn()
    texts = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    return result, texts


def _about_config(texts) -> list:
    words = ("unexpected", "unknown", "ignored", "criterion")
    return [t for t in texts if any(w in t.lower() for w in words)]


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("case", list(CASES))
def test_adapter_files_equal_peft_and_load_in_stock_peft(case, way, tmp_path, caplog):
    reference, ours, base, batch_of, kwargs = pair(case, way)
    ours.save_pretrained(tmp_path / "ours")
    reference.save_pretrained(tmp_path / "peft")
    mine = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert mine.keys() == theirs.keys() and mine
    for key, value in theirs.items():
        assert torch.equal(mine[key], value), key
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert "criterion" not in config
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert as_sets(config) == as_sets(peft_config)

    runlora.unpatch_peft()  # stock PEFT, whichever way ours was built
    loaded, texts = _warnings_and_logs(
        caplog, lambda: peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    )
    assert not _about_config(texts), texts
    assert not any(is_accelerated(m) for m in lora_layers(loaded).values())
    batch = batch_of(seed=2)
    for model in (ours, loaded):
        model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loss_of(ours, batch), loss_of(loaded, batch), rtol=1e-5, atol=1e-6
        )


def test_the_warning_check_would_see_an_unknown_key(tmp_path, caplog):
    """The check above is not vacuous: a 'criterion' key in the file is reported by PEFT."""
    base = llama()
    model = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["q_proj"])
    )
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "criterion": "flops"}))
    _, texts = _warnings_and_logs(caplog, lambda: peft.PeftModel.from_pretrained(base, tmp_path))
    assert _about_config(texts)


def test_state_dict_keys_are_pefts_and_no_weight_is_copied():
    base = llama()
    weight = base.model.layers[0].self_attn.q_proj.weight
    ours = runlora.get_runlora_model(base, runlora.LoraConfig(r=4, target_modules=["q_proj"]))
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, peft.tuners.lora.Linear) and is_accelerated(layer)
    assert layer.get_base_layer().weight is weight
    keys = [k for k in ours.state_dict() if "lora_A" in k]
    assert keys[0] == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert all(".runlora" not in k for k in ours.state_dict())
