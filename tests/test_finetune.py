"""runlora finetune: step-by-step parity with PEFT, convergence with dropout, HF Trainer with
gradient checkpointing, the MiniLM task, and one-line errors for bad input."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

import runlora  # noqa: E402
from runlora.cli import main  # noqa: E402
from runlora.recipes import data  # noqa: E402
from runlora.recipes.finetune import FinetuneOptions, finetune, load_task, lora_state  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

PARITY_RTOL = 1e-5
STEPS = 24
#: Tiny model options: seq 32, batch 4, a high lr so that a few dozen steps show learning.
TINY = {"batch_size": 4, "seq_len": 32, "lr": 1e-2, "progress": False}


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> str:
    """A random tiny Llama saved as a local model directory, with no tokenizer (so the byte
    tokenizer is used). Weights drawn with std 0.2 rather than 0.02: with a frozen 64-wide
    output head, logits of the usual scale stay near uniform whatever LoRA learns."""
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        vocab_size=data.ByteTokenizer.vocab_size,
        initializer_range=0.2,
        use_cache=False,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_llama")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def test_runlora_matches_peft_step_by_step(tiny_llama_dir, tmp_path):
    options = FinetuneOptions(
        model=tiny_llama_dir, steps=STEPS, compare=True, output_dir=str(tmp_path), **TINY
    )
    result = finetune(options)
    ours, theirs = result["runs"]["runlora"], result["runs"]["peft"]
    assert len(ours.loss) == len(theirs.loss) == STEPS
    for step, (a, b) in enumerate(zip(ours.loss, theirs.loss, strict=True), 1):
        assert abs(a - b) <= PARITY_RTOL * abs(b), f"step {step}: runlora {a} vs PEFT {b}"
    assert result["summary"]["max_rel_loss_diff"] <= PARITY_RTOL
    assert theirs.loss[-1] < 0.8 * theirs.loss[0]  # it learned: parity is not of a flat line
    assert ours.eval_loss_start == pytest.approx(theirs.eval_loss_start, rel=PARITY_RTOL)
    assert ours.eval_loss_end == pytest.approx(theirs.eval_loss_end, rel=PARITY_RTOL)

    models = result["models"]
    assert _engines(models["runlora"]) == {"runlora"}  # parity is not of PEFT with itself
    assert _engines(models["peft"]) == {"peft"}
    a, b = lora_state(models["runlora"]), lora_state(models["peft"])
    assert a.keys() == b.keys() and len(a) == 2 * 2 * 7  # A and B, 2 blocks, 7 projections
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4, msg=f"{key}")

    from safetensors.torch import load_file

    saved = {k: load_file(tmp_path / k / "adapter_model.safetensors") for k in ("runlora", "peft")}
    assert saved["runlora"].keys() == saved["peft"].keys()
    for key, tensor in saved["peft"].items():
        torch.testing.assert_close(saved["runlora"][key], tensor, rtol=1e-3, atol=1e-4)
    # runlora's adapter in stock PEFT, on a fresh base: the trained weights, the same logits
    import peft

    base = transformers.LlamaForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "runlora").eval()
    assert _engines(loaded) == {"peft"}
    mine = lora_state(loaded)
    assert mine.keys() == a.keys()
    assert all(torch.equal(mine[k], a[k]) for k in a)
    ids = torch.randint(0, data.ByteTokenizer.vocab_size, (2, 16))
    with torch.no_grad():
        trained = models["runlora"].eval()(input_ids=ids).logits
        torch.testing.assert_close(loaded(input_ids=ids).logits, trained, rtol=1e-5, atol=1e-6)
    log = json.loads((tmp_path / "finetune_log.json").read_text())
    assert len(log["runs"]["peft"]["loss"]) == len(log["runs"]["runlora"]["step_time_s"]) == STEPS
    assert (tmp_path / "loss_curves.png").stat().st_size > 10_000


def _engines(model) -> set[str]:
    """Which engines run ``model``'s LoRA layers (``runlora.describe``)."""
    return {row.engine for row in runlora.describe(model, file=None)}


def test_with_dropout_both_backends_converge(tiny_llama_dir):
    options = FinetuneOptions(
        model=tiny_llama_dir, steps=30, lora_dropout=0.1, compare=True, **TINY
    )
    for backend, run in finetune(options)["runs"].items():
        assert run.eval_loss_end < 0.8 * run.eval_loss_start, (backend, run)


@pytest.mark.parametrize("checkpointing", [True, False], ids=["checkpointing", "plain"])
def test_trains_under_hf_trainer(tiny_llama_dir, tmp_path, checkpointing):
    task = load_task(FinetuneOptions(model=tiny_llama_dir, **TINY))
    model = runlora.get_runlora_model(
        task.model, runlora.LoraConfig(r=8, lora_alpha=16, target_modules=task.target_modules)
    )
    assert isinstance(model, __import__("peft").PeftModel)  # what Trainer branches on
    assert _engines(model) == {"runlora"}
    rows = task.train["input_ids"][:64]
    dataset = [{"input_ids": r, "labels": r} for r in rows]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=8,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        label_names=["labels"],
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=dataset, eval_dataset=dataset[:16]
    )
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    assert trainer.evaluate()["eval_loss"] < before
    assert model.get_base_model().is_gradient_checkpointing == checkpointing
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 8 and losses[-1] < 0.85 * losses[0], losses


def test_minilm_classifier_trains_lora_and_a_head(tmp_path):
    options = FinetuneOptions(
        model="minilm",
        steps=2,
        batch_size=4,
        seq_len=32,
        output_dir=str(tmp_path),
        progress=False,
    )
    result = finetune(options)
    assert _engines(result["models"]["runlora"]) == {"runlora"}
    run = result["runs"]["runlora"]
    assert 0.0 <= run.accuracy_start <= 1.0 and 0.0 <= run.accuracy_end <= 1.0
    assert result["task"].label_names == sorted(result["task"].label_names)
    config = json.loads((tmp_path / "runlora" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"]
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "runlora" / "adapter_model.safetensors").keys()
    assert any("classifier" in k for k in keys) and any("query.lora_A" in k for k in keys)


def test_cli_writes_adapter_and_log(tmp_path, capsys):
    out = tmp_path / "out"
    argv = [
        "finetune",
        "-m",
        "llama_tiny",
        "--steps",
        "3",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "-o",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "runlora: 3 steps" in printed and "eval loss" in printed
    assert len(json.loads((out / "finetune_log.json").read_text())["runs"]["runlora"]["loss"]) == 3
    # the adapter loads in stock PEFT on the base the CLI built (shipped config, seed 0)
    import peft

    from runlora.recipes.finetune import _load_causal_lm

    base, _ = _load_causal_lm("llama_tiny", FinetuneOptions().seed)
    loaded = peft.PeftModel.from_pretrained(base, out / "runlora")
    assert sorted(os.listdir(out / "runlora")) == [
        "README.md",  # PEFT's model card
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    trained = [p for n, p in loaded.named_parameters() if ".lora_B." in n]
    assert len(trained) == 2 * 7 and all(torch.count_nonzero(p) > 0 for p in trained)


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("missing", "train file not found"),
        ("empty", "has no text"),
        ("seq_len", "--seq-len 4096 is above llama_tiny's maximum of 128"),
        ("not_a_model", "is not a model directory: it has no config.json"),
        ("broken_config", "cannot read a model config|cannot load a causal LM"),
        ("unknown_name", "unknown model 'llama_nope'"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, case, match):
    text = tmp_path / "train.txt"
    text.write_text("" if case == "empty" else "some text\n" * 100)
    model = {"not_a_model": tmp_path, "broken_config": tmp_path, "unknown_name": "llama_nope"}
    if case == "broken_config":
        (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    argv = [
        "finetune",
        "-m",
        str(model.get(case, "llama_tiny")),
        "--steps",
        "1",
        "--train-file",
        str(tmp_path / "absent.txt" if case == "missing" else text),
        "--seq-len",
        "4096" if case == "seq_len" else "16",
        "-o",
        str(tmp_path / "out"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("runlora finetune: error: ")
    import re

    assert re.search(match, err), err
