"""benchmarks/gpu_check.py on a machine without a GPU: its plan and budgets, the refusal without
CUDA, the results folder with a fake device and fake parts, failing and timed-out parts; and the
CUDA code paths of runlora that can be checked here, through mocks of torch.cuda: the "time"
criterion's synchronisation, bench's memory statistics and the dropout mask's seed path."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import time
import types
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import runlora
import runlora.bench.harness as harness
import runlora.bench.memory as memory
import runlora.bench.model_bench as bench
import runlora.ops.dropout as dropout
import runlora.ops.function as function
import runlora.planning.clock as clock_mod
import runlora.planning.measured as timing
import runlora.planning.roofline as roofline
from runlora.ops.variants import LAYOUTS

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
SHELL = ROOT / "benchmarks" / "gpu_check.sh"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gc_ = _load()


# --- the plan -------------------------------------------------------------------------------


def test_full_plan_runs_the_parts_in_order_within_8_minutes(tmp_path):
    parts = gc_.build_plan(tmp_path, "py")
    assert [p.name for p in parts] == [
        "env", "tests", "table", "roofline", "regret", "serve", "dora", "fused",
    ]  # fmt: skip
    total = gc_.plan_seconds(parts) + gc_.SETUP_ALLOWANCE_S["full"] + gc_.MARGIN_S
    assert total <= gc_.TOTAL_BUDGET_S == 8 * 60
    for part in parts:
        assert part.steps and part.budget_s > 0
        assert sum(s.timeout_s for s in part.steps) <= part.budget_s + 1e-9
        assert len({s.name for s in part.steps}) == len(part.steps)
    tests = parts[1].steps[0].argv
    assert tests[:3] == ["py", "-m", "pytest"] and ["-m", "cuda"] == tests[4:6]
    assert f"--junitxml={tmp_path / 'tests.xml'}" in tests


def _one_bench_row_part(tmp_path, name, timing, flag, arms):
    """A part that is one worker step on the llama_60m row in bf16 whose ``arms`` arms, timed
    by ``timing``, fit its timeout; returns ``runlora bench``'s arguments for that row."""
    part = {p.name: p for p in gc_.build_plan(tmp_path, "py")}[name]
    (step,) = part.steps
    assert 0 < step.timeout_s <= part.budget_s <= 30
    argv = step.argv
    assert argv[:4] == ["py", str(gc_.SELF), "worker", name]
    assert argv[argv.index("--out") + 1] == str(tmp_path / name)
    (spec,) = argv[argv.index("--rows") + 1 :]
    row = gc_.TableRow.parse(spec)
    assert (row.model, row.batch_size, row.r, row.dropout) == ("llama_60m", 8, 8, 0.0)
    assert gc_.dora_stem(row) == "llama_60m_r8"
    bench_argv = gc_.bench_argv(row, 8, tmp_path / "x", timing=timing, extra=(flag,))
    assert flag in bench_argv and bench_argv[-2:] == ["-o", str(tmp_path / "x")]
    for flag, value in (
        ("--dtype", "bf16"),
        ("--device", "cuda"),
        ("--seq-len", "1024"),
        ("--batch-size", "8"),
        ("-r", "8"),
        ("-d", "0"),
        ("--warmup", "1"),
    ):
        assert bench_argv[bench_argv.index(flag) + 1] == value  # fmt: skip
    # every arm for at least --min-run-time, and start-up, fit the step's timeout
    run_time = float(bench_argv[bench_argv.index("--min-run-time") + 1])
    assert arms * run_time + 10 <= step.timeout_s
    return bench_argv


def test_dora_part_is_one_short_bench_dora_run_of_llama_60m_in_bf16(tmp_path):
    _one_bench_row_part(tmp_path, "dora", gc_.DORA_TIMING, "--dora", arms=6)


def test_fused_part_is_the_op_alone_then_one_bench_fused_run_of_llama_60m_in_bf16(tmp_path):
    _one_bench_row_part(tmp_path, "fused", gc_.FUSED_TIMING, "--fused", arms=5)
    op = list(gc_.FUSED_OP_ARGS)
    assert op[op.index("--dtype") + 1] == "bf16" and int(op[op.index("--n") + 1]) >= 4096


def test_full_table_is_the_papers_rows_in_bf16_on_cuda(tmp_path):
    parts = {p.name: p for p in gc_.build_plan(tmp_path, "py")}
    specs = [s.argv[s.argv.index("--rows") + 1 :] for s in parts["table"].steps]
    rows = [gc_.TableRow.parse(spec) for group in specs for spec in group]
    batches = {"llama_60m": 64, "llama_130m": 64, "llama_350m": 48, "llama_1.3b": 24}
    assert {(r.model, r.batch_size, r.r, r.dropout) for r in rows} == {
        (m, b, r, d) for m, b in batches.items() for r in (8, 128) for d in (0.0, 0.1)
    }
    assert len(rows) == 16 and rows == gc_.table_rows(quick=False)
    argv = gc_.bench_argv(rows[0], 64, tmp_path / "x")
    assert argv[0] == "bench"
    for flag, value in (("--dtype", "bf16"), ("--device", "cuda"), ("--seq-len", "1024")):
        assert argv[argv.index(flag) + 1] == value


def test_quick_plan_is_the_tests_and_two_rows_in_about_two_minutes(tmp_path):
    parts = gc_.build_plan(tmp_path, "py", quick=True)
    assert [p.name for p in parts] == ["env", "tests", "table"]
    (table,) = parts[2].steps
    assert len(table.argv[table.argv.index("--rows") + 1 :]) == 2
    total = gc_.plan_seconds(parts) + gc_.SETUP_ALLOWANCE_S["quick"] + gc_.MARGIN_S
    assert 90 <= total <= gc_.QUICK_TARGET_S + 15


def test_plan_option_prints_the_budgets_and_runs_nothing(tmp_path, capsys):
    assert gc_.main(["--plan", "--out", str(tmp_path / "r")], devices=[]) == 0
    out = capsys.readouterr().out
    assert "table-llama_1.3b" in out and "limit 480 s" in out
    assert "  dora         25  DoRA, bf16" in out and "  fused        20  Fused projections" in out
    assert not (tmp_path / "r").exists()


# --- without CUDA ---------------------------------------------------------------------------


def _path_without_nvidia_smi(tmp_path: Path, fake_smi: str | None = None) -> dict[str, str]:
    """An environment whose PATH has no nvidia-smi (or a fake one), and recording stand-ins for
    python3 and pip: anything set up or run would leave tmp_path/ran."""
    fake = tmp_path / "bin"
    fake.mkdir()
    for name in ("python3", "pip", "pip3"):
        (fake / name).write_text(f"#!/bin/sh\necho {name} >> {tmp_path / 'ran'}\nexit 1\n")
        (fake / name).chmod(0o755)
    if fake_smi is not None:
        (fake / "nvidia-smi").write_text(fake_smi)
        (fake / "nvidia-smi").chmod(0o755)
    dirs = [
        d
        for d in os.environ.get("PATH", "").split(os.pathsep)
        if d and not (Path(d) / "nvidia-smi").exists()
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "GPU_CHECK_T0")}
    env["PATH"] = os.pathsep.join([str(fake), *dirs])
    return env


REFUSAL = "gpu-check: no CUDA device (nvidia-smi missing or lists no GPU); nothing set up or run"
NO_GPU_SMI = "#!/bin/sh\necho 'No devices were found'\nexit 6\n"


@pytest.mark.parametrize("smi", [None, NO_GPU_SMI], ids=["no-nvidia-smi", "no-gpu-listed"])
def test_driver_without_cuda_says_so_in_one_line_and_exits_2(tmp_path, smi):
    env = _path_without_nvidia_smi(tmp_path, smi)
    out_root = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out_root)],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert (proc.stdout + proc.stderr).splitlines() == [REFUSAL]
    assert not out_root.exists() and not (tmp_path / "ran").exists()


@pytest.mark.parametrize("smi", [None, NO_GPU_SMI], ids=["no-nvidia-smi", "no-gpu-listed"])
def test_script_and_make_without_cuda_refuse_before_any_setup(tmp_path, smi):
    env = _path_without_nvidia_smi(tmp_path, smi)
    venv = tmp_path / "venv"
    env.update(VENV=str(venv), PYTHON="python3")
    proc = subprocess.run(
        ["bash", str(SHELL), "--quick"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert (proc.stdout + proc.stderr).splitlines() == [REFUSAL]
    if shutil.which("make", path=env["PATH"]):
        for target in (["gpu-check"], ["gpu-check", "QUICK=1"], ["gpu-check-quick"]):
            proc = subprocess.run(
                ["make", "-s", "-C", str(ROOT), *target, f"VENV={venv}"],
                env=env, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert proc.returncode == 2, proc.stderr
            assert proc.stdout.splitlines() == [REFUSAL]  # make adds its "Error 2" on stderr
    assert not venv.exists() and not (tmp_path / "ran").exists()


def test_script_with_a_gpu_listed_hands_its_options_to_the_driver(tmp_path):
    """Past the CUDA check, with GPU_CHECK_PYTHON given, nothing is set up: the driver runs
    under that interpreter with the script's options (here --plan: nothing runs)."""
    smi = "#!/bin/sh\necho 'GPU 0: NVIDIA Fake H200 (UUID: GPU-0)'\n"
    env = _path_without_nvidia_smi(tmp_path, smi)
    env.update(GPU_CHECK_PYTHON=sys.executable, VENV=str(tmp_path / "venv"))
    proc = subprocess.run(
        ["bash", str(SHELL), "--plan", "--quick"], env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "gpu-check plan (quick): parts in order, seconds"
    assert not (tmp_path / "venv").exists() and not (tmp_path / "ran").exists()


# --- a run with a fake device and fake parts ------------------------------------------------


def _bench_doc(row, batch: int) -> dict:
    """A bench JSON for ``row`` as `runlora bench` writes it (rows from model_bench.summarize)."""
    peak = 2**30

    def arm(name, kind, ms, saved):
        return harness.ArmResult(name, kind, [ms, ms + 2.0], saved, peak, "cuda_max_allocated")

    arms = [
        arm("floor", "floor", 100.0, 900 * 2**20),
        arm("peft", "peft", 130.0, 1000 * 2**20),
        arm("runlora/flops", "runlora", 110.0, 990 * 2**20),
    ]
    settings = bench.BenchSettings(
        batch_size=batch, seq_len=1024, r=row.r, lora_dropout=row.dropout, dtype="bf16",
        device="cuda",
    )  # fmt: skip
    return {
        "settings": asdict(settings),
        "results": [{"model": row.model, "rows": bench.summarize(arms)}],
    }


def _dora_doc(row) -> dict:
    """A `runlora bench --dora` JSON for ``row``: the LoRA arms, PEFT's DoRA and runlora's two."""
    arms = [
        harness.ArmResult(name, kind, [ms, ms + 2.0], saved * 2**20, 2**30, "cuda_max_allocated")
        for name, kind, ms, saved in (
            ("floor", "floor", 20.0, 500),
            ("peft", "peft", 30.0, 800),
            ("runlora/flops", "runlora", 25.0, 700),
            ("peft_dora", "peft_dora", 50.0, 1200),
            ("runlora_dora/flops", "runlora_dora", 35.0, 1050),
            ("runlora_dora_lowmem/flops", "runlora_dora", 40.0, 700),
        )
    ]
    settings = bench.BenchSettings(
        batch_size=row.batch_size, seq_len=1024, r=row.r, lora_dropout=row.dropout,
        dtype="bf16", device="cuda", dora=True,
    )  # fmt: skip
    return {
        "settings": asdict(settings),
        "results": [{"model": row.model, "rows": bench.summarize(arms)}],
    }


FUSED_OP_DOC = {
    "args": {"n": 8192, "d": 768, "m": 2048, "dtype": "bf16"},
    "rows": [
        {"group": "qkv", "r": 8, "frozen_ms": 1.5, "separate_x_frozen": 1.2,
         "fused_x_frozen": 1.1, "fused_x_separate": 0.9167, "plan": "merged/recompute_merged"},
    ],
}  # fmt: skip


def _fused_doc(row) -> dict:
    """A `runlora bench --fused` JSON: runlora (fused), runlora_unfused, runlora_saved."""
    arms = [
        harness.ArmResult(name, kind, times, saved * 2**20, 2**30, "cuda_max_allocated")
        for name, kind, times, saved in (
            ("floor", "floor", [20.0, 22.0], 500),
            ("peft", "peft", [30.0, 32.0], 800),
            ("runlora/flops", "runlora", [24.0, 22.0], 500),
            ("runlora_unfused/flops", "runlora", [26.0, 24.2], 500),
            ("runlora_saved/flops", "runlora", [25.0, 24.2], 700),
        )
    ]
    settings = bench.BenchSettings(
        batch_size=row.batch_size, seq_len=1024, r=row.r, lora_dropout=row.dropout,
        dtype="bf16", device="cuda", fused=True,
    )  # fmt: skip
    rows = bench.summarize(arms)
    times = {a.name: a.times_ms for a in arms}
    return {
        "settings": asdict(settings),
        "results": [{"model": row.model, "rows": rows, "times_ms": times}],
    }


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="0" failures="1" skipped="1" tests="4">
<testcase classname="tests.test_cuda" name="test_a"/>
<testcase classname="tests.test_cuda" name="test_b"/>
<testcase classname="tests.test_cuda" name="test_c"><failure message="boom&#10;more"/></testcase>
<testcase classname="tests.test_cuda" name="test_q"><skipped message="no bitsandbytes"/></testcase>
</testsuite></testsuites>"""


class FakeParts:
    """A runner that writes what each real part would write, and records the steps it ran."""

    def __init__(self, fail: set[str] = frozenset(), oom: set[str] = frozenset(), env_rc=0):
        self.ran: list[tuple[str, float]] = []
        self.fail, self.oom, self.env_rc = fail, oom, env_rc

    def __call__(self, step, log_path, timeout_s):
        self.ran.append((step.name, timeout_s))
        assert step.env["RUNLORA_CACHE_DIR"].endswith("cache")
        assert step.env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT / "src")
        argv = step.argv
        out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else None
        if step.name == "env":
            out.write_text(json.dumps({"torch": "9.9", "gpu": "Fake H200", "packages": {}}))
            if self.env_rc:
                return gc_.StepResult(step.name, "failed", self.env_rc, 0.1, timeout_s)
        elif step.name == "tests":
            Path(argv[-2].split("=", 1)[1]).write_text(JUNIT)
        elif step.name.startswith("table"):
            out.mkdir(parents=True, exist_ok=True)
            for spec in argv[argv.index("--rows") + 1 :]:
                row = gc_.TableRow.parse(spec)
                batch = row.batch_size // 2 if row.model in self.oom else row.batch_size
                (out / f"{row.stem}.json").write_text(json.dumps(_bench_doc(row, batch)))
        elif step.name == "roofline":
            cal = {"peak_flops": 7.9e14, "bandwidth": 4.3e12, "overhead_s": 6e-6, "seconds": 2}
            out.write_text(json.dumps({"calibrations": {"bf16": cal}}))
        elif step.name == "regret":
            s = {"median": 1.01, "mean": 1.02, "worst": 1.2}
            out.write_text(json.dumps({"rows": [{}] * 16, "summary": {"flops": s, "time": s}}))
        elif step.name == "serve":
            res = {"tokens": 2048, "ms": {"base": 1.0, "peft": 2.0, "runlora": 1.5}}
            out.write_text(json.dumps({"results": {"prefill": res}}))
        elif step.name == "dora":
            out.mkdir(parents=True, exist_ok=True)
            for spec in argv[argv.index("--rows") + 1 :]:
                row = gc_.TableRow.parse(spec)
                (out / f"{gc_.dora_stem(row)}.json").write_text(json.dumps(_dora_doc(row)))
        elif step.name == "fused":
            out.mkdir(parents=True, exist_ok=True)
            (out / "fused_op.json").write_text(json.dumps(FUSED_OP_DOC))
            for spec in argv[argv.index("--rows") + 1 :]:
                row = gc_.TableRow.parse(spec)
                (out / f"{gc_.dora_stem(row)}.json").write_text(json.dumps(_fused_doc(row)))
        if step.name in self.fail:
            tail = [f"{step.name} line {i}" for i in range(3)] + ["Traceback: boom"]
            return gc_.StepResult(step.name, "failed", 1, 0.2, timeout_s, str(log_path), tail)
        return gc_.StepResult(step.name, "ok", 0, 0.2, timeout_s, str(log_path))


def test_fake_device_run_writes_the_results_folder_and_summary(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("GPU_CHECK_T0", raising=False)
    runner = FakeParts(oom={"llama_1.3b"})
    archive = tmp_path / "gpu.tar.gz"
    argv = ["--out", str(tmp_path), "--python", "py", "--archive", str(archive)]
    assert gc_.main(argv, devices=["NVIDIA Fake H200", "NVIDIA Fake H200"], runner=runner) == 0
    results = tmp_path / "nvidia-fake-h200"
    assert [name for name, _ in runner.ran] == [
        "env", "tests", "table-llama_60m", "table-llama_130m", "table-llama_350m",
        "table-llama_1.3b", "roofline", "regret", "serve", "dora", "fused",
    ]  # fmt: skip
    for name in ("SUMMARY.md", "summary.json", "table.csv", "env.json", "tests.xml"):
        assert (results / name).is_file(), name
    if importlib.util.find_spec("matplotlib"):
        assert (results / "table.png").stat().st_size > 0
    assert len(list((results / "table").glob("*.json"))) == 16
    md = (results / "SUMMARY.md").read_text()
    assert md.startswith("# GPU check: NVIDIA Fake H200 (full)")
    parts_at = [md.index(f"| {i} | {name} |") for i, name in enumerate(
        ["env", "tests", "table", "roofline", "regret", "serve", "dora", "fused"], 1)]  # fmt: skip
    assert parts_at == sorted(parts_at)
    assert "| 7 | dora | ok |" in md and "| 8 | fused | ok |" in md
    assert (
        "2 passed, 1 failed, 0 errors, 1 skipped" in md
        and "FAILED tests.test_cuda::test_c: boom" in md
    )
    # one row per model, r, dropout and arm: ms/step, x floor, speedup vs PEFT, saved, peak
    assert "- skipped (1): no bitsandbytes" in md
    row = "| llama_60m | 64 | 8 | 0 | runlora/flops | 111.0 ± 1.4 | 1.099 | +15.3 % | 990 | +10 |"
    assert row + " 1024 |" in md
    assert "| llama_1.3b | 12 (paper 24: out of memory) | 128 | 0.1 | peft |" in md
    assert "max_memory_allocated" in md
    assert "peak 790 TFLOP/s" in md and "regret of time" in md and "| prefill | 2048 |" in md
    # DoRA: per arm ms/step, x floor, x its LoRA, x PEFT DoRA (medians of the two rounds'
    # ratios, e.g. (50/30 + 52/32) / 2), saved MiB, saved x its LoRA
    dora = md[md.index("## DoRA (bf16)") :]
    assert "llama_60m, bf16, batch 8 x 1024, r 8, dropout 0" in dora
    assert "| runlora/flops | 26.0 ± 1.4 | 1.238 | - | - | 700 | - |" in dora
    assert "| peft_dora | 51.0 ± 1.4 | 2.429 | 1.646 | - | 1200 | 1.500 |" in dora
    assert "| runlora_dora/flops | 36.0 ± 1.4 | 1.714 | 1.385 | 0.706 | 1050 | 1.500 |" in dora
    assert (
        "| runlora_dora_lowmem/flops | 41.0 ± 1.4 | 1.952 | 1.578 | 0.804 | 700 | 1.000 |" in dora
    )
    # fused: the op alone, then per arm ms/step, x floor, x runlora (median of the per-round
    # ratios, e.g. (26/24 + 24.2/22) / 2 = 1.0917; x floor is the mean's, 25.1 / 21), saved MiB
    fused = md[md.index("## Fused projections (bf16)") :]
    assert "N = 8192, in 768, bf16" in fused
    assert "| qkv | 8 | 1.50 | 1.200 | 1.100 | 0.917 | merged/recompute_merged |" in fused
    assert "| runlora/flops | 23.0 ± 1.4 | 1.095 | 1.000 | 500 |" in fused
    assert "| runlora_unfused/flops | 25.1 ± 1.3 | 1.195 | 1.092 | 500 |" in fused
    assert "| runlora_saved/flops | 24.6 ± 0.6 | 1.171 | 1.071 | 700 |" in fused
    doc = json.loads((results / "summary.json").read_text())
    assert [p["status"] for p in doc["parts"]] == ["ok"] * 8
    assert len(doc["table"]) == 16 * 3 and not doc["table_missing"]
    assert doc["tests"]["failures"] == 1
    with tarfile.open(archive) as tar:
        assert "nvidia-fake-h200/SUMMARY.md" in tar.getnames()
    assert "all parts passed" in capsys.readouterr().out
    # A second run keeps the first one as <device>.previous.
    assert gc_.main(argv[:4] + ["--quick"], devices=["NVIDIA Fake H200"], runner=FakeParts()) == 0
    assert (tmp_path / "nvidia-fake-h200.previous" / "table.csv").is_file()
    quick = json.loads((results / "summary.json").read_text())
    assert quick["mode"] == "quick" and len(quick["table"]) == 2 * 3


def test_a_failing_part_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    monkeypatch.delenv("GPU_CHECK_T0", raising=False)
    runner = FakeParts(fail={"table-llama_130m", "regret"})
    argv = ["--out", str(tmp_path), "--python", "py"]
    assert gc_.main(argv, devices=["Fake GPU"], runner=runner) == 1
    assert [name for name, _ in runner.ran][-5:] == [
        "roofline", "regret", "serve", "dora", "fused",
    ]  # fmt: skip
    doc = json.loads((tmp_path / "fake-gpu" / "summary.json").read_text())
    status = {p["name"]: p["status"] for p in doc["parts"]}
    assert status == {
        "env": "ok", "tests": "ok", "table": "partial", "roofline": "ok", "regret": "failed",
        "serve": "ok", "dora": "ok", "fused": "ok",
    }  # fmt: skip
    md = (tmp_path / "fake-gpu" / "SUMMARY.md").read_text()
    assert "| 3 | table | partial |" in md and "table-llama_130m: failed" in md
    assert "### regret: failed" in md and "Traceback: boom" in md


def test_torch_without_cuda_stops_the_run_after_env_with_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("GPU_CHECK_T0", raising=False)
    runner = FakeParts(env_rc=3)
    assert gc_.main(["--out", str(tmp_path)], devices=["Fake GPU"], runner=runner) == 2
    assert [name for name, _ in runner.ran] == ["env"]
    assert capsys.readouterr().out.splitlines()[-1].startswith("gpu-check: torch under")


def test_only_runs_the_named_parts(tmp_path, monkeypatch):
    monkeypatch.delenv("GPU_CHECK_T0", raising=False)
    runner = FakeParts()
    assert gc_.main(["--out", str(tmp_path), "--only", "roofline", "serve"],
                    devices=["Fake GPU"], runner=runner) == 0  # fmt: skip
    assert [name for name, _ in runner.ran] == ["roofline", "serve"]
    assert gc_.main(["--out", str(tmp_path), "--only", "nope"], devices=["G"], runner=runner) == 2


def test_steps_get_what_is_left_of_their_part_and_of_the_run(tmp_path):
    now = [0.0]

    def runner(step, log_path, timeout_s):  # each step uses all the time it is given
        now[0] += timeout_s
        return gc_.StepResult(step.name, "timeout", None, timeout_s, timeout_s)

    def part(name, budget, *timeouts):
        steps = [gc_.Step(f"{name}{i}", ["x"], t) for i, t in enumerate(timeouts)]
        return gc_.Part(name, name, budget, steps)

    parts = [part("a", 100, 60, 60, 60), part("b", 50, 50), part("c", 50, 50)]
    done, stop = gc_.run_parts(
        parts, tmp_path, runner=runner, deadline=170.0, clock=lambda: now[0], echo=lambda s: None
    )
    assert stop is None
    a, b, c = done
    assert [s.timeout_s for s in a.steps] == [60, 40, 0] and a.steps[2].status == "skipped"
    assert "part's budget" in a.steps[2].note and a.status == "timeout"
    assert b.steps[0].timeout_s == 50  # b is cut by nothing
    assert c.steps[0].timeout_s == 20  # the run's deadline
    assert now[0] == 170


def _alive(pid: int) -> bool:
    """Running (a killed process left unreaped, a zombie, is not)."""
    for _ in range(50):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        if state in ("Z", "X"):
            return False
        time.sleep(0.05)
    return True


def test_failing_and_timed_out_subprocesses_are_recorded(tmp_path, monkeypatch, capsys):
    """The real runner: output streamed and logged, a failure's exit code and tail kept, a
    step over its time killed with its children, and the next step still run."""
    monkeypatch.setattr(gc_, "MIN_STEP_S", 0.1)
    pid_file = tmp_path / "child.pid"
    sleeper = textwrap.dedent(
        f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        print("sleeping", flush=True)
        time.sleep(60)
        """
    )
    py = sys.executable
    parts = [
        gc_.Part("bad", "bad", 30, [gc_.Step("bad", [py, "-c", "print('half way'); exit(3)"], 30)]),
        gc_.Part("slow", "slow", 5, [gc_.Step("slow", [py, "-c", sleeper], 1.5)]),
        gc_.Part("good", "good", 30, [gc_.Step("good", [py, "-c", "print('fine')"], 30)]),
        gc_.Part("none", "none", 30, [gc_.Step("none", [str(tmp_path / "missing")], 30)]),
    ]
    lines = []
    t0 = time.monotonic()
    done, _ = gc_.run_parts(
        parts, tmp_path, runner=gc_.run_subprocess, deadline=time.monotonic() + 60,
        echo=lines.append,
    )  # fmt: skip
    assert time.monotonic() - t0 < 20
    bad, slow, good, none = done
    assert (bad.status, bad.steps[0].rc, bad.steps[0].tail) == ("failed", 3, ["half way"])
    assert slow.status == "timeout" and slow.steps[0].tail == ["sleeping"]
    assert "killed after" in (tmp_path / "logs" / "slow.log").read_text()
    assert not _alive(int(pid_file.read_text()))  # the step's own child went with it
    assert good.status == "ok" and "[good] fine" in capsys.readouterr().out.splitlines()
    assert any(
        s.startswith("== slow: timeout in") and s.endswith("killed after 2 s") for s in lines
    )
    assert none.status == "failed" and none.steps[0].status == "error"
    assert (tmp_path / "logs" / "bad.log").read_text().splitlines()[-1] == "half way"
    md = gc_.write_summary(
        tmp_path, "Fake", "full", parts, done, started="now", elapsed_s=1.0, command="x"
    ).read_text()
    assert "### bad: failed (exit 3; logs/bad.log)" in md and "half way" in md
    assert "### slow: timeout (killed after 2 s; logs/slow.log)" in md and "sleeping" in md


def test_table_worker_halves_the_batch_on_out_of_memory_and_goes_on(tmp_path, capsys):
    calls = []

    def cli(argv):
        model, batch = argv[argv.index("-m") + 1], int(argv[argv.index("--batch-size") + 1])
        calls.append((model, batch))
        if model == "llama_1.3b" and batch > 6:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        if model == "llama_350m":
            raise RuntimeError("something else")
        return 0

    rows = [gc_.TableRow("llama_1.3b", 24, 8, 0.0), gc_.TableRow("llama_350m", 48, 8, 0.0),
            gc_.TableRow("llama_60m", 64, 8, 0.1)]  # fmt: skip
    assert gc_.bench_rows(rows, tmp_path, cli) == 1
    assert calls == [("llama_1.3b", 24), ("llama_1.3b", 12), ("llama_1.3b", 6),
                     ("llama_350m", 48), ("llama_60m", 64)]  # fmt: skip
    out = capsys.readouterr().out
    assert "retrying at 12" in out and "llama_350m_r8_d0: failed: RuntimeError" in out


# --- CUDA paths of runlora, through mocks of torch.cuda -------------------------------------


class Recorder:
    def __init__(self, events: list, name: str, result=None):
        self.events, self.name, self.result, self.args = events, name, result, []

    def __call__(self, *args, **kwargs):
        self.events.append(self.name)
        self.args.append(args)
        return self.result() if callable(self.result) else self.result


def test_time_call_reads_the_clock_only_after_a_cuda_sync(monkeypatch):
    events: list[str] = []
    ticks = iter(range(10**6))

    def clock():
        events.append("clock")
        return next(ticks) * 1e-3

    monkeypatch.setattr(clock_mod, "time", types.SimpleNamespace(perf_counter=clock))
    sync = Recorder(events, "sync")
    monkeypatch.setattr(torch.cuda, "synchronize", sync)
    device = torch.device("cuda")
    ms = clock_mod.time_call(lambda: events.append("fn"), device, budget_s=0.01, max_reps=4)
    assert ms > 0 and events.count("fn") >= 2
    for i, event in enumerate(events):
        if event == "fn":  # every run is followed by a sync of that device before the clock
            assert events[i + 1] == "sync"
    assert all(args == (device,) for args in sync.args)
    events.clear()
    clock_mod.time_call(lambda: events.append("fn"), torch.device("cpu"), budget_s=0.01, max_reps=4)
    assert "sync" not in events


def test_time_criterion_on_cuda_times_on_the_device_and_caches_under_its_name(
    monkeypatch, tmp_path
):
    monkeypatch.setenv("RUNLORA_CACHE_DIR", str(tmp_path))
    events: list[str] = []
    sync = Recorder(events, "sync")
    monkeypatch.setattr(torch.cuda, "synchronize", sync)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake H200")
    monkeypatch.setattr(timing, "TIME_BUDGET_S", 0.05)

    def predict(problem, pairs, dtype, device):  # every candidate predicted alike: all timed
        assert device.type == "cuda"
        return {f.name: 1.0 for f, _ in pairs}, {
            (b.name, lay): 1.0 for _, b in pairs for lay in LAYOUTS
        }

    monkeypatch.setattr(roofline, "predict_halves", predict)
    real_operands = timing._operands
    seen = []

    def operands(problem, dtype, device, seed=0):  # CPU tensors stand in for CUDA ones
        seen.append(device)
        return real_operands(problem, dtype, torch.device("cpu"), seed)

    monkeypatch.setattr(timing, "_operands", operands)
    plan = runlora.plan_layer(64, 16, 12, 4, criterion="time", dtype=torch.float32, device="cuda")
    assert plan.criterion == "time" and plan.measured_ms is not None
    assert seen == [torch.device("cuda")]
    assert sync.args and all(args[0].type == "cuda" for args in sync.args)
    # forwards and non-dx-first backwards x layouts, each a warm-up and >= 1 timed run
    n_timed = len(runlora.FORWARD_VARIANTS) + len(
        [b for b in runlora.BACKWARD_VARIANTS.values() if not b.dx_first]
    ) * len(LAYOUTS)
    assert len(sync.args) >= 2 * n_timed
    cache = json.loads((tmp_path / "plans.json").read_text())
    assert any("cuda:Fake H200" in key and "time" in key for key in cache["plans"])


def test_bench_memory_on_cuda_is_max_memory_allocated_over_the_step(monkeypatch):
    events: list[str] = []
    allocated = [1000]
    monkeypatch.setattr(torch.cuda, "synchronize", Recorder(events, "sync"))
    monkeypatch.setattr(
        torch.cuda, "memory_allocated", Recorder(events, "allocated", lambda: allocated[0])
    )
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", Recorder(events, "reset"))
    peak_now = Recorder(events, "max", lambda: allocated[0] + 5 * 2**20)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", peak_now)
    peak, kind = memory.peak_bytes(lambda: events.append("step"), "cuda")
    assert (peak, kind) == (5 * 2**20, "cuda_max_allocated")
    assert events == ["sync", "allocated", "reset", "step", "sync", "max"]

    events.clear()
    clock = iter(i * 0.01 for i in range(10**6))
    arms = [
        harness.Arm(name, kind, lambda n=name: events.append(n) or torch.ones(()))
        for name, kind in (("floor", "floor"), ("peft", "peft"))
    ]
    results = harness.measure_arms(
        arms, device="cuda", warmup_rounds=1, min_run_time=0.0, min_rounds=2,
        clock=lambda: next(clock),
    )  # fmt: skip
    steps = [i for i, e in enumerate(events) if e in ("floor", "peft")]
    assert len(steps) == 2 * 4  # 1 warm-up + 2 timed rounds + the memory step, per arm
    for i in steps[:6]:  # the timed steps: synchronized before and after
        assert events[i - 1] == "sync" and events[i + 1] == "sync"
    assert all(r.peak_kind == "cuda_max_allocated" and r.peak_bytes == 5 * 2**20 for r in results)
    rows = bench.summarize(results)
    assert rows[1]["peak_mib"] == 5.0 and rows[1]["peak_vs_peft_mib"] is None


class _FakeGenerator:
    made: list[_FakeGenerator] = []

    def __init__(self, device):
        self.device, self.seed = torch.device(device), None
        self.cpu = torch.Generator()
        _FakeGenerator.made.append(self)

    def manual_seed(self, seed):
        self.seed = seed
        self.cpu.manual_seed(seed)
        return self


class _FakeX:
    """Stands in for a CUDA (N, in) input: draw_mask reads its device and shape."""

    def __init__(self, shape):
        self.device, self.shape = torch.device("cuda"), torch.Size(shape)

    def numel(self):
        return self.shape.numel()


def test_dropout_mask_on_cuda_is_dense_from_a_seeded_device_generator(monkeypatch):
    draws = []

    def rand(shape, *, generator, device, dtype):
        draws.append((tuple(shape), generator, torch.device(device), dtype))
        return torch.rand(shape, generator=generator.cpu, dtype=dtype)

    fake_torch = types.SimpleNamespace(
        Generator=_FakeGenerator, rand=rand, float32=torch.float32,
        empty=torch.empty, int64=torch.int64,
    )  # fmt: skip
    monkeypatch.setattr(dropout, "torch", fake_torch)
    _FakeGenerator.made.clear()
    x = _FakeX((64, 32))
    p = 0.1  # on CPU this p is drawn as drop positions; on CUDA always dense
    assert p <= dropout.SPARSE_MAX_P
    masks = [dropout.draw_mask(x, p, seed) for seed in (123, 123, 124)]
    assert all(m.keep_dense is not None and m.dropped is None for m in masks)
    assert [(g.device.type, g.seed) for g in _FakeGenerator.made] == [
        ("cuda", 123), ("cuda", 123), ("cuda", 124),
    ]  # fmt: skip
    for (shape, gen, device, dtype), made in zip(draws, _FakeGenerator.made, strict=True):
        assert shape == (64, 32) and gen is made and device.type == "cuda"
        assert dtype == torch.float32  # uniforms in fp32 whatever x's dtype
    assert torch.equal(masks[0].keep(), masks[1].keep())  # backward regenerates forward's mask
    assert not torch.equal(masks[0].keep(), masks[2].keep())
    monkeypatch.undo()
    cpu = dropout.draw_mask(torch.zeros(64, 32), p, 123)
    assert cpu.dropped is not None and cpu.keep_dense is None


def test_op_regenerates_the_mask_in_backward_from_the_forwards_seed(monkeypatch):
    calls = []
    real = function._draw_mask

    def spy(x2d, p, seed):
        mask = real(x2d, p, seed)
        calls.append((seed, x2d.device, mask.keep().clone()))
        return mask

    monkeypatch.setattr(function, "_draw_mask", spy)
    x = torch.randn(8, 16, requires_grad=True)
    w, a = torch.randn(12, 16), torch.randn(4, 16, requires_grad=True)
    b = torch.randn(12, 4, requires_grad=True)
    runlora.lora_linear(x, w, a, b, scaling=2.0, dropout=0.3, training=True).sum().backward()
    (fwd_seed, fwd_dev, fwd_keep), (bwd_seed, bwd_dev, bwd_keep) = calls
    assert isinstance(fwd_seed, int) and fwd_seed == bwd_seed and fwd_dev == bwd_dev
    assert torch.equal(fwd_keep, bwd_keep)


# --- the workers' own code, run small on CPU --------------------------------------------------


@pytest.mark.slow
def test_workers_run_on_cpu_and_the_summary_reads_what_they_write(tmp_path, monkeypatch, capsys):
    """Each part's worker (env, table, roofline, regret, serve) run in this process on CPU at
    tiny sizes (--device cpu --small), so the first GPU run does not find a misnamed API; then
    the summary's readers on their real output."""
    monkeypatch.setenv("RUNLORA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(timing, "TIME_BUDGET_S", 0.05)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the serve worker adds benchmarks/
    cpu = ["--device", "cpu", "--small"]
    assert gc_.run_worker(["env", "--out", str(tmp_path / "env.json")]) == (
        0 if torch.cuda.is_available() else 3
    )
    rows = ["llama_tiny:2:8:0.1"]
    assert gc_.run_worker(["table", "--out", str(tmp_path / "table"), *cpu, "--rows", *rows]) == 0
    assert gc_.run_worker(["roofline", "--out", str(tmp_path / "roofline.json"), *cpu]) == 0
    assert gc_.run_worker(["regret", "--out", str(tmp_path / "regret.json"), *cpu]) == 0
    serve = ["serve", "--out", str(tmp_path / "serve.json"), "--model", "llama_tiny", *cpu]
    assert gc_.run_worker(serve) == 0
    capsys.readouterr()

    env = json.loads((tmp_path / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["packages"]["peft"] != "missing"
    records, missing = gc_.table_records(tmp_path, [gc_.TableRow.parse(r) for r in rows])
    assert not missing and len(records) == 3
    assert {r["arm"] for r in records} == {"floor", "peft", "runlora/flops"}
    assert all(r["ms_mean"] > 0 and r["saved_mib"] > 0 for r in records)
    assert (tmp_path / "table" / "llama_tiny_r8_d0.1.png").is_file()
    parts = gc_.build_plan(tmp_path, "py")
    done = [gc_.PartResult(p.name, p.title, "ok", 1.0, p.budget_s) for p in parts]
    md = gc_.write_summary(
        tmp_path, "cpu", "full", parts, done, started="now", elapsed_s=1.0, command="x"
    ).read_text()
    assert "- bf16: peak" in md and "- fp32: peak" in md
    assert "- regret of time over the best measured pair (1 shapes, bf16)" in md
    for shape in ("prefill", "decode", "generate"):
        assert f"| {shape} | " in md


@pytest.mark.slow
def test_dora_worker_runs_on_cpu_and_writes_the_dora_columns(tmp_path, monkeypatch, capsys):
    """The dora worker (``runlora bench --dora``) on CPU at tiny sizes: the CSV and JSON carry
    the DoRA arms and their columns, and the summary's DoRA section reads them."""
    import csv

    monkeypatch.setenv("RUNLORA_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "dora"
    argv = ["dora", "--out", str(out), "--device", "cpu", "--small", "--rows", "llama_tiny:2:8:0"]
    assert gc_.run_worker(argv) == 0
    assert "--dora" in capsys.readouterr().out
    arms = {"floor", "peft", "runlora/flops", "peft_dora", "runlora_dora/flops",
            "runlora_dora_lowmem/flops"}  # fmt: skip
    with (out / "llama_tiny_r8.csv").open(newline="") as f:
        rows = {r["arm"]: r for r in csv.DictReader(f)}
    assert set(rows) == arms
    for arm in ("peft_dora", "runlora_dora/flops", "runlora_dora_lowmem/flops"):
        assert float(rows[arm]["x_lora_median"]) > 0 and float(rows[arm]["saved_x_lora"]) > 0
    assert float(rows["runlora_dora/flops"]["x_peft_dora_median"]) > 0
    assert rows["peft"]["x_lora_median"] == "" and rows["peft_dora"]["x_peft_dora_median"] == ""
    doc = json.loads((out / "llama_tiny_r8.json").read_text())
    assert doc["settings"]["dora"] is True and doc["settings"]["dtype"] == "fp32"
    assert {r["arm"] for r in doc["results"][0]["rows"]} == arms
    if importlib.util.find_spec("matplotlib"):
        assert (out / "llama_tiny_r8.png").is_file()
    # the section reads the part's own stem (llama_60m_r8): this run, renamed
    shutil.copy(out / "llama_tiny_r8.json", out / "llama_60m_r8.json")
    lines = gc_._section_dora(tmp_path)
    assert len([line for line in lines if line.startswith("| runlora_dora")]) == 2
    assert all(" - |" not in line for line in lines if line.startswith("| runlora_dora/"))


@pytest.mark.slow
def test_fused_worker_runs_on_cpu_and_the_summary_reads_it(tmp_path, monkeypatch, capsys):
    """The fused worker (benchmarks/fused_op.py, then ``runlora bench --fused``) on CPU at tiny
    sizes: both files are written with the arms the summary's section reads."""
    monkeypatch.setenv("RUNLORA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "path", list(sys.path))  # the worker adds benchmarks/
    out = tmp_path / "fused"
    argv = ["fused", "--out", str(out), "--device", "cpu", "--small", "--rows", "llama_tiny:2:8:0"]
    assert gc_.run_worker(argv) == 0
    assert "--fused" in capsys.readouterr().out
    op = json.loads((out / "fused_op.json").read_text())
    assert [(r["group"], r["r"]) for r in op["rows"]] == [("qkv", 8), ("gate_up", 8)]
    assert all(r["fused_x_separate"] > 0 for r in op["rows"])
    doc = json.loads((out / "llama_tiny_r8.json").read_text())
    arms = {r["arm"] for r in doc["results"][0]["rows"]}
    assert arms == {"floor", "peft", "runlora/flops", "runlora_unfused/flops",
                    "runlora_saved/flops"}  # fmt: skip
    shutil.copy(out / "llama_tiny_r8.json", out / "llama_60m_r8.json")
    lines = gc_._section_fused(tmp_path)
    assert len([line for line in lines if line.startswith("| runlora")]) == 3
    assert len([line for line in lines if line.startswith("| qkv")]) == 1
