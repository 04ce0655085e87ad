"""get_runlora_model against PEFT: same targets, same trainable set, same losses and gradients."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from tiny_models import gpt2, image_batch, llama, loss_of, minilm, text_batch, vit

import runlora
from runlora import LoraConfig, RunLoRALinear, get_runlora_model

peft = pytest.importorskip("peft")

STEPS = 3
LR = 0.1


def peft_config(**kwargs):
    return peft.LoraConfig(**kwargs)


def pair(base, **kwargs):
    """(PEFT model, runlora model) from two copies of ``base``, runlora's adapters set to PEFT's."""
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft_config(**kwargs))
    ours = get_runlora_model(copy.deepcopy(base), LoraConfig(**kwargs))
    ours.load_state_dict(peft_model.state_dict())
    return peft_model, ours


def lora_grads(model):
    return {
        n.replace("runlora.", ""): p.grad.clone()
        for n, p in model.named_parameters()
        if p.requires_grad and p.grad is not None
    }


def frozen(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


CASES = {
    "llama": (
        llama,
        text_batch,
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    ),
    "gpt2": (
        gpt2,
        text_batch,
        dict(
            r=4,
            lora_alpha=16,
            target_modules=["c_attn", "c_fc"],
            fan_in_fan_out=True,
            bias="lora_only",
        ),
    ),
    "vit": (
        vit,
        image_batch,
        dict(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"]
        ),
    ),
    "minilm": (
        minilm,
        lambda seed=0: text_batch(seed, vocab=1000),
        dict(r=4, lora_alpha=8, target_modules=["query", "value"]),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_same_losses_and_gradients_as_peft(case):
    build, batch_of, kwargs = CASES[case]
    base = build()
    peft_model, ours = pair(base, init_lora_weights=False, **kwargs)
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in peft_model.named_parameters() if p.requires_grad
    }
    before = frozen(ours)
    # SGD: Adam would blow rounding-level gradient differences up to lr-sized updates.
    opts = [
        torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=LR)
        for m in (peft_model, ours)
    ]
    for step in range(STEPS):
        batch = batch_of(seed=step)
        losses = []
        for model, opt in zip((peft_model, ours), opts, strict=True):
            model.train()
            opt.zero_grad()
            torch.manual_seed(step)  # the models' own dropout draws the same masks
            loss = loss_of(model, batch)
            loss.backward()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
        expected, actual = lora_grads(peft_model), lora_grads(ours)
        assert actual.keys() == expected.keys() and actual
        for name in expected:
            torch.testing.assert_close(
                actual[name],
                expected[name],
                rtol=1e-4,
                atol=1e-6,
                msg=lambda m, n=name: f"{n}: {m}",
            )
        for opt in opts:
            opt.step()
    after = frozen(ours)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[n], before[n]) for n in before), "a frozen weight changed"
    layers = [m for m in ours.modules() if isinstance(m, RunLoRALinear)]
    assert layers and all(m._last_plan is not None for m in layers)


def test_no_weight_copied_and_paths_match_peft():
    base = llama()
    weight = base.model.layers[0].self_attn.q_proj.weight
    ours = get_runlora_model(base, LoraConfig(r=4, target_modules=["q_proj"]))
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, RunLoRALinear)
    assert layer.base_layer.weight.data_ptr() == weight.data_ptr()
    keys = [k for k in ours.state_dict() if "lora_A" in k]
    assert keys[0] == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(target_modules="all-linear"),
        dict(target_modules=r".*\.(q|v)_proj"),
        dict(
            target_modules=["q_proj", "up_proj"], layers_to_transform=[1], layers_pattern="layers"
        ),
        dict(target_modules=["q_proj", "k_proj"], layers_to_transform=0),
        dict(target_modules="all-linear", exclude_modules=["o_proj", "down_proj"]),
        dict(
            target_modules=["q_proj", "up_proj"],
            exclude_modules=r".*mlp.*",
            rank_pattern={"q_proj": 2},
            alpha_pattern={r"layers\.1\..*": 32},
        ),
    ],
)
def test_targets_ranks_and_scalings_match_peft(kwargs):
    base = llama()
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft_config(r=4, **kwargs))
    ours = get_runlora_model(copy.deepcopy(base), LoraConfig(r=4, **kwargs))
    expected = {
        n: (m.r["default"], m.scaling["default"])
        for n, m in peft_model.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    actual = {
        n: (m.r["default"], m.scaling["default"])
        for n, m in ours.named_modules()
        if isinstance(m, RunLoRALinear)
    }
    assert actual == expected
    assert ours.get_nb_trainable_parameters() == peft_model.get_nb_trainable_parameters()


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_trainable_set_matches_peft(bias):
    base = gpt2()
    kwargs = dict(
        r=4,
        target_modules=["c_attn"],
        bias=bias,
        modules_to_save=["ln_f"],
        use_rslora=True,
        fan_in_fan_out=True,
    )
    peft_model, ours = pair(base, **kwargs)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert ours.get_nb_trainable_parameters() == peft_model.get_nb_trainable_parameters()
    batch = text_batch()
    torch.testing.assert_close(ours(**batch).logits, peft_model(**batch).logits)


def test_merge_and_unload_disable_adapter_and_passthrough(capsys):
    base = llama()
    batch = text_batch()
    with torch.no_grad():
        plain = base(**batch).logits
    ours = get_runlora_model(
        base, LoraConfig(r=4, target_modules=["q_proj", "o_proj"], init_lora_weights=False)
    )
    assert ours.config is base.config
    assert "input_ids" in inspect.signature(ours.forward).parameters
    ours.print_trainable_parameters()
    assert "trainable params: 2,048 || all params:" in capsys.readouterr().out
    with torch.no_grad():
        adapted = ours(**batch).logits
        with ours.disable_adapter():
            torch.testing.assert_close(ours(**batch).logits, plain)
        assert not torch.allclose(adapted, plain)
        assert ours.generate(
            batch["input_ids"][:, :4], max_new_tokens=2, do_sample=False, pad_token_id=0
        ).shape == (2, 6)
        merged = ours.merge_and_unload()
        assert merged is base
        assert not any(isinstance(m, RunLoRALinear) for m in merged.modules())
        torch.testing.assert_close(merged(**batch).logits, adapted, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_trains_the_adapters():
    ours = get_runlora_model(
        llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    )
    ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    ours.train()
    ours(**text_batch()).loss.backward()
    grads = [p.grad for n, p in ours.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_hf_trainer_runs(tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = get_runlora_model(llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    data = [text_batch(seed=i) for i in range(2)]
    rows = [{k: v[0] for k, v in b.items()} for b in data]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    frozen_before = frozen(ours)
    transformers.Trainer(model=ours, args=args, train_dataset=rows).train()
    after = frozen(ours)
    assert all(torch.equal(after[n], frozen_before[n]) for n in frozen_before)
    ours.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_target_matching_nothing_names_closest_modules():
    with pytest.raises(ValueError, match=r"matched no module.*closest module names: q_proj"):
        get_runlora_model(llama(), LoraConfig(target_modules=["q_prj"]))


def test_non_linear_target_is_refused_by_name():
    with pytest.raises(TypeError, match=r"'model.layers.0.input_layernorm' is a LlamaRMSNorm"):
        get_runlora_model(llama(), LoraConfig(target_modules=["input_layernorm"]))


def test_wrapping_twice_is_refused():
    ours = get_runlora_model(llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has runlora adapters"):
        get_runlora_model(ours.get_base_model(), LoraConfig(target_modules=["q_proj"]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(r=0), "r must be a positive int, got 0"),
        (dict(lora_dropout=1.0), r"lora_dropout must be a float in \[0, 1\)"),
        (dict(bias="some"), "bias must be one of none, all, lora_only"),
        (dict(init_lora_weights="pissa"), "init_lora_weights must be True, False or 'gaussian'"),
        (dict(layers_pattern="layers"), "layers_pattern only applies together with"),
        (dict(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\] must be a positive int"),
        (dict(criterion="fastest"), "unknown criterion 'fastest'"),
        (dict(target_modules="(("), "not a valid regex"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        LoraConfig(**kwargs)


def test_public_names():
    for name in ("LoraConfig", "RunLoRALinear", "RunLoRAModel", "get_runlora_model", "from_peft"):
        assert name in runlora.__all__
