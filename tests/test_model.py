"""get_runlora_model: a real ``peft.PeftModel`` with runlora's op in its LoRA layers; against
stock PEFT: same targets, same trainable set, same losses and gradients over training steps."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import gpt2, image_batch, llama, loss_of, minilm, text_batch, vit

import runlora
from runlora import LoraConfig, get_runlora_model
from runlora.integrations.peft import is_accelerated

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
        n: p.grad.clone()
        for n, p in model.named_parameters()
        if p.requires_grad and p.grad is not None
    }


def lora_layers(model) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


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
    layers = lora_layers(ours).values()
    assert layers and all(is_accelerated(m) and m._last_plan is not None for m in layers)


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
    actual = {n: (m.r["default"], m.scaling["default"]) for n, m in lora_layers(ours).items()}
    assert actual == expected
    assert all(is_accelerated(m) for m in lora_layers(ours).values())
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
    assert isinstance(ours, peft.PeftModel) and ours.config is base.config
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
        assert not lora_layers(merged) and not any(is_accelerated(m) for m in merged.modules())
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


def test_target_matching_nothing_is_pefts_error():
    with pytest.raises(ValueError, match=r"Target modules \{'q_prj'\} not found in the base model"):
        get_runlora_model(llama(), LoraConfig(target_modules=["q_prj"]))


def test_non_linear_target_is_pefts_error():
    with pytest.raises(ValueError, match=r"Target module LlamaRMSNorm.* is not supported"):
        get_runlora_model(llama(), LoraConfig(target_modules=["input_layernorm"]))


def test_wrapping_twice_is_refused():
    ours = get_runlora_model(llama(), LoraConfig(target_modules=["q_proj"]))
    for model in (ours, ours.get_base_model()):
        with pytest.raises(ValueError, match="already has PEFT adapters.*runlora.from_peft"):
            get_runlora_model(model, LoraConfig(target_modules=["q_proj"]))


def test_criterion_from_the_config_or_the_call():
    targets = ["q_proj"]
    by_config = get_runlora_model(llama(), LoraConfig(target_modules=targets, criterion="roofline"))
    assert {m.criterion for m in lora_layers(by_config).values()} == {"roofline"}
    by_call = get_runlora_model(
        llama(), LoraConfig(target_modules=targets, criterion="roofline"), criterion="flops"
    )
    assert {m.criterion for m in lora_layers(by_call).values()} == {"flops"}
    from_peft_config = get_runlora_model(llama(), peft.LoraConfig(target_modules=targets))
    assert {m.criterion for m in lora_layers(from_peft_config).values()} == {"flops"}
    base = llama()
    with pytest.raises(ValueError, match="unknown criterion 'fastest'"):
        get_runlora_model(base, LoraConfig(target_modules=targets), criterion="fastest")
    assert not lora_layers(base), "the model was changed before the error"


def test_config_types_adapter_name_and_pefts_own_arguments():
    with pytest.raises(TypeError, match="runlora.LoraConfig or a peft.LoraConfig, got dict"):
        get_runlora_model(llama(), {"target_modules": ["q_proj"]})
    ours = get_runlora_model(
        llama().to(torch.bfloat16),
        LoraConfig(target_modules=["q_proj"]),
        adapter_name="sql",
        autocast_adapter_dtype=False,  # PEFT's: adapters stay in the base's bf16
    )
    assert list(ours.peft_config) == ["sql"] and ours.active_adapter == "sql"
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert is_accelerated(layer) and layer.lora_A["sql"].weight.dtype == torch.bfloat16
    assert ours.peft_config["sql"].target_modules == {"q_proj"}
    assert type(ours.peft_config["sql"]) is peft.LoraConfig


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
    for name in (
        "LoraConfig",
        "RunLoRALinear",
        "get_runlora_model",
        "from_peft",
        "from_pretrained",
        "patch_peft",
        "unpatch_peft",
        "describe",
        "lora_linear",
    ):
        assert name in runlora.__all__ and hasattr(runlora, name), name
