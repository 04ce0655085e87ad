"""patch_peft / unpatch_peft: while patched, every LoRA layer PEFT creates (get_peft_model,
PeftModel.from_pretrained, add_adapter, load_adapter) runs runlora's op; unpatched, PEFT is
exactly as it was."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import llama, text_batch

import runlora
from runlora.integrations.peft import is_accelerated

peft = pytest.importorskip("peft")
from peft.tuners.lora import LoraModel  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

CONFIG = dict(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
OTHER = dict(r=2, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
ORIGINAL = dict(LoraModel.__dict__)  # as imported, before any test patched it


@pytest.fixture(autouse=True)
def never_left_patched():
    runlora.unpatch_peft()
    yield
    runlora.unpatch_peft()
    assert dict(LoraModel.__dict__) == ORIGINAL


def lora_layers(model) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


def all_accelerated(model) -> bool:
    layers = lora_layers(model)
    return bool(layers) and all(is_accelerated(m) for m in layers.values())


def none_accelerated(model) -> bool:
    layers = lora_layers(model)
    return bool(layers) and not any(is_accelerated(m) for m in layers.values())


def test_every_way_peft_creates_layers_is_accelerated(tmp_path):
    base = llama()
    peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**CONFIG)).save_pretrained(
        tmp_path / "a"
    )
    other = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**OTHER))
    other.save_pretrained(tmp_path / "b")
    with runlora.patch_peft():
        built = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**CONFIG))
        assert all_accelerated(built)
        built.add_adapter("b", peft.LoraConfig(**OTHER))  # down_proj: a new layer
        assert "mlp.down_proj" in " ".join(lora_layers(built))
        assert all_accelerated(built)
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")
        assert all_accelerated(loaded)
        loaded.load_adapter(tmp_path / "b", adapter_name="b")
        assert all_accelerated(loaded) and set(loaded.peft_config) == {"default", "b"}
    assert dict(LoraModel.__dict__) == ORIGINAL
    # made while patched, they keep runlora's forward; and they compute PEFT's results
    assert all_accelerated(loaded)
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")
    reference.load_adapter(tmp_path / "b", adapter_name="b")
    assert none_accelerated(reference)
    batch = text_batch()
    with torch.no_grad():
        for name in ("default", "b"):
            loaded.set_adapter(name)
            reference.set_adapter(name)
            torch.testing.assert_close(loaded(**batch).logits, reference(**batch).logits)


def test_unpatch_gives_pefts_plain_classes_back():
    runlora.patch_peft()
    assert dict(LoraModel.__dict__) != ORIGINAL
    assert all_accelerated(peft.get_peft_model(llama(), peft.LoraConfig(**CONFIG)))
    runlora.unpatch_peft()
    assert dict(LoraModel.__dict__) == ORIGINAL
    model = peft.get_peft_model(llama(), peft.LoraConfig(**CONFIG))
    assert none_accelerated(model)
    assert {type(m) for m in lora_layers(model).values()} == {peft.tuners.lora.Linear}
    runlora.unpatch_peft()  # a no-op when not patched
    assert dict(LoraModel.__dict__) == ORIGINAL


def test_the_with_block_unpatches_also_on_error():
    with pytest.raises(RuntimeError, match="boom"), runlora.patch_peft():
        assert all_accelerated(peft.get_peft_model(llama(), peft.LoraConfig(**CONFIG)))
        raise RuntimeError("boom")
    assert dict(LoraModel.__dict__) == ORIGINAL
    assert none_accelerated(peft.get_peft_model(llama(), peft.LoraConfig(**CONFIG)))


def test_patching_twice_is_fine_and_changes_the_criterion():
    runlora.patch_peft()
    patched = dict(LoraModel.__dict__)
    runlora.patch_peft(criterion="roofline")
    assert dict(LoraModel.__dict__) == patched  # not wrapped twice
    model = peft.get_peft_model(llama(), peft.LoraConfig(**CONFIG))
    assert {m.criterion for m in lora_layers(model).values()} == {"roofline"}
    with torch.no_grad():
        model(**text_batch())
    runlora.unpatch_peft()  # one unpatch undoes both
    assert dict(LoraModel.__dict__) == ORIGINAL


def test_a_with_block_inside_a_patched_script_leaves_it_patched():
    runlora.patch_peft()
    patched = dict(LoraModel.__dict__)
    with runlora.patch_peft(criterion="roofline"):
        model = peft.get_peft_model(llama(), peft.LoraConfig(**CONFIG))
    assert {m.criterion for m in lora_layers(model).values()} == {"roofline"}
    assert dict(LoraModel.__dict__) == patched
    later = peft.get_peft_model(llama(), peft.LoraConfig(**CONFIG))
    assert all_accelerated(later)
    assert {m.criterion for m in lora_layers(later).values()} == {"flops"}


def test_an_unknown_criterion_is_refused_before_patching():
    with pytest.raises(ValueError, match="unknown criterion 'fastest'"):
        runlora.patch_peft(criterion="fastest")
    assert dict(LoraModel.__dict__) == ORIGINAL


def test_get_runlora_model_under_patch():
    with runlora.patch_peft(criterion="roofline"):
        model = runlora.get_runlora_model(llama(), runlora.LoraConfig(**CONFIG))
    assert all_accelerated(model)
    # get_runlora_model's own criterion (the config's, "flops") wins for its model
    assert {m.criterion for m in lora_layers(model).values()} == {"flops"}
