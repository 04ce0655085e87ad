"""The scripts in examples/ run as a user runs them (subprocesses), and their models learn."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).parents[1] / "examples"
TIMEOUT_S = 240


def run(args: list[str], cwd: Path, **env: str) -> str:
    """stdout + stderr of ``python args...``; fails the test with the output on a bad exit."""
    done = subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **env},
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"{args} exited with {done.returncode}:\n{out[-4000:]}"
    return out


def adapter_rank(directory: Path) -> int:
    """``r`` of the PEFT adapter saved in ``directory`` (its weights file must be there too)."""
    assert (directory / "adapter_model.safetensors").is_file()
    return json.loads((directory / "adapter_config.json").read_text())["r"]


def eval_losses(out: str) -> tuple[float, float]:
    before = float(re.search(r"eval loss before:\s*([\d.]+)", out).group(1))
    after = float(re.search(r"eval loss after:\s*([\d.]+)", out).group(1))
    return before, after


def test_train_loop_learns(tmp_path):
    out = run([str(EXAMPLES / "train_loop.py")], tmp_path)
    before, after = eval_losses(out)
    assert after < before - 0.5
    assert "14 of 14 LoRA layers run runlora's op" in out
    assert adapter_rank(tmp_path / "loop_out" / "adapter") == 8


@pytest.mark.parametrize("flags", [[], ["--no-checkpointing"]])
def test_train_trainer_learns_and_saves_a_peft_adapter(tmp_path, flags):
    out = run([str(EXAMPLES / "train_trainer.py"), "--steps", "10", *flags], tmp_path)
    before, after = eval_losses(out)
    assert after < before - 0.1
    assert adapter_rank(tmp_path / "trainer_out" / "adapter") == 8


def test_train_sft_learns_on_runlora_and_saves_a_peft_adapter(tmp_path):
    pytest.importorskip("trl")
    out = run([str(EXAMPLES / "train_sft.py"), "--steps", "20"], tmp_path)
    before, after = eval_losses(out)
    assert after < before - 0.5
    assert "8 of 8 LoRA layers run runlora's op" in out  # TRL's layers, patched by patch_peft
    assert adapter_rank(tmp_path / "sft_out" / "adapter") == 8


def test_accelerate_example_under_torchrun_on_two_cpu_ranks(tmp_path):
    import torch

    import runlora
    from runlora.configs import build_model, load_config

    out = run(
        [
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(EXAMPLES / "accelerate_train.py"),
            "--model",
            "llama_tiny",
            "--steps",
            "2",
            "--out",
            str(tmp_path / "adapter"),
        ],
        tmp_path,
        ACCELERATE_USE_CPU="true",
    )
    assert re.search(r"\d+ plans shared by 2 ranks", out), out[-2000:]
    base = build_model(load_config("llama_tiny"), seed=0)
    model = runlora.from_pretrained(base, tmp_path / "adapter")
    trained = [p for n, p in model.named_parameters() if ".lora_B." in n]
    assert trained and all(torch.count_nonzero(p) > 0 for p in trained)  # B starts at 0
