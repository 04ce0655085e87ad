"""What runlora's op does not run keeps PEFT's forward, says so in ``describe``, gives PEFT's
results, and a model with no layer on the op warns once."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from conftest import count_op_calls
from tiny_models import llama, text_batch

import runlora
import runlora.layers.layer
from runlora.integrations.peft import is_accelerated

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("single_thread")

FALLBACKS = {
    "lora_bias": (dict(target_modules=["q_proj", "v_proj"], lora_bias=True), "lora_bias"),
    "embedding": (dict(target_modules=["embed_tokens"]), "Embedding LoRA"),
}


@pytest.fixture(autouse=True)
def never_left_patched():
    yield
    runlora.unpatch_peft()


def runlora_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in caught if "runlora" in str(w.message)]


def config(**kwargs):
    return peft.LoraConfig(r=4, init_lora_weights=False, **kwargs)


def grads(model) -> dict:
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def assert_same_as_peft(ours, reference, batch):
    for model in (reference, ours):
        model.train()
        model(**batch).loss.backward()
    torch.testing.assert_close(ours(**batch).logits, reference(**batch).logits)
    expected, actual = grads(reference), grads(ours)
    assert expected.keys() == actual.keys() and expected
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, rtol=1e-4, atol=1e-6, msg=name)


BUILDERS = {
    "get_runlora_model": lambda base, cfg: runlora.get_runlora_model(base, cfg),
    "from_peft": lambda base, cfg: runlora.from_peft(peft.get_peft_model(base, cfg)),
    "patch_peft": lambda base, cfg: _patched(lambda: peft.get_peft_model(base, cfg)),
    "both": lambda base, cfg: _patched(lambda: runlora.get_runlora_model(base, cfg)),
}


def _patched(fn):
    with runlora.patch_peft():
        return fn()


@pytest.mark.parametrize("way", list(BUILDERS))
@pytest.mark.parametrize("case", list(FALLBACKS))
def test_every_layer_falling_back_warns_once_and_gives_pefts_results(case, way, monkeypatch):
    kwargs, why = FALLBACKS[case]
    base = llama()
    reference = peft.get_peft_model(copy.deepcopy(base), config(**kwargs))
    ours, texts = runlora_warnings(lambda: BUILDERS[way](copy.deepcopy(base), config(**kwargs)))
    assert len(texts) == 1 and "none of this model's" in texts[0], texts
    assert "runlora.describe" in texts[0]
    ours.load_state_dict(reference.state_dict())
    calls = count_op_calls(monkeypatch)
    assert_same_as_peft(ours, reference, text_batch())
    assert not calls
    out = io.StringIO()
    rows = runlora.describe(ours, file=out)
    assert rows and all(r.engine == "peft" and why in r.detail for r in rows), rows
    assert f"0 of {len(rows)} LoRA layers run runlora's op" in out.getvalue()
    assert why in out.getvalue()


def test_a_model_with_some_layers_on_the_op_does_not_warn(monkeypatch):
    base = llama()
    cfg = dict(target_modules=["embed_tokens", "q_proj"])
    reference = peft.get_peft_model(copy.deepcopy(base), config(**cfg))
    ours, texts = runlora_warnings(
        lambda: runlora.get_runlora_model(copy.deepcopy(base), config(**cfg))
    )
    assert not texts
    ours.load_state_dict(reference.state_dict())
    calls = count_op_calls(monkeypatch)
    assert_same_as_peft(ours, reference, text_batch())
    assert len(calls) == 2 * 2  # the two q_proj, in the two forwards of assert_same_as_peft
    engines = {
        r.name.rsplit(".", 1)[-1]: (r.engine, r.detail) for r in runlora.describe(ours, file=None)
    }
    assert engines["embed_tokens"] == ("peft", "Embedding LoRA runs PEFT's forward")
    assert engines["q_proj"][0] == "runlora"


def test_a_dora_adapter_beside_a_plain_one_falls_back_when_both_are_active(monkeypatch):
    """One layer, two adapters: the plain one on the op, the DoRA one on the DoRA op, both
    active at once on PEFT's forward (PEFT adds the DoRA term onto the plain one's output);
    always PEFT's results."""
    base = llama()
    models = []
    for build in (peft.get_peft_model, runlora.get_runlora_model):
        model = build(copy.deepcopy(base), config(target_modules=["q_proj"]))
        model.add_adapter("d", config(target_modules=["q_proj"], use_dora=True))
        models.append(model)
    reference, ours = models
    ours.load_state_dict(reference.state_dict())
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert is_accelerated(layer)
    calls = count_op_calls(monkeypatch)
    batch = text_batch()
    for active, on_op in (("default", True), ("d", True), (["default", "d"], False)):
        for model in (reference, ours):
            model.base_model.set_adapter(active)
        calls.clear()
        with torch.no_grad():
            torch.testing.assert_close(ours(**batch).logits, reference(**batch).logits)
        assert bool(calls) == on_op, active
        row = next(
            r for r in runlora.describe(ours, file=None) if r.name.endswith("0.self_attn.q_proj")
        )
        assert row.engine == ("runlora" if on_op else "peft"), (active, row)
        if not on_op:
            assert "several active adapters with DoRA" in row.detail
    ours.eval()
    reference.eval()
    for model in (reference, ours):  # PEFT's own refusal, from PEFT's forward
        with pytest.raises(ValueError, match="DoRA"):
            model(**batch, adapter_names=["d", "default"])
