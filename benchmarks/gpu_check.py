"""The GPU check: runlora's CUDA evidence in one run of at most 8 minutes on one H100/H200.

    make gpu-check              # set-up (benchmarks/gpu_check.sh), then every part below
    make gpu-check QUICK=1      # about 2 minutes: the CUDA tests and two table rows
    python benchmarks/gpu_check.py --plan [--quick]    # the parts and budgets; runs nothing

In order, each part in subprocesses with a time budget, printing its output as it goes:

    env       torch, CUDA, the GPU and package versions (env.json)
    tests     pytest -m cuda over tests/ (every pair in fp32/bf16/fp16, dropout masks
              regenerated on CUDA, QLoRA 4-bit, the time criterion, bench memory): tests.xml
    table     the paper's table in bf16: llama_60m/130m/350m/1.3b against PEFT at the paper's
              batch sizes (halved on out-of-memory), seq 1024, r = 8 and 128, dropout 0 and 0.1,
              through ``runlora bench``: table/<model>_r<r>_d<p>.{csv,json,png}, table.csv
    roofline  runlora.planning.roofline.calibrate on the device in bf16 and fp32: roofline.json
    regret    planner regret (flops / roofline / time criteria) on a small grid: regret.json
    serve     the multi-adapter serving benchmark (benchmarks/serve_bench.py) on CUDA, bf16
    dora      ``runlora bench --dora`` on llama_60m in bf16 (batch 8, seq 1024, r = 8, dropout 0,
              one short timed run): PEFT's DoRA against runlora's, saving the unscaled output
              (runlora_dora) and recomputing it (runlora_dora_lowmem), each also against its
              LoRA arm: dora/llama_60m_r8.{csv,json,png}
    fused     the fused shared-input op alone against one op per projection on llama_130m's
              q/k/v and gate/up shapes (benchmarks/fused_op.py, bf16, N = 8192, r = 8 and 128),
              then ``runlora bench --fused`` on llama_60m in bf16 (batch 8, seq 1024, r = 8):
              runlora (fused, inputs recomputed) against runlora_unfused and runlora_saved:
              fused/fused_op.json, fused/llama_60m_r8.{csv,json,png}

Everything goes to benchmarks/results/gpu/<device>/ (a previous run there is moved to
<device>.previous/), with SUMMARY.md and summary.json rewritten after every part and a log per
subprocess in logs/. A part that fails or runs out of time is recorded (status and the tail of
its log) and the run goes on; the exit code is 0 when every part passed, 1 otherwise.

Without a CUDA device (no nvidia-smi, or it lists no GPU) it prints one line and exits 2
before anything is set up or run; so does ``env`` when the chosen torch sees no CUDA.
The driver itself needs only the standard library; its parts run under ``--python``
(default: this interpreter) with the tree's src/ first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SELF = Path(__file__).resolve()
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu"

#: the whole run, set-up included (the shell wrapper's start time, GPU_CHECK_T0, counts).
TOTAL_BUDGET_S = 480.0
#: what set-up may take before the parts start (reusing an installed torch: seconds).
SETUP_ALLOWANCE_S = {"full": 20.0, "quick": 10.0}
#: about 2 minutes in all for --quick.
QUICK_TARGET_S = 120.0
#: a step is not started with less time than this left in its part or the run.
MIN_STEP_S = 5.0
#: a finished run leaves this much of the deadline for the summary and the archive.
MARGIN_S = 5.0
TAIL_LINES = 30

#: the paper's models and batch sizes (sequences of SEQ_LEN tokens) and its settings.
PAPER_MODELS = (("llama_60m", 64), ("llama_130m", 64), ("llama_350m", 48), ("llama_1.3b", 24))
RANKS = (8, 128)
DROPOUTS = (0.0, 0.1)
SEQ_LEN = 1024
LORA_ALPHA = 16
#: per-model subprocess budgets of the table (4 configs each), seconds.
TABLE_STEP_S = {"llama_60m": 45.0, "llama_130m": 50.0, "llama_350m": 60.0, "llama_1.3b": 80.0}
#: the two rows of --quick: the smallest model without dropout, a large one at r = 128 with it.
QUICK_ROWS = (("llama_60m", 64, 8, 0.0), ("llama_350m", 48, 128, 0.1))
#: bench settings per row: GPU steps vary little, so a few timed rounds are enough.
BENCH_TIMING = ("--min-run-time", "1", "--warmup", "2", "--min-rounds", "3")
#: an out-of-memory row is retried at half the batch, at most this many times.
OOM_RETRIES = 2
#: the DoRA part's one row (model, batch, r, dropout) and its timing: six arms interleaved
#: (floor, peft, runlora, peft_dora, runlora_dora, runlora_dora_lowmem), 2 s each.
DORA_ROW = ("llama_60m", 8, 8, 0.0)
DORA_TIMING = ("--min-run-time", "2", "--warmup", "1", "--min-rounds", "3")
#: regret grid (N tokens, (in, out), r) on the device.
REGRET_N = (1024, 16384)
REGRET_DIMS = ((1024, 1024), (2048, 5461), (5461, 2048), (4096, 4096))
REGRET_R = (8, 128)
#: the fused part: the op alone (benchmarks/fused_op.py), then one ``runlora bench --fused`` row
#: (five arms: floor, peft, runlora, runlora_unfused, runlora_saved), timed as the DoRA row.
FUSED_OP_ARGS = ("--n", "8192", "--d", "768", "--m", "2048", "--ranks", "8", "128",
                 "--rounds", "5", "--reps", "3", "--dtype", "bf16")  # fmt: skip
FUSED_ROW = ("llama_60m", 8, 8, 0.0)
FUSED_TIMING = ("--min-run-time", "1.5", "--warmup", "1", "--min-rounds", "3")

Clock = Callable[[], float]


# --- the plan -------------------------------------------------------------------------------


@dataclass
class Step:
    """One subprocess of a part."""

    name: str  # unique and file-safe: its log is logs/<name>.log
    argv: list[str]
    timeout_s: float
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Part:
    name: str
    title: str
    budget_s: float
    steps: list[Step] = field(default_factory=list)
    stop_on_rc: int | None = None  # this exit code of a step ends the run (env: no CUDA)


@dataclass(frozen=True)
class TableRow:
    model: str
    batch_size: int
    r: int
    dropout: float

    @property
    def stem(self) -> str:
        return f"{self.model}_r{self.r}_d{self.dropout:g}"

    def spec(self) -> str:
        return f"{self.model}:{self.batch_size}:{self.r}:{self.dropout:g}"

    @classmethod
    def parse(cls, spec: str) -> TableRow:
        model, batch, r, dropout = spec.split(":")
        return cls(model, int(batch), int(r), float(dropout))


def dora_stem(row: TableRow) -> str:
    """The DoRA part's file stem: dora/<model>_r<r>.{csv,json,png}."""
    return f"{row.model}_r{row.r}"


def table_rows(quick: bool) -> list[TableRow]:
    """The table's rows in run order: per model, r = 8 then 128, dropout 0 then 0.1."""
    if quick:
        return [TableRow(*row) for row in QUICK_ROWS]
    return [
        TableRow(model, batch, r, d)
        for model, batch in PAPER_MODELS
        for r in RANKS
        for d in DROPOUTS
    ]


def build_plan(results: Path, python: str, *, quick: bool = False) -> list[Part]:
    """The parts in run order, with their subprocesses and budgets."""
    results = Path(results)
    worker = [python, str(SELF), "worker"]

    def step(name, argv, timeout_s, **env):
        return Step(name, [str(a) for a in argv], timeout_s, dict(env))

    tests_s = 60.0 if quick else 80.0
    tests = step(
        "tests",
        [
            python, "-m", "pytest", "-q", "-m", "cuda", "--continue-on-collection-errors",
            f"--junitxml={results / 'tests.xml'}", "tests",
        ],
        tests_s,
    )  # fmt: skip
    rows = table_rows(quick)
    dora, fused = TableRow(*DORA_ROW), TableRow(*FUSED_ROW)
    if quick:
        table_steps = [
            step(
                "table",
                [*worker, "table", "--out", results / "table", "--rows", *(r.spec() for r in rows)],
                45.0,
            )
        ]
    else:
        table_steps = [
            step(
                f"table-{model}",
                [
                    *worker, "table", "--out", results / "table", "--rows",
                    *(r.spec() for r in rows if r.model == model),
                ],
                TABLE_STEP_S[model],
            )
            for model, _ in PAPER_MODELS
        ]  # fmt: skip
    parts = [
        Part(
            "env",
            "Environment",
            15.0 if quick else 20.0,
            [step("env", [*worker, "env", "--out", results / "env.json"], 15.0 if quick else 20.0)],
            stop_on_rc=3,
        ),
        Part("tests", "CUDA tests", tests_s, [tests]),
        Part(
            "table",
            "The paper's table, bf16",
            sum(s.timeout_s for s in table_steps),
            table_steps,
        ),
    ]
    if quick:
        return parts
    parts += [
        Part(
            "roofline",
            "Roofline calibration",
            20.0,
            [step("roofline", [*worker, "roofline", "--out", results / "roofline.json"], 20.0)],
        ),
        Part(
            "regret",
            "Planner regret",
            25.0,
            [
                step(
                    "regret",
                    [*worker, "regret", "--out", results / "regret.json"],
                    25.0,
                    RUNLORA_TIME_BUDGET="0.3",
                )
            ],
        ),
        Part(
            "serve",
            "Multi-adapter serving",
            30.0,
            [step("serve", [*worker, "serve", "--out", results / "serve.json"], 30.0)],
        ),
        Part(
            "dora",
            "DoRA, bf16",
            25.0,
            [
                step(
                    "dora",
                    [*worker, "dora", "--out", results / "dora", "--rows", dora.spec()],
                    25.0,
                )
            ],
        ),
        Part(
            "fused",
            "Fused projections, bf16",
            20.0,
            [
                step(
                    "fused",
                    [*worker, "fused", "--out", results / "fused", "--rows", fused.spec()],
                    20.0,
                )
            ],
        ),
    ]
    return parts


def plan_seconds(parts: list[Part]) -> float:
    return sum(p.budget_s for p in parts)


def format_plan(parts: list[Part], quick: bool) -> str:
    mode = "quick" if quick else "full"
    lines = [f"gpu-check plan ({mode}): parts in order, seconds"]
    for p in parts:
        lines.append(f"  {p.name:<9} {p.budget_s:>5.0f}  {p.title}")
        for s in p.steps:
            if len(p.steps) > 1:
                lines.append(f"    {s.name:<20} {s.timeout_s:>5.0f}")
    setup = SETUP_ALLOWANCE_S[mode]
    lines.append(
        f"  total {plan_seconds(parts):.0f} s + set-up {setup:.0f} s + margin {MARGIN_S:.0f} s "
        f"(limit {TOTAL_BUDGET_S:.0f} s)"
    )
    return "\n".join(lines)


# --- running --------------------------------------------------------------------------------


@dataclass
class StepResult:
    name: str
    status: str  # ok | failed | timeout | skipped | error
    rc: int | None = None
    seconds: float = 0.0
    timeout_s: float = 0.0
    log: str | None = None
    tail: list[str] = field(default_factory=list)
    note: str = ""


@dataclass
class PartResult:
    name: str
    title: str
    status: str  # ok | partial | failed | timeout | skipped
    seconds: float
    budget_s: float
    steps: list[StepResult] = field(default_factory=list)
    note: str = ""


Runner = Callable[[Step, Path, float], StepResult]


def _kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=5)
            if sig == signal.SIGTERM:
                continue  # the leader is gone; SIGKILL whatever of its group is left
        except subprocess.TimeoutExpired:
            pass


def run_subprocess(step: Step, log_path: Path, timeout_s: float, *, echo=None) -> StepResult:
    """Run ``step`` in its own process group from the repo root, its output echoed line by line
    (prefixed with the step's name) and written to ``log_path``; killed after ``timeout_s``."""
    echo = echo or (lambda line: print(line, flush=True))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **step.env}
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    t0 = time.monotonic()
    with log_path.open("w", encoding="utf-8") as log:
        log.write("+ " + shlex.join(step.argv) + "\n")
        log.flush()
        try:
            proc = subprocess.Popen(
                step.argv,
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                bufsize=1,
                start_new_session=True,
            )
        except OSError as err:
            log.write(f"could not start: {err}\n")
            return StepResult(
                step.name, "error", None, 0.0, timeout_s, str(log_path), [str(err)], "not started"
            )

        def pump() -> None:
            try:
                for line in proc.stdout:
                    line = line.rstrip("\n")
                    log.write(line + "\n")
                    log.flush()
                    tail.append(line)
                    echo(f"[{step.name}] {line}")
            except (ValueError, OSError):  # the log closed under a straggler's output
                pass

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            rc = proc.returncode
        _kill_group(proc)  # children left behind would hold the GPU and the pipe
        reader.join(timeout=5)
        seconds = time.monotonic() - t0
        if timed_out:
            log.write(f"gpu-check: killed after {timeout_s:.0f} s\n")
    status = "timeout" if timed_out else ("ok" if rc == 0 else "failed")
    note = f"killed after {timeout_s:.0f} s" if timed_out else ("" if rc == 0 else f"exit {rc}")
    return StepResult(step.name, status, rc, seconds, timeout_s, str(log_path), list(tail), note)


def part_status(steps: list[StepResult]) -> str:
    statuses = [s.status for s in steps]
    if not statuses or all(s == "skipped" for s in statuses):
        return "skipped"
    if all(s == "ok" for s in statuses):
        return "ok"
    if "ok" in statuses:
        return "partial"
    return "timeout" if "timeout" in statuses else "failed"


def run_parts(
    parts: list[Part],
    results: Path,
    *,
    runner: Runner,
    deadline: float,
    clock: Clock = time.monotonic,
    on_part: Callable[[list[PartResult]], None] | None = None,
    echo=None,
) -> tuple[list[PartResult], int | None]:
    """Run the parts in order; a step gets min(its timeout, what is left of its part's budget
    and of the run). Returns the results and the exit code of a step that stopped the run
    (``Part.stop_on_rc``), else None."""
    echo = echo or (lambda line: print(line, flush=True))
    done: list[PartResult] = []
    for part in parts:
        echo(f"== {part.name}: {part.title} (budget {part.budget_s:.0f} s)")
        start = clock()
        steps: list[StepResult] = []
        stop = None
        for step in part.steps:
            left = min(part.budget_s - (clock() - start), deadline - clock())
            timeout = min(step.timeout_s, left)
            if timeout < MIN_STEP_S:
                why = "the run's deadline" if deadline - clock() <= left else "the part's budget"
                steps.append(StepResult(step.name, "skipped", note=f"no time left ({why})"))
                echo(f"== {step.name}: skipped, no time left ({why})")
                continue
            res = runner(step, results / "logs" / f"{step.name}.log", timeout)
            steps.append(res)
            echo(f"== {step.name}: {res.status} in {res.seconds:.1f} s {res.note}".rstrip())
            if part.stop_on_rc is not None and res.rc == part.stop_on_rc:
                stop = res.rc
                break
        res = PartResult(
            part.name, part.title, part_status(steps), clock() - start, part.budget_s, steps
        )
        done.append(res)
        if on_part:
            on_part(done)
        if stop is not None:
            return done, stop
    return done, None


# --- the summary ----------------------------------------------------------------------------


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def junit_counts(path: Path) -> dict | None:
    """Counts and the failing/skipped test names of a pytest junit XML, or None."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed, skipped = [], []
    for case in root.iter("testcase"):
        counts["tests"] += 1
        name = f"{case.get('classname', '')}::{case.get('name', '')}".strip(":")
        for tag in ("failure", "error"):
            node = case.find(tag)
            if node is not None:
                counts["failures" if tag == "failure" else "errors"] += 1
                message = (node.get("message") or "").strip().splitlines()
                failed.append(f"{name}: {message[0] if message else tag}")
        node = case.find("skipped")
        if node is not None:
            counts["skipped"] += 1
            skipped.append(f"{name}: {node.get('message') or ''}")
    # collection errors are <testcase> with <error> in pytest's XML too; suites may add more
    for suite in root.iter("testsuite"):
        counts["errors"] = max(counts["errors"], int(suite.get("errors", 0) or 0))
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_names"] = failed
    counts["skipped_names"] = skipped
    return counts


TABLE_COLUMNS = (
    "model", "batch_size", "paper_batch_size", "r", "dropout", "arm", "ms_mean", "ms_std",
    "x_floor", "speedup_vs_peft_pct", "saved_mib", "saved_vs_peft_mib", "peak_mib", "peak_kind",
)  # fmt: skip


def table_records(results: Path, rows: list[TableRow]) -> tuple[list[dict], list[TableRow]]:
    """One record per (row, arm) read from the bench JSONs, and the rows with no JSON."""
    records, missing = [], []
    for row in rows:
        doc = _read_json(results / "table" / f"{row.stem}.json")
        if not doc or not doc.get("results"):
            missing.append(row)
            continue
        settings = doc.get("settings", {})
        for res in doc["results"]:
            for arm in res.get("rows", []):
                rec = {
                    "model": res.get("model", row.model),
                    "batch_size": settings.get("batch_size", row.batch_size),
                    "paper_batch_size": row.batch_size,
                    "r": settings.get("r", row.r),
                    "dropout": settings.get("lora_dropout", row.dropout),
                }
                rec.update({k: arm.get(k) for k in TABLE_COLUMNS if k not in rec})
                records.append(rec)
    return records, missing


def _f(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _section_tests(results: Path) -> list[str]:
    counts = junit_counts(results / "tests.xml")
    if counts is None:
        return ["No tests.xml: the tests did not run or did not finish (see the log below)."]
    lines = [
        f"{counts['passed']} passed, {counts['failures']} failed, {counts['errors']} errors, "
        f"{counts['skipped']} skipped (tests.xml)."
    ]
    for name in counts["failed_names"][:20]:
        lines.append(f"- FAILED {name}")
    reasons = collections.Counter(n.split(": ", 1)[-1] for n in counts["skipped_names"])
    for reason, n in reasons.most_common(10):
        lines.append(f"- skipped ({n}): {reason}")
    return lines


def _section_table(results: Path, rows: list[TableRow]) -> list[str]:
    records, missing = table_records(results, rows)
    lines = [
        f"bf16, seq {SEQ_LEN}, alpha {LORA_ALPHA}; arms interleaved (`runlora bench`); "
        "max_memory_allocated = torch.cuda.max_memory_allocated over one step above what was "
        "allocated before it.",
        "",
        "| model | batch | r | dropout | arm | ms/step ± std | × floor | speedup vs PEFT "
        "| saved MiB | saved vs PEFT MiB | max_memory_allocated MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rec in records:
        batch = str(rec["batch_size"])
        if rec["batch_size"] != rec["paper_batch_size"]:
            batch += f" (paper {rec['paper_batch_size']}: out of memory)"
        peak = _f(rec["peak_mib"], ".0f")
        if rec["peak_mib"] is not None and rec["peak_kind"] != "cuda_max_allocated":
            peak += f" ({rec['peak_kind']})"
        lines.append(
            f"| {rec['model']} | {batch} | {rec['r']} | {rec['dropout']:g} | {rec['arm']} "
            f"| {_f(rec['ms_mean'], '.1f')} ± {_f(rec['ms_std'], '.1f')} "
            f"| {_f(rec['x_floor'], '.3f')} | {_f(rec['speedup_vs_peft_pct'], '+.1f', ' %')} "
            f"| {_f(rec['saved_mib'], '.0f')} | {_f(rec['saved_vs_peft_mib'], '+.0f')} | {peak} |"
        )
    for row in missing:
        lines.append(
            f"| {row.model} | {row.batch_size} | {row.r} | {row.dropout:g} | not measured "
            "| | | | | | |"
        )
    return lines


def _section_roofline(results: Path) -> list[str]:
    doc = _read_json(results / "roofline.json")
    lines = []
    if doc:
        for dtype, cal in doc.get("calibrations", {}).items():
            lines.append(
                f"- {dtype}: peak {cal['peak_flops'] / 1e12:.0f} TFLOP/s, bandwidth "
                f"{cal['bandwidth'] / 1e9:.0f} GB/s, overhead {cal['overhead_s'] * 1e6:.1f} µs "
                f"per product (calibrated in {cal.get('seconds', 0):.1f} s)"
            )
    else:
        lines.append("- roofline: not measured")
    doc = _read_json(results / "regret.json")
    if doc and doc.get("summary"):
        n = len(doc.get("rows", []))
        for crit, s in doc["summary"].items():
            lines.append(
                f"- regret of {crit} over the best measured pair ({n} shapes, "
                f"{doc.get('dtype', 'bf16')}): median {s['median']:.3f}, mean {s['mean']:.3f}, "
                f"worst {s['worst']:.3f}"
            )
    else:
        lines.append("- planner regret: not measured")
    return lines


def _section_serve(results: Path) -> list[str]:
    doc = _read_json(results / "serve.json")
    if not doc or not doc.get("results"):
        return ["Not measured."]
    lines = [
        "| shape | tokens | arm | ms | × base | speedup vs PEFT | max abs diff vs PEFT |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, res in doc["results"].items():
        ms = res["ms"]
        for arm, value in ms.items():
            peer = {"runlora": "peft", "runlora one": "peft one"}.get(arm)
            speedup = f"{(ms[peer] - value) / ms[peer] * 100:+.1f} %" if peer in ms else "-"
            lines.append(
                f"| {label} | {res['tokens']} | {arm} | {value:.2f} | {value / ms['base']:.3f} "
                f"| {speedup} | {res.get('max_abs_diff_vs_peft', '-')} |"
            )
    return lines


def _section_dora(results: Path) -> list[str]:
    row = TableRow(*DORA_ROW)
    doc = _read_json(results / "dora" / f"{dora_stem(row)}.json")
    if not doc or not doc.get("results"):
        return ["Not measured."]
    s = doc.get("settings", {})
    lines = [
        f"{row.model}, {s.get('dtype', 'bf16')}, batch {s.get('batch_size', row.batch_size)} x "
        f"{s.get('seq_len', SEQ_LEN)}, r {s.get('r', row.r)}, dropout "
        f"{s.get('lora_dropout', row.dropout):g}; arms interleaved (`runlora bench --dora`). "
        "runlora_dora saves the unscaled output for the magnitude's gradient, "
        "runlora_dora_lowmem recomputes it; × its LoRA (peft_dora: peft, runlora_dora*: "
        "runlora) and × PEFT DoRA are medians of per-round ratios; saved = bytes saved for "
        "backward.",
        "",
        "| arm | ms/step ± std | × floor | × its LoRA | × PEFT DoRA | saved MiB "
        "| saved × its LoRA |",
        "|---|---|---|---|---|---|---|",
    ]
    for res in doc["results"]:
        for arm in res.get("rows", []):
            lines.append(
                f"| {arm.get('arm')} | {_f(arm.get('ms_mean'), '.1f')} ± "
                f"{_f(arm.get('ms_std'), '.1f')} | {_f(arm.get('x_floor'), '.3f')} "
                f"| {_f(arm.get('x_lora_median'), '.3f')} "
                f"| {_f(arm.get('x_peft_dora_median'), '.3f')} "
                f"| {_f(arm.get('saved_mib'), '.0f')} | {_f(arm.get('saved_x_lora'), '.3f')} |"
            )
    return lines


def _section_fused(results: Path) -> list[str]:
    lines = []
    op = _read_json(results / "fused" / "fused_op.json")
    if op and op.get("rows"):
        a = op.get("args", {})
        lines += [
            f"The op alone (`benchmarks/fused_op.py`): N = {a.get('n')}, in {a.get('d')}, "
            f"{a.get('dtype')}; q/k/v = 3 x ({a.get('d')}, {a.get('d')}), gate/up = 2 x "
            f"({a.get('m')}, {a.get('d')}); forward + backward, medians of per-round ratios.",
            "",
            "| group | r | frozen ms | separate × frozen | fused × frozen | fused × separate "
            "| plan |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in op["rows"]:
            lines.append(
                f"| {r['group']} | {r['r']} | {_f(r.get('frozen_ms'), '.2f')} "
                f"| {_f(r.get('separate_x_frozen'), '.3f')} | {_f(r.get('fused_x_frozen'), '.3f')} "
                f"| {_f(r.get('fused_x_separate'), '.3f')} | {r.get('plan')} |"
            )
        lines.append("")
    row = TableRow(*FUSED_ROW)
    doc = _read_json(results / "fused" / f"{dora_stem(row)}.json")
    if doc and doc.get("results"):
        s = doc.get("settings", {})
        res = doc["results"][0]
        times = res.get("times_ms", {})
        lines += [
            f"The model (`runlora bench --fused`): {row.model}, {s.get('dtype', 'bf16')}, batch "
            f"{s.get('batch_size', row.batch_size)} x {s.get('seq_len', SEQ_LEN)}, r "
            f"{s.get('r', row.r)}; runlora fuses and recomputes its inputs, runlora_unfused only "
            "recomputes, runlora_saved does neither; × runlora is the median of per-round ratios.",
            "",
            "| arm | ms/step ± std | × floor | × runlora | saved MiB |",
            "|---|---|---|---|---|",
        ]
        ref = times.get("runlora/flops")
        for arm in res.get("rows", []):
            mine = times.get(arm.get("arm"))
            x_ours = _median_ratio(mine, ref)
            lines.append(
                f"| {arm.get('arm')} | {_f(arm.get('ms_mean'), '.1f')} ± "
                f"{_f(arm.get('ms_std'), '.1f')} | {_f(arm.get('x_floor'), '.3f')} "
                f"| {_f(x_ours, '.3f')} | {_f(arm.get('saved_mib'), '.0f')} |"
            )
    return lines or ["Not measured."]


def _median_ratio(times: list[float] | None, ref: list[float] | None) -> float | None:
    if not times or not ref or len(times) != len(ref):
        return None
    return statistics.median(a / b for a, b in zip(times, ref, strict=True))


def write_summary(
    results: Path,
    device: str,
    mode: str,
    parts: list[Part],
    done: list[PartResult],
    *,
    started: str,
    elapsed_s: float,
    command: str,
) -> Path:
    """SUMMARY.md, summary.json, table.csv (and table.png with matplotlib) in ``results``."""
    results.mkdir(parents=True, exist_ok=True)
    env = _read_json(results / "env.json") or {}
    rows = table_rows(mode == "quick")
    by_name = {p.name: p for p in done}
    lines = [
        f"# GPU check: {device} ({mode})",
        "",
        f"Started {started}, {elapsed_s:.0f} s so far; `{command}`.",
    ]
    if env:
        facts = [
            f"torch {env.get('torch')} (CUDA {env.get('torch_cuda')})",
            env.get("gpu"),
            env.get("gpu_memory_gib") and f"{env['gpu_memory_gib']:.0f} GiB",
            env.get("driver") and f"driver {env['driver']}",
            *(f"{k} {v}" for k, v in env.get("packages", {}).items()),
        ]
        lines.append(", ".join(f for f in facts if f) + ".")
    lines += [
        "",
        "## Parts",
        "",
        "| # | part | status | seconds | budget s | note |",
        "|---|---|---|---|---|---|",
    ]
    for i, part in enumerate(parts, 1):
        res = by_name.get(part.name)
        if res is None:
            lines.append(f"| {i} | {part.name} | not run | | {part.budget_s:.0f} | |")
            continue
        notes = [res.note] if res.note else []
        notes += [f"{s.name}: {s.status} {s.note}".strip() for s in res.steps if s.status != "ok"]
        lines.append(
            f"| {i} | {part.name} | {res.status} | {res.seconds:.1f} | {res.budget_s:.0f} "
            f"| {'; '.join(notes)} |"
        )
    sections = [("tests", "CUDA tests", _section_tests(results))]
    sections.append(("table", "The paper's table (bf16)", _section_table(results, rows)))
    if mode == "full":
        sections.append(("roofline", "Roofline and planner regret", _section_roofline(results)))
        sections.append(("serve", "Multi-adapter serving (bf16)", _section_serve(results)))
        sections.append(("dora", "DoRA (bf16)", _section_dora(results)))
        sections.append(("fused", "Fused projections (bf16)", _section_fused(results)))
    for name, title, body in sections:
        if name in by_name:
            lines += ["", f"## {title}", "", *body]
    failing = [s for p in done for s in p.steps if s.status not in ("ok", "skipped")]
    if failing:
        lines += ["", "## Logs of the steps that did not pass"]
        for s in failing:
            log = os.path.relpath(s.log, results) if s.log else "-"
            lines += ["", f"### {s.name}: {s.status} ({s.note}; {log})", "", "```"]
            lines += s.tail[-TAIL_LINES:] or ["(no output)"]
            lines.append("```")
    md = results / "SUMMARY.md"
    md.write_text("\n".join(lines) + "\n")
    records, missing = table_records(results, rows)
    if records:
        with (results / "table.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(TABLE_COLUMNS))
            writer.writeheader()
            writer.writerows(records)
        _table_png(records, results / "table.png")
    doc = {
        "device": device,
        "mode": mode,
        "started": started,
        "elapsed_s": elapsed_s,
        "command": command,
        "plan": [
            {"name": p.name, "budget_s": p.budget_s,
             "steps": [{"name": s.name, "timeout_s": s.timeout_s, "argv": s.argv}
                       for s in p.steps]}
            for p in parts
        ],
        "parts": [asdict(p) for p in done],
        "tests": junit_counts(results / "tests.xml"),
        "table": records,
        "table_missing": [r.spec() for r in missing],
    }  # fmt: skip
    (results / "summary.json").write_text(json.dumps(doc, indent=1) + "\n")
    return md


def _table_png(records: list[dict], path: Path) -> None:
    """runlora's speedup vs PEFT per table row, if matplotlib is there."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ours = [r for r in records if r["arm"].startswith("runlora") and r["speedup_vs_peft_pct"]]
    if not ours:
        return
    labels = [f"{r['model']}\nr{r['r']} d{r['dropout']:g}" for r in ours]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(ours)), 4))
    ax.bar(range(len(ours)), [r["speedup_vs_peft_pct"] for r in ours])
    ax.set_xticks(range(len(ours)), labels, fontsize=7, rotation=45, ha="right")
    ax.set_ylabel("speedup vs PEFT, %")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_title("runlora vs PEFT, bf16 training step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- the driver -----------------------------------------------------------------------------


def detect_devices() -> list[str]:
    """GPU names that nvidia-smi lists; [] without nvidia-smi or a GPU."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    if out.returncode != 0:
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def _parse(argv):
    ap = argparse.ArgumentParser(
        prog="gpu_check.py", description=__doc__.splitlines()[0], epilog="see the module's doc"
    )
    ap.add_argument("--quick", action="store_true", help="about 2 minutes: tests and two rows")
    ap.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="results root (default %(default)s)"
    )
    ap.add_argument("--python", default=sys.executable, help="interpreter for the parts")
    ap.add_argument("--only", nargs="+", metavar="PART", help="run only these parts")
    ap.add_argument("--plan", action="store_true", help="print the parts and budgets, run nothing")
    ap.add_argument("--archive", type=Path, help="also write the results folder as this .tar.gz")
    return ap.parse_args(argv)


def main(
    argv: list[str] | None = None,
    *,
    devices: list[str] | None = None,
    runner: Runner | None = None,
    clock: Clock = time.monotonic,
) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:
        return run_worker(argv[1:])
    args = _parse(argv)
    mode = "quick" if args.quick else "full"
    if args.plan:
        print(
            format_plan(
                build_plan(args.out / "<device>", args.python, quick=args.quick), args.quick
            )
        )
        return 0
    devices = detect_devices() if devices is None else devices
    if not devices:
        print(
            "gpu-check: no CUDA device (nvidia-smi missing or lists no GPU); nothing set up or run"
        )
        return 2
    t_start = clock()
    t0_epoch = float(os.environ.get("GPU_CHECK_T0") or time.time())
    setup_s = max(0.0, time.time() - t0_epoch)
    deadline = t_start + TOTAL_BUDGET_S - setup_s - MARGIN_S
    device = devices[0]
    results = args.out / device_slug(device)
    if results.exists() and not args.only:  # --only adds to the run that is there
        previous = results.with_name(results.name + ".previous")
        shutil.rmtree(previous, ignore_errors=True)
        results.rename(previous)
    results.mkdir(parents=True, exist_ok=True)
    parts = build_plan(results, args.python, quick=args.quick)
    if args.only:
        unknown = sorted(set(args.only) - {p.name for p in parts})
        if unknown:
            print(
                f"gpu-check: unknown part {unknown[0]!r}; parts: {', '.join(p.name for p in parts)}"
            )
            return 2
        parts = [p for p in parts if p.name in args.only]
    src = str(ROOT / "src")
    for part in parts:
        for step in part.steps:
            step.env = {
                "PYTHONUNBUFFERED": "1",
                "TQDM_DISABLE": "1",
                "RUNLORA_CACHE_DIR": str(results / "cache"),
                "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
                **step.env,
            }
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    command = "benchmarks/gpu_check.py " + shlex.join(argv)
    print(
        f"gpu-check: {device} ({len(devices)} GPU(s)), {mode}; set-up took {setup_s:.0f} s; "
        f"results in {results}",
        flush=True,
    )
    print(format_plan(parts, args.quick), flush=True)

    def summarize(done: list[PartResult]) -> Path:
        return write_summary(
            results, device, mode, parts, done,
            started=started, elapsed_s=clock() - t_start + setup_s, command=command,
        )  # fmt: skip

    done, stop = run_parts(
        parts, results, runner=runner or run_subprocess, deadline=deadline, clock=clock,
        on_part=summarize,
    )  # fmt: skip
    md = summarize(done)
    if args.archive:
        args.archive.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(args.archive, "w:gz") as tar:
            tar.add(results, arcname=results.name)
    if stop is not None:
        print(f"gpu-check: torch under {args.python} sees no CUDA device; stopped (see {md})")
        return 2
    bad = [p.name for p in done if p.status not in ("ok", "skipped")]
    print(
        f"gpu-check: {'all parts passed' if not bad else 'not passed: ' + ', '.join(bad)}; "
        f"{clock() - t_start + setup_s:.0f} s; summary {md}",
        flush=True,
    )
    return 1 if bad else 0


# --- workers: run as `gpu_check.py worker NAME ...` under the parts' interpreter -------------


def worker_env(args) -> int:
    import importlib.metadata as md
    import platform

    import torch

    info = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    packages = {}
    for name in ("transformers", "peft", "accelerate", "bitsandbytes", "triton",
                 "pytest", "hypothesis", "matplotlib"):  # fmt: skip
        try:
            packages[name] = md.version(name)
        except md.PackageNotFoundError:
            packages[name] = "missing"
    try:
        import runlora  # from src/ (PYTHONPATH) when it is not installed

        packages["runlora"] = f"{runlora.__version__} ({Path(runlora.__file__).parent})"
    except ImportError as err:
        packages["runlora"] = f"not importable: {err}"
    info["packages"] = packages
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, IndexError):
        info["driver"] = None
    if info["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=torch.cuda.get_device_name(0),
            device_count=torch.cuda.device_count(),
            capability=".".join(map(str, torch.cuda.get_device_capability(0))),
            gpu_memory_gib=props.total_memory / 2**30,
            multiprocessors=props.multi_processor_count,
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
        x = torch.randn(1024, 1024, device="cuda")
        torch.cuda.synchronize()
        info["cuda_smoke_ok"] = bool(torch.isfinite(x @ x).all())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info, indent=1))
    if not info["cuda_available"]:
        print(f"torch {torch.__version__} under {sys.executable} sees no CUDA device")
        return 3
    return 0


def bench_argv(
    row: TableRow,
    batch_size: int,
    prefix: Path,
    *,
    device: str = "cuda",
    seq_len: int = SEQ_LEN,
    timing: tuple[str, ...] = BENCH_TIMING,
    dtype: str = "bf16",
    extra: tuple[str, ...] = (),
) -> list[str]:
    """``runlora bench`` arguments for one table row (``extra``: more options, e.g. --dora)."""
    return [
        "bench", "-m", row.model, "--batch-size", str(batch_size), "--seq-len", str(seq_len),
        "-r", str(row.r), "-a", str(LORA_ALPHA), "-d", f"{row.dropout:g}", "--dtype", dtype,
        "--device", device, *timing, *extra, "--no-progress", "-o", str(prefix),
    ]  # fmt: skip


def _is_oom(err: BaseException) -> bool:
    return type(err).__name__ == "OutOfMemoryError" or "out of memory" in str(err).lower()


def bench_rows(
    rows: list[TableRow],
    out: Path,
    cli: Callable[[list[str]], int],
    *,
    stem: Callable[[TableRow], str] = lambda row: row.stem,
    **argv_options,
) -> int:
    """Run each row through ``cli`` (``runlora.cli.main``) in this process, writing
    ``out/<stem(row)>.{csv,json,png}``; a row that runs out of memory is retried at half the
    batch (``OOM_RETRIES`` times). Returns the failed count."""
    import gc

    failed = 0
    for row in rows:
        name = stem(row)
        batch = row.batch_size
        for attempt in range(OOM_RETRIES + 1):
            argv = bench_argv(row, batch, out / name, **argv_options)
            print("+ python -m runlora " + shlex.join(argv), flush=True)
            try:
                rc = cli(argv)
                err = None
            except (Exception, SystemExit) as e:  # recorded, then the next row
                rc, err = 1, e
            finally:
                gc.collect()
                _empty_cuda_cache()
            if err is not None and _is_oom(err) and attempt < OOM_RETRIES and batch > 1:
                print(f"{name}: out of memory at batch {batch}; retrying at {batch // 2}")
                batch //= 2
                continue
            if err is not None:
                print(f"{name}: failed: {type(err).__name__}: {err}", flush=True)
            elif rc != 0:
                print(f"{name}: runlora bench exited {rc}", flush=True)
            failed += rc != 0
            break
    return failed


def _empty_cuda_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def _small_options(args) -> dict:
    """bench_argv options of --small, a smoke test of a bench path: short sequences, no timed
    minimum, fp32 on CPU (bf16 GEMMs are slow on most CPUs)."""
    if not args.small:
        return {}
    options = {"seq_len": 32, "timing": ("--min-run-time", "0", "--warmup", "1",
                                         "--min-rounds", "1")}  # fmt: skip
    if args.device == "cpu":
        options["dtype"] = "fp32"
    return options


def worker_table(args) -> int:
    from runlora.cli import main as cli

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    options = {"device": args.device, **_small_options(args)}
    failed = bench_rows([TableRow.parse(s) for s in args.rows], out, cli, **options)
    return 1 if failed else 0


def worker_dora(args) -> int:
    """``runlora bench --dora`` on each row (DORA_TIMING: one short timed run), written to
    ``<out>/<model>_r<r>.{csv,json,png}``."""
    from runlora.cli import main as cli

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    options = {"device": args.device, "timing": DORA_TIMING, "extra": ("--dora",)}
    options.update(_small_options(args))
    rows = [TableRow.parse(s) for s in args.rows]
    failed = bench_rows(rows, out, cli, stem=dora_stem, **options)
    return 1 if failed else 0


def worker_fused(args) -> int:
    """benchmarks/fused_op.py on the device (``<out>/fused_op.json``), then
    ``runlora bench --fused`` on each row (``<out>/<model>_r<r>.{csv,json,png}``)."""
    from runlora.cli import main as cli

    sys.path.insert(0, str(SELF.parent))
    import fused_op

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    op_args = list(FUSED_OP_ARGS)
    if args.small:
        op_args = ["--n", "64", "--d", "32", "--m", "48", "--ranks", "8", "--rounds", "1",
                   "--reps", "1", "--dtype", "fp32"]  # fmt: skip
    failed = 0
    try:
        fused_op.main([*op_args, "--device", args.device, "--out", str(out / "fused_op.json")])
    except Exception as e:  # recorded, then the bench row
        print(f"fused_op: failed: {type(e).__name__}: {e}", flush=True)
        failed += 1
    options = {"device": args.device, "timing": FUSED_TIMING, "extra": ("--fused",)}
    options.update(_small_options(args))
    rows = [TableRow.parse(s) for s in args.rows]
    failed += bench_rows(rows, out, cli, stem=dora_stem, **options)
    return 1 if failed else 0


def worker_roofline(args) -> int:
    import torch

    from runlora.planning.cache import device_name
    from runlora.planning.roofline import calibrate

    device = torch.device(args.device)
    doc = {"device": device_name(device), "calibrations": {}}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        t0 = time.perf_counter()
        cal = dict(calibrate(dtype, device, refresh=True))
        cal["seconds"] = time.perf_counter() - t0
        doc["calibrations"][name] = cal
        print(
            f"{name}: peak {cal['peak_flops'] / 1e12:.1f} TFLOP/s, bandwidth "
            f"{cal['bandwidth'] / 1e9:.0f} GB/s, overhead {cal['overhead_s'] * 1e6:.1f} us; "
            f"{cal['seconds']:.1f} s",
            flush=True,
        )
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


def worker_regret(args) -> int:
    """regret.py's measurement on the GPU, in bf16, on a small grid, the JSON rewritten after
    every shape so a timeout keeps what was measured."""
    import itertools
    import statistics

    import torch

    sys.path.insert(0, str(SELF.parent))
    from regret import timed_halves  # benchmarks/regret.py, beside this file

    import runlora
    from runlora.ops.variants import Problem
    from runlora.planning.measured import measure_halves
    from runlora.planning.roofline import calibrate

    dtype, device = torch.bfloat16, torch.device(args.device)
    calibrate(dtype, device)
    criteria = ("flops", "roofline", "time")
    grid = ((256,), ((64, 48),), (4,)) if args.small else (REGRET_N, REGRET_DIMS, REGRET_R)
    rows = []
    doc = {
        "device": runlora.planning.cache.device_key(device, dtype),
        "dtype": "bf16",
        "rows": rows,
    }
    for n, (i, o), r in itertools.product(*grid):
        problem = Problem(n, i, o, r)
        fwds, bwds = timed_halves(problem)
        f_ms, b_ms = measure_halves(problem, fwds, bwds, dtype, device, 0.02 * len(fwds + bwds))
        best = min(f_ms.values()) + min(b_ms.values())
        row = {"n": n, "in": i, "out": o, "r": r, "best_ms": best}
        for crit in criteria:
            plan = runlora.plan_layer(n, i, o, r, criterion=crit, dtype=dtype, device=device)
            ms = f_ms[plan.forward] + b_ms[(plan.backward.removesuffix("_dx_first"), plan.layout)]
            row[crit] = {
                "plan": f"{plan.forward}/{plan.backward}/{plan.layout}",
                "ms": ms,
                "regret": ms / best,
            }
        rows.append(row)
        doc["summary"] = {
            crit: {
                "median": statistics.median([x[crit]["regret"] for x in rows]),
                "mean": statistics.fmean([x[crit]["regret"] for x in rows]),
                "worst": max(x[crit]["regret"] for x in rows),
            }
            for crit in criteria
        }
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
        print(
            f"N={n} {i}x{o} r={r}: best {best:.3f} ms; "
            + ", ".join(f"{c} {row[c]['regret']:.3f}" for c in criteria),
            flush=True,
        )
    return 0


def worker_serve(args) -> int:
    """benchmarks/serve_bench.py's arms on the device in bf16 (its model and adapters, timed
    with a device sync around each call)."""
    import statistics

    import torch

    sys.path.insert(0, str(SELF.parent))
    import serve_bench

    from runlora.bench.harness import interleave
    from runlora.bench.report import environment

    device = torch.device(args.device)
    shape = ["--batch-size", "4", "--seq-len", "16", "--prompt-len", "8", "--new-tokens", "2",
             "--min-run-time", "0"] if args.small else [
             "--batch-size", "16", "--seq-len", "128", "--min-run-time", "1"]  # fmt: skip
    sargs = serve_bench.parse_args(["--model", args.model, "--adapters", "4", "-r", "8", *shape])
    base, theirs, ours, names = serve_bench.build(sargs)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # CPU: a smoke test
    for m in (base, theirs, ours):
        m.to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    vocab = base.config.vocab_size
    mixed = [(names + ["__base__"])[i % (len(names) + 1)] for i in range(sargs.batch_size)]
    gen = torch.Generator().manual_seed(2)
    doc = {
        "settings": vars(sargs),
        "dtype": str(dtype).removeprefix("torch."),
        "env": environment(device.type),
        "results": {},
    }
    for label, seq in (("prefill", sargs.seq_len), ("decode", 1), ("generate", sargs.prompt_len)):
        ids = torch.randint(0, vocab, (sargs.batch_size, seq), generator=gen).to(device)
        run = serve_bench._caller(label, ids, sargs)
        with torch.no_grad():
            if label == "generate":
                diff = float((run(ours, mixed) != run(theirs, mixed)).sum())
            else:
                a, b = run(ours, mixed).logits, run(theirs, mixed).logits
                diff = (a.float() - b.float()).abs().max().item()
            steps = serve_bench.arms(run, base, theirs, ours, mixed)
            times = interleave(steps, min_run_time=sargs.min_run_time, sync=sync)
        ms = {arm: statistics.median(t) * 1e3 for arm, t in times.items()}
        doc["results"][label] = {
            "tokens": sargs.batch_size * seq,
            "ms": ms,
            "max_abs_diff_vs_peft": diff,
        }
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
        print(
            f"{label}: "
            + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items())
            + f"; diff vs PEFT {diff:.3g}",
            flush=True,
        )
    return 0


WORKERS = {
    "env": worker_env,
    "table": worker_table,
    "roofline": worker_roofline,
    "regret": worker_regret,
    "serve": worker_serve,
    "dora": worker_dora,
    "fused": worker_fused,
}


def run_worker(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="gpu_check.py worker")
    ap.add_argument("name", choices=sorted(WORKERS))
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="llama_60m", help="serve: the base model")
    ap.add_argument(
        "--rows", nargs="+", default=[], help="table, dora and fused rows, MODEL:BATCH:R:DROPOUT"
    )
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of the worker's code")
    ap.add_argument("--small", action="store_true", help="tiny sizes (with --device cpu)")
    args = ap.parse_args(argv)
    return WORKERS[args.name](args)


if __name__ == "__main__":
    raise SystemExit(main())
