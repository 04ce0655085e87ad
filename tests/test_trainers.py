"""runlora inside TRL's SFTTrainer and DPOTrainer and HF's Trainer: the model stays PEFT's own
``PeftModel``, so the trainers treat it as PEFT's (adapter-only checkpoints, resume, the
reference model of DPO as the model with its adapters disabled), while every targeted layer
runs runlora's op. A tiny Llama in fp32 on CPU, a few steps each."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

import runlora  # noqa: E402
from runlora.integrations.peft import is_accelerated  # noqa: E402
from runlora.layers.layer import LoRAEngine  # noqa: E402

pytestmark = pytest.mark.slow

TARGETS = ["q_proj", "v_proj", "down_proj"]
STEPS, SAVE_EVERY = 4, 2
LOSS_TOL = {"rtol": 1e-5, "atol": 1e-5}  # fp32, the same math in another order


@pytest.fixture(autouse=True)
def _unpatch():
    """Every test leaves PEFT as it found it, even when it fails."""
    runlora.unpatch_peft()
    yield
    runlora.unpatch_peft()


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level tokenizer built in code: the 256 bytes, then <s> 256, </s> 257, <pad> 258."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<s>": 256, "</s>": 257, "<pad>": 258})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def base_model():
    """The same random tiny Llama on every call."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=259,
        max_position_embeddings=128,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
    )
    return transformers.LlamaForCausalLM(config)


def lora_config(**kwargs):
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, **kwargs)


TEXTS = datasets.Dataset.from_dict(
    {"text": [f"line {i}: the quick brown fox jumps over {i % 7} lazy dogs." for i in range(32)]}
)


@pytest.fixture
def op_calls(monkeypatch) -> dict[int, int]:
    """id(layer) -> how many times runlora's op ran in that layer (alone or in a fused call of
    its shared-input group: each notes the plan it ran)."""
    calls: dict[int, int] = {}
    real = LoRAEngine.note_plan

    def counted(self, *args, **kwargs):
        calls[id(self)] = calls.get(id(self), 0) + 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LoRAEngine, "note_plan", counted)
    return calls


def targeted_layers(model) -> dict[str, torch.nn.Module]:
    layers = {n: m for n, m in model.named_modules() if n.split(".")[-1] in TARGETS}
    assert len(layers) == 2 * len(TARGETS)
    return layers


def assert_all_ran_runlora(model, calls: dict[int, int], at_least: int) -> None:
    assert isinstance(model, peft.PeftModel)
    for name, layer in targeted_layers(model).items():
        assert is_accelerated(layer), f"{name} is a {type(layer).__name__}"
        assert isinstance(layer, peft.tuners.lora.Linear)  # still PEFT's class
        assert calls.get(id(layer), 0) >= at_least, f"{name}: op ran {calls.get(id(layer))}x"
    rows = runlora.describe(model, file=None)
    assert rows and all(r.engine == "runlora" and "PEFT's forward" not in r.detail for r in rows)


def assert_fused(model) -> None:
    """q_proj and v_proj read one input: by default they run as one fused op (from the step
    after the first backward, under checkpointing)."""
    rows = {r.name: r.detail for r in runlora.describe(model, file=None)}
    q_rows = [d for n, d in rows.items() if n.endswith("q_proj")]
    assert q_rows and all(d.endswith("fused with v_proj") for d in q_rows), q_rows
    for name, layer in model.named_modules():
        if name.endswith("q_proj") and is_accelerated(layer):
            fusion = runlora.layers.groups.group_of(layer).fusion
            assert fusion is not None and fusion.fused, (name, fusion)  # it ran, fused


def logged_losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def adapter_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def assert_adapter_only_checkpoint(directory, model) -> None:
    files = set(os.listdir(directory))
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files, files
    assert not {"model.safetensors", "pytorch_model.bin"} & files, files
    base_bytes = sum(p.numel() * p.element_size() for p in model.get_base_model().parameters())
    size = os.path.getsize(os.path.join(directory, "adapter_model.safetensors"))
    assert size < base_bytes / 20, (size, base_bytes)


# --- TRL SFTTrainer ------------------------------------------------------------------------


def sft_trainer(how: str, out, tokenizer, config=None, **overrides):
    """An SFTTrainer with PEFT's LoRA ("peft"), runlora's model ("get_runlora_model"), or a plain
    model and ``peft_config=`` under ``patch_peft`` ("patch_peft")."""
    args = trl.SFTConfig(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_steps=SAVE_EVERY,
        max_length=64,
        bf16=False,  # TRL's default is bf16
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        seed=0,
        **overrides,
    )
    if how == "get_runlora_model":
        model = base_model()
        transformers.set_seed(args.seed)  # the adapter init SFTTrainer(peft_config=) gets
        model = runlora.get_runlora_model(model, config or lora_config())
        return trl.SFTTrainer(
            model=model, args=args, train_dataset=TEXTS, processing_class=tokenizer
        )
    if how == "patch_peft":
        runlora.patch_peft()
    return trl.SFTTrainer(
        model=base_model(),
        args=args,
        train_dataset=TEXTS,
        processing_class=tokenizer,
        peft_config=config or lora_config(),
    )


@pytest.fixture(scope="module")
def peft_sft_losses(tokenizer, tmp_path_factory) -> list[float]:
    """The losses of the same SFT run on PEFT's own LoRA layers."""
    runlora.unpatch_peft()
    trainer = sft_trainer(
        "peft", tmp_path_factory.mktemp("peft_sft"), tokenizer, save_strategy="no"
    )
    assert not any(is_accelerated(m) for m in trainer.model.modules())
    trainer.train()
    return logged_losses(trainer)


@pytest.mark.parametrize("how", ["get_runlora_model", "patch_peft"])
def test_sft_trainer_trains_like_peft_saves_adapters_and_resumes(
    how, tokenizer, peft_sft_losses, op_calls, tmp_path
):
    trainer = sft_trainer(how, tmp_path / "run", tokenizer)  # gradient checkpointing on (TRL's)
    trainer.train()
    assert_all_ran_runlora(trainer.model, op_calls, at_least=STEPS)
    assert_fused(trainer.model)
    losses = logged_losses(trainer)
    assert len(losses) == STEPS
    torch.testing.assert_close(losses, peft_sft_losses, **LOSS_TOL)
    assert losses[-1] < losses[0]

    for step in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY):
        assert_adapter_only_checkpoint(tmp_path / "run" / f"checkpoint-{step}", trainer.model)
    final = adapter_weights(trainer.model)

    op_calls.clear()
    resumed = sft_trainer(how, tmp_path / "resumed", tokenizer)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / f"checkpoint-{SAVE_EVERY}"))
    assert resumed.state.global_step == STEPS
    assert_all_ran_runlora(resumed.model, op_calls, at_least=STEPS - SAVE_EVERY)
    torch.testing.assert_close(logged_losses(resumed)[-2:], losses[-2:], **LOSS_TOL)
    again = adapter_weights(resumed.model)
    assert again.keys() == final.keys()
    for name, value in final.items():
        torch.testing.assert_close(again[name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_sft_trainer_without_checkpointing_recomputes_lora_inputs(
    tokenizer, peft_sft_losses, op_calls, tmp_path
):
    """TRL checkpoints by default (then nothing is recomputed); without it, the LoRA layers
    after a norm or the MLP's product train on inputs formed again in backward, with PEFT's
    losses."""
    trainer = sft_trainer(
        "patch_peft", tmp_path / "run", tokenizer, gradient_checkpointing=False, save_strategy="no"
    )
    trainer.train()
    assert_all_ran_runlora(trainer.model, op_calls, at_least=STEPS)
    torch.testing.assert_close(logged_losses(trainer), peft_sft_losses, **LOSS_TOL)
    details = [r.detail for r in runlora.describe(trainer.model, file=None)]
    assert any("input recomputed" in d for d in details), details
    assert_fused(trainer.model)


def test_sft_trainer_with_dora_runs_runlora_dora_like_peft(tokenizer, op_calls, tmp_path):
    """``peft_config=LoraConfig(use_dora=True)`` under ``patch_peft``: every DoRA layer runs
    runlora's DoRA op, the losses are PEFT DoRA's, checkpoints hold the magnitude vectors."""
    config = lora_config(use_dora=True)
    runlora.unpatch_peft()
    reference = sft_trainer("peft", tmp_path / "peft", tokenizer, config, save_strategy="no")
    reference.train()
    trainer = sft_trainer("patch_peft", tmp_path / "run", tokenizer, config)
    trainer.train()
    assert_all_ran_runlora(trainer.model, op_calls, at_least=STEPS)
    torch.testing.assert_close(logged_losses(trainer), logged_losses(reference), **LOSS_TOL)
    checkpoint = tmp_path / "run" / f"checkpoint-{SAVE_EVERY}"
    assert_adapter_only_checkpoint(checkpoint, trainer.model)
    from safetensors.torch import load_file

    keys = load_file(checkpoint / "adapter_model.safetensors").keys()
    assert sum("lora_magnitude_vector" in k for k in keys) == len(targeted_layers(trainer.model))


# --- TRL DPOTrainer ------------------------------------------------------------------------


def test_dpo_trainer_under_patch_peft_uses_the_base_as_reference(
    tokenizer, op_calls, monkeypatch, tmp_path
):
    pairs = datasets.Dataset.from_dict(
        {
            "prompt": [f"{i} plus one is" for i in range(16)],
            "chosen": [f" {i + 1}." for i in range(16)],
            "rejected": [f" {i + 2}." for i in range(16)],
        }
    )
    base = base_model()
    base_storages = {p.untyped_storage().data_ptr() for p in base.parameters()}
    args = trl.DPOConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        bf16=False,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
    )
    with runlora.patch_peft():
        trainer = trl.DPOTrainer(
            model=base,
            args=args,
            train_dataset=pairs,
            processing_class=tokenizer,
            peft_config=lora_config(),
        )
    assert trainer.ref_model is None  # the reference is the model with its adapters disabled
    disabled = []
    real_disable = peft.PeftModel.disable_adapter
    monkeypatch.setattr(
        peft.PeftModel, "disable_adapter", lambda self: disabled.append(1) or real_disable(self)
    )
    trainer.train()
    assert len(disabled) >= 2  # a reference pass per step
    assert_all_ran_runlora(trainer.model, op_calls, at_least=2)

    # no second copy of the base: every frozen tensor the trainer holds is one of the base's
    frozen = [p for p in trainer.model.parameters() if not p.requires_grad]
    assert len(frozen) == len(base_storages)
    assert {p.untyped_storage().data_ptr() for p in frozen} == base_storages
    # at step 1 B = 0, so the policy is the reference and the DPO loss is exactly log 2
    losses = logged_losses(trainer)
    assert len(losses) == 2
    assert losses[0] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-6)
    lora_b = [p for n, p in trainer.model.named_parameters() if ".lora_B." in n]
    assert lora_b and all(torch.count_nonzero(p) > 0 for p in lora_b)  # it trained


# --- HF Trainer ----------------------------------------------------------------------------


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int = 32, seq: int = 16) -> None:
        self.ids = torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def hf_trainer(out):
    torch.manual_seed(1)  # the adapter init
    model = runlora.get_runlora_model(
        base_model(), runlora.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
    )
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_steps=SAVE_EVERY,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=Rows())


def test_hf_trainer_saves_adapter_only_checkpoints_and_resumes(op_calls, tmp_path):
    trainer = hf_trainer(tmp_path / "run")
    trainer.train()
    assert_all_ran_runlora(trainer.model, op_calls, at_least=STEPS)
    assert_adapter_only_checkpoint(tmp_path / "run" / f"checkpoint-{SAVE_EVERY}", trainer.model)
    losses = logged_losses(trainer)
    final = adapter_weights(trainer.model)

    resumed = hf_trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / f"checkpoint-{SAVE_EVERY}"))
    assert resumed.state.global_step == STEPS
    torch.testing.assert_close(logged_losses(resumed)[-2:], losses[-2:], **LOSS_TOL)
    again = adapter_weights(resumed.model)
    for name, value in final.items():
        torch.testing.assert_close(again[name], value, rtol=1e-4, atol=1e-6, msg=name)
