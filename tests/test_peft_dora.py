"""PEFT's DoRA layers (``use_dora=True``) run runlora's ``dora_linear``: against stock PEFT, the
outputs and the gradients of every LoRA parameter and magnitude vector match (Llama, GPT-2's
Conv1D, a 4-bit base, a bf16 base with fp32 adapters), with PEFT's keys and files; merge /
unmerge / ``merge_and_unload``; and what stays on PEFT's forward says why."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import gpt2, llama, text_batch

import runlora
import runlora.layers.layer
from runlora.integrations.peft import is_accelerated

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("single_thread")

LLAMA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
GPT2 = dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_fc", "c_proj"], fan_in_fan_out=True)


def _pair(build, kwargs, way="from_peft", base=None):
    """(stock PEFT DoRA model, runlora's) with the same weights (B != 0, m != ‖W‖)."""
    kwargs = {**kwargs, "use_dora": True, "init_lora_weights": False}
    base = build() if base is None else base
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    with torch.no_grad():  # move m away from ‖W + s·B A‖ so that g != 1 shows
        for name, p in reference.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(torch.linspace(0.5, 1.5, p.numel()).to(p.dtype))
    if way == "patch_peft":
        with runlora.patch_peft():
            ours = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
        ours.load_state_dict(reference.state_dict())
    else:
        ours = runlora.from_peft(copy.deepcopy(reference))
    return reference, ours


def _dora_calls(monkeypatch) -> list:
    calls = []
    real = runlora.layers.layer.dora_linear

    def counting(*args, **kwargs):
        calls.append(args[4].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(runlora.layers.layer, "dora_linear", counting)
    return calls


def _lora_layers(model) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


def _step(model, batch, seed=3):
    model.train()
    torch.manual_seed(seed)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


def _assert_same(reference, ours, batch, rtol=1e-5, atol=1e-6, grad_rtol=1e-4, grad_atol=1e-6):
    y_ref, g_ref = _step(reference, batch)
    y, g = _step(ours, batch)
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)
    assert g.keys() == g_ref.keys()
    assert any("lora_magnitude_vector" in n for n in g)
    for name, grad in g_ref.items():
        assert grad is not None and g[name] is not None, name
        torch.testing.assert_close(g[name], grad, rtol=grad_rtol, atol=grad_atol, msg=name)


@pytest.mark.parametrize("way", ["from_peft", "patch_peft"])
@pytest.mark.parametrize("case", ["llama", "gpt2"])
def test_dora_outputs_and_every_gradient_equal_peft(case, way, monkeypatch):
    build, kwargs = (llama, LLAMA) if case == "llama" else (gpt2, GPT2)
    reference, ours = _pair(build, kwargs, way)
    layers = _lora_layers(ours)
    assert layers and all(is_accelerated(m) for m in layers.values())
    calls = _dora_calls(monkeypatch)
    _assert_same(reference, ours, text_batch(seed=1))
    assert len(calls) == len(layers)  # every DoRA layer ran runlora's DoRA op, once
    rows = runlora.describe(ours, file=None)
    assert rows and all(r.engine == "runlora" for r in rows)
    assert ours.state_dict().keys() == reference.state_dict().keys()


@pytest.mark.parametrize("save_output", [True, False])
def test_dora_without_saving_the_output_is_as_exact(save_output, monkeypatch):
    reference, ours = _pair(llama, LLAMA)
    assert runlora.from_peft(ours, dora_save_output=save_output) is ours
    assert all(m.dora_save_output is save_output for m in _lora_layers(ours).values())
    _assert_same(reference, ours, text_batch(seed=2))
    with pytest.raises(TypeError, match="dora_save_output"):
        runlora.from_peft(ours, dora_save_output="no")


def test_dora_with_dropout_in_eval_equals_peft_and_trains_in_train_mode():
    reference, ours = _pair(llama, {**LLAMA, "lora_dropout": 0.1})
    batch = text_batch(seed=4)
    reference.eval(), ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            ours(**batch).logits, reference(**batch).logits, rtol=1e-5, atol=1e-6
        )
    # in training the masks are runlora's (regenerated from a seed), so compare the statistics:
    # every parameter gets a finite gradient and the loss is close to PEFT's
    ours.train()
    torch.manual_seed(0)
    loss = ours(**batch).loss
    loss.backward()
    for name, p in ours.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_merge_unmerge_and_merge_and_unload_keep_the_outputs():
    reference, ours = _pair(llama, LLAMA)
    batch = text_batch(seed=5)
    ours.eval(), reference.eval()
    with torch.no_grad():
        expected = reference(**batch).logits
        torch.testing.assert_close(ours(**batch).logits, expected, rtol=1e-5, atol=1e-5)
        ours.merge_adapter()
        torch.testing.assert_close(ours(**batch).logits, expected, rtol=1e-4, atol=1e-4)
        ours.unmerge_adapter()
        # the cached ‖W‖² of the weights merge and unmerge rewrote is not reused
        torch.testing.assert_close(ours(**batch).logits, expected, rtol=1e-4, atol=1e-4)
        merged = ours.merge_and_unload()
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=1e-4, atol=1e-4)


def test_an_in_place_edit_of_the_base_weight_is_seen():
    reference, ours = _pair(llama, LLAMA)
    batch = text_batch(seed=6)
    ours.eval(), reference.eval()
    with torch.no_grad():
        ours(**batch)  # fills the ‖W‖² cache
        for model in (reference, ours):
            q = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
            q.weight.mul_(1.5)
        torch.testing.assert_close(
            ours(**batch).logits, reference(**batch).logits, rtol=1e-5, atol=1e-5
        )


def test_dora_on_a_bf16_base_with_fp32_adapters_is_within_bf16():
    base = llama().to(torch.bfloat16)
    reference, ours = _pair(llama, LLAMA, base=base)
    assert next(p for n, p in ours.named_parameters() if "magnitude" in n).dtype == torch.float32
    _assert_same(
        reference, ours, text_batch(seed=7), rtol=2e-2, atol=2e-2, grad_rtol=5e-2, grad_atol=5e-2
    )


def test_dora_on_a_4bit_base_equals_peft():
    pytest.importorskip("bitsandbytes")
    from runlora.layers.quant import quantize_model

    base = quantize_model(llama(), 4, torch.float32)
    reference, ours = _pair(llama, LLAMA, base=base)
    assert all(is_accelerated(m) for m in _lora_layers(ours).values())
    _assert_same(reference, ours, text_batch(seed=8), rtol=1e-4, atol=1e-5, grad_atol=1e-5)


def test_several_active_adapters_with_dora_run_pefts_forward(monkeypatch):
    reference, ours = _pair(llama, LLAMA)
    for model in (reference, ours):
        model.add_adapter("plain", peft.LoraConfig(**{**LLAMA, "init_lora_weights": False}))
    ours.load_state_dict(reference.state_dict())
    for model in (reference, ours):
        model.base_model.set_adapter(["default", "plain"])
    calls = _dora_calls(monkeypatch)
    batch = text_batch(seed=9)
    ours.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            ours(**batch).logits, reference(**batch).logits, rtol=1e-5, atol=1e-6
        )
    assert not calls
    rows = runlora.describe(ours, file=None)
    assert all(r.engine == "peft" and "several active adapters" in r.detail for r in rows)


def test_saved_adapter_files_are_pefts_and_load_back_on_the_op(tmp_path, monkeypatch):
    base = llama()
    reference, ours = _pair(llama, LLAMA, base=base)
    ours.save_pretrained(tmp_path / "ours")
    reference.save_pretrained(tmp_path / "ref")
    from safetensors.torch import load_file

    a = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    b = load_file(tmp_path / "ref" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any("lora_magnitude_vector" in k for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    loaded = runlora.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    calls = _dora_calls(monkeypatch)
    batch = text_batch(seed=10)
    loaded.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(**batch).logits, reference(**batch).logits, rtol=1e-5, atol=1e-6
        )
    assert calls


@pytest.mark.slow
def test_a_dora_layer_compiles_with_fullgraph():
    """The DoRA orders are chosen outside the traced graph: one graph, eager's values."""
    _, ours = _pair(llama, LLAMA)
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    eager = layer(x)
    (gx_eager,) = torch.autograd.grad(eager.sum(), x)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    y = compiled(x)
    (gx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(y, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, gx_eager, rtol=1e-5, atol=1e-6)
