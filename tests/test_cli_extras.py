"""Each ``runlora`` command checks its optional dependencies before any work: a missing hard
need exits 2 with one line naming the extra to install; missing matplotlib only skips the PNG,
with one warning line. Each command runs in a subprocess where a meta-path finder makes the
named packages unimportable, as if not installed."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

from runlora.cli import CliError, main, optional, require  # noqa: E402

SRC = Path(__file__).parents[1] / "src"
TIMEOUT_S = 240
#: a bench run of a few steps on the smallest shipped config.
TINY_BENCH = [
    "bench", "-m", "llama_tiny", "--batch-size", "2", "--seq-len", "16", "--min-run-time", "0",
    "--min-rounds", "2", "--warmup", "1", "--no-progress",
]  # fmt: skip
TINY_FINETUNE = [
    "finetune", "-m", "llama_tiny", "--steps", "2", "--seq-len", "16", "--batch-size", "2",
    "--no-progress",
]  # fmt: skip
TINY_LAYER = [
    "layer-bench", "--shapes", "32x48", "-r", "4", "-n", "64", "--min-run-time", "0",
    "--min-rounds", "1", "--warmup", "0", "--no-progress",
]  # fmt: skip
TINY_PLAN = ["plan", "-m", "llama_tiny", "--batch-size", "2", "--seq-len", "16"]

#: ``python -c`` this, then the hidden packages (comma-separated), then the command line.
WITHOUT = """
import sys

hidden = set(sys.argv[1].split(","))


class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in hidden:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NotInstalled())
from runlora.cli import main

sys.exit(main(sys.argv[2:]))
"""


def run_without(hidden: list[str], argv: list[str]) -> subprocess.CompletedProcess:
    """``runlora *argv`` in a fresh interpreter that cannot import ``hidden``."""
    path = os.pathsep.join([str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", WITHOUT, ",".join(hidden), *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("runlora ")]


def test_require_names_what_is_missing_and_the_extra():
    require(["torch", "json"], "hf")  # installed: nothing happens
    with pytest.raises(CliError) as err:
        require(["torch", "runlora_no_such_module"], "bench")
    assert str(err.value) == (
        "runlora_no_such_module is not installed: pip install 'runlora[bench]'"
    )
    with pytest.raises(CliError, match="^no_a and no_b are not installed: pip install 'runlora"):
        require(["no_a", "no_b"], "hf")


def test_optional_warns_once_and_says_what_is_skipped(capsys):
    assert optional("torch", "bench", command="bench", skipped="x.png is not drawn")
    assert capsys.readouterr().err == ""
    assert not optional("no_such_plotter", "bench", command="bench", skipped="x.png is not drawn")
    assert capsys.readouterr().err.splitlines() == [
        "runlora bench: warning: no_such_plotter is not installed, so x.png is not drawn: "
        "pip install 'runlora[bench]'"
    ]


@pytest.mark.parametrize(
    ("hidden", "argv", "line"),
    [
        (["peft"], TINY_BENCH, "runlora bench: error: peft is not installed: pip install "
         "'runlora[bench]'"),
        (["peft", "transformers"], TINY_BENCH, "runlora bench: error: transformers and peft are "
         "not installed: pip install 'runlora[bench]'"),
        (["bitsandbytes"], [*TINY_BENCH, "--quant", "4bit"], "runlora bench: error: "
         "bitsandbytes is not installed: pip install 'runlora[quant]'"),
        (["peft"], [*TINY_FINETUNE, "--compare"], "runlora finetune: error: peft is not "
         "installed: pip install 'runlora[hf]'"),
        (["peft"], TINY_LAYER, "runlora layer-bench: error: peft is not installed: pip install "
         "'runlora[bench]'"),
        (["transformers"], TINY_PLAN, "runlora plan: error: transformers is not installed: pip "
         "install 'runlora[hf]'"),
        (["transformers"], ["bench", "--list"], "runlora bench: error: transformers is not "
         "installed: pip install 'runlora[hf]'"),
    ],
)  # fmt: skip
def test_a_missing_need_stops_the_command_before_any_work(tmp_path, hidden, argv, line):
    out = tmp_path / "out"
    done = run_without(hidden, [*argv, "-o", str(out / "x")])
    assert done.returncode == 2, done.stderr
    # one line and nothing else: no model built, no progress, no table, no file
    assert done.stderr.splitlines() == [line]
    assert done.stdout == ""
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("argv", [TINY_PLAN, ["bench", "--list"]])
def test_commands_that_do_not_need_peft_run_without_it(argv):
    done = run_without(["peft"], argv)
    assert done.returncode == 0, done.stderr
    assert done.stdout and not _warnings(done.stderr)


@pytest.mark.slow
def test_bench_without_matplotlib_writes_the_numbers_and_skips_the_picture(tmp_path):
    prefix = tmp_path / "out" / "tiny"
    done = run_without(["matplotlib"], [*TINY_BENCH, "-o", str(prefix)])
    assert done.returncode == 0, done.stderr
    assert _warnings(done.stderr) == [
        f"runlora bench: warning: matplotlib is not installed, so {prefix}.png is not drawn "
        "(the CSV and JSON are written): pip install 'runlora[bench]'"
    ]
    with open(f"{prefix}.csv", newline="") as f:
        assert [r["arm"] for r in csv.DictReader(f)] == ["floor", "peft", "runlora/flops"]
    assert len(json.loads(Path(f"{prefix}.json").read_text())["results"]) == 1
    assert not Path(f"{prefix}.png").exists()
    assert f"wrote {prefix}.csv, {prefix}.json\n" in done.stdout


@pytest.mark.slow
def test_finetune_compare_without_matplotlib_writes_the_log_and_skips_the_plot(tmp_path):
    out = tmp_path / "run"
    done = run_without(["matplotlib"], [*TINY_FINETUNE, "--compare", "-o", str(out)])
    assert done.returncode == 0, done.stderr
    assert _warnings(done.stderr) == [
        "runlora finetune: warning: matplotlib is not installed, so loss_curves.png is not "
        "drawn (the adapters and the log are written): pip install 'runlora[bench]'"
    ]
    log = json.loads((out / "finetune_log.json").read_text())
    assert set(log["runs"]) == {"runlora", "peft"} and log["summary"]["speedup"] > 0
    assert (out / "runlora" / "adapter_model.safetensors").is_file()
    assert not (out / "loss_curves.png").exists()


@pytest.mark.slow
@pytest.mark.parametrize("argv", [TINY_LAYER, TINY_PLAN])
def test_commands_that_draw_nothing_do_not_need_matplotlib(tmp_path, argv):
    done = run_without(["matplotlib"], [*argv, "-o", str(tmp_path / "x")])
    assert done.returncode == 0, done.stderr
    assert not _warnings(done.stderr)


@pytest.mark.slow
def test_bench_no_plot_writes_no_png_and_warns_nothing(tmp_path, capsys):
    prefix = tmp_path / "tiny"
    assert main([*TINY_BENCH, "--no-plot", "-o", str(prefix)]) == 0
    assert not _warnings(capsys.readouterr().err)
    assert Path(f"{prefix}.csv").is_file() and not Path(f"{prefix}.png").exists()


def test_bench_quant_settings_check_passes_with_bitsandbytes():
    """The check looked for the pre-layout module runlora.quant, so --quant always failed."""
    pytest.importorskip("bitsandbytes")
    from runlora.bench.model_bench import BenchSettings

    BenchSettings(quant="4bit").check()
