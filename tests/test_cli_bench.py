"""``runlora bench`` and ``runlora layer-bench``: option checks, the table math on a stubbed
clock, and tiny end-to-end runs that write well-formed CSV, JSON and PNG. No real timing is
asserted anywhere."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from runlora.bench.harness import Arm, interleave, measure_arms
from runlora.bench.layer_bench import LayerArm, LayerSettings, measure_layer
from runlora.bench.memory import MIB, saved_tensor_bytes
from runlora.bench.model_bench import BenchSettings, ConfigResult, format_table
from runlora.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: a run of a few steps: no minimum time, two timed rounds after one warm-up round.
QUICK = ["--min-run-time", "0", "--min-rounds", "2", "--warmup", "1", "--no-progress"]


class FakeClock:
    """A clock that only moves when a fake step advances it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-m", "llama_6m"], "unknown model 'llama_6m'"),
        (["-m", "llama_tiny", "--dtype", "fp16", "--device", "cpu"], "fp16 .* not supported"),
        (["-m", "llama_tiny", "--dtype", "fp64"], "unknown dtype 'fp64'"),
        (["-m", "llama_tiny", "--batch-size", "0"], "batch size must be a positive int, got 0"),
        (["-m", "llama_tiny", "--seq-len", "129"], "above llama_tiny's max_position_embeddings"),
        (["-m", "llama_tiny", "llama_60m", "--seq-len", "1025"], "above llama_tiny's"),
        (["-m", "llama_tiny", "-d", "1.0"], r"lora dropout must be a float in \[0, 1\), got 1.0"),
        (["-m", "llama_tiny", "--criterions", "fastest"], "unknown criterion 'fastest'"),
        (["-m", "llama_tiny", "--min-run-time", "-1"], "min run time must be >= 0"),
    ],
)
def test_bad_options_fail_with_one_line(capsys, argv, message):
    assert main(["bench", *argv]) == 2
    line = _error_line(capsys)
    assert line.startswith("runlora bench: error: ")
    assert __import__("re").search(message, line), line


def test_target_that_matches_nothing_names_the_layers(capsys, tmp_path):
    argv = [
        "bench",
        "-m",
        "llama_tiny",
        "--seq-len",
        "16",
        "--target-modules",
        "qkv",
        "-o",
        str(tmp_path / "b"),
    ]
    assert main(argv) == 2
    line = _error_line(capsys)
    assert "'qkv' matches no linear layer" in line and "q_proj" in line


def test_list_shows_every_shipped_config(capsys):
    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("llama_9m", "llama_60m", "llama_1.3b", "llama2_7b", "roberta_large", "vit_base"):
        assert name in out


def test_interleave_round_robin_on_a_fake_clock():
    clock = FakeClock()
    order = []

    def fake(name, seconds):
        def step():
            order.append(name)
            clock.now += seconds

        return step

    times = interleave(
        {"a": fake("a", 0.1), "b": fake("b", 0.3)},
        warmup_rounds=1,
        min_run_time=0.45,
        min_rounds=2,
        clock=clock,
    )
    # the fastest arm needs 5 rounds of 0.1 s to pass 0.45 s; warm-up round not recorded
    assert times == {"a": [pytest.approx(0.1)] * 5, "b": [pytest.approx(0.3)] * 5}
    assert order[:4] == ["a", "b", "b", "a"]  # the start rotates each round


def _fake_arm(name, kind, clock, ms, saved_mib, exclude):
    """A step that takes ``ms`` on ``clock`` and makes autograd save ``saved_mib`` MiB."""
    leaves = [torch.ones(MIB // 4, requires_grad=True) for _ in range(saved_mib)]

    def step():
        clock.now += ms / 1e3
        loss = sum((t * exclude).sum() for t in leaves) if leaves else (exclude * 2).sum()
        loss.backward()
        return loss

    return Arm(name, kind, step, frozenset({exclude.untyped_storage().data_ptr()}))


def test_table_math_from_measured_arms_on_a_stubbed_clock():
    clock = FakeClock()
    weight = torch.ones(MIB // 4, requires_grad=True)  # a "parameter": never counted
    arms = [
        _fake_arm("floor", "floor", clock, 100.0, 0, weight),
        _fake_arm("peft", "peft", clock, 150.0, 3, weight),
        _fake_arm("runlora/flops", "runlora", clock, 120.0, 1, weight),
    ]
    results = measure_arms(arms, warmup_rounds=1, min_run_time=0.0, min_rounds=3, clock=clock)
    result = ConfigResult("fake", "llama", 10, 64, 3, results)
    rows = {row["arm"]: row for row in result.rows()}
    assert rows["runlora/flops"]["ms_mean"] == pytest.approx(120.0)
    assert rows["runlora/flops"]["ms_std"] == pytest.approx(0.0, abs=1e-9)
    assert rows["runlora/flops"]["x_floor"] == pytest.approx(1.2)
    assert rows["runlora/flops"]["speedup_vs_peft_pct"] == pytest.approx(20.0)
    assert rows["floor"]["speedup_vs_peft_pct"] == pytest.approx(100 / 3)
    assert rows["peft"]["speedup_vs_peft_pct"] is None
    assert rows["peft"]["saved_mib"] == pytest.approx(3.0)
    assert rows["runlora/flops"]["saved_mib"] == pytest.approx(1.0)
    assert rows["runlora/flops"]["saved_vs_peft_mib"] == pytest.approx(2.0)
    assert rows["floor"]["saved_mib"] == 0.0
    table = format_table([result], BenchSettings())
    assert "+20.0 %" in table and "1.200" in table and "+2.0" in table


def test_saved_bytes_count_each_storage_once_and_skip_excluded():
    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(128, 64, requires_grad=True)

    def step():
        y = (x @ w).relu() * x.sum()  # x saved twice (by mm and by sum's consumer), once counted
        y.sum().backward()

    saved, _ = saved_tensor_bytes(step, exclude={w.untyped_storage().data_ptr()})
    # x (128 x 64), relu's output (128 x 64), x.sum() (scalar): 4-byte floats
    assert saved == (128 * 64 * 2 + 1) * 4


def test_saved_bytes_skip_views_of_parameters_registered_while_saving():
    """As under FSDP2: a layer's gathered weight is its parameter only while it runs, and
    autograd saves a view of it (``weight.t()``), not the Parameter itself."""
    layer = torch.nn.Linear(64, 32, bias=False).requires_grad_(False)
    sharded = layer.weight
    x = torch.randn(16, 64, requires_grad=True)

    def step():
        layer.weight = torch.nn.Parameter(sharded.detach().clone(), requires_grad=False)
        y = layer(x)  # saves x (for nothing: W frozen) and W's transpose (for dX)
        layer.weight = sharded  # "resharded": the gathered weight is no longer registered
        y.sum().backward()

    everything, _ = saved_tensor_bytes(step)
    assert everything == (32 * 64) * 4  # the gathered weight (x: not needed, W frozen)
    without, _ = saved_tensor_bytes(step, exclude_params_of=layer)
    assert without == 0


@pytest.mark.slow
def test_bench_tiny_end_to_end(tmp_path, capsys):
    prefix = tmp_path / "out" / "tiny"
    argv = [
        "bench",
        "-m",
        "llama_tiny",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "-d",
        "0.1",
        "-o",
        str(prefix),
        *QUICK,
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "llama_tiny" in out and "runlora/flops" in out and "speedup vs PEFT" in out
    with open(f"{prefix}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["arm"] for r in rows] == ["floor", "peft", "runlora/flops"]
    for row in rows:
        assert int(row["steps"]) == 2 and float(row["ms_mean"]) > 0
        assert float(row["saved_mib"]) >= 0 and row["model"] == "llama_tiny"
    # the same adapters on the same weights: same trainable count, same loss (B starts at 0)
    assert rows[1]["trainable_params"] == rows[2]["trainable_params"] != "0"
    assert float(rows[1]["loss"]) == pytest.approx(float(rows[2]["loss"]), rel=1e-5)
    assert float(rows[2]["saved_mib"]) < float(rows[1]["saved_mib"])  # no mask, no dropped x
    doc = json.loads(prefix.with_suffix(".json").read_text())
    assert doc["settings"]["lora_dropout"] == 0.1 and doc["environment"]["torch"]
    assert len(doc["results"][0]["times_ms"]["peft"]) == 2
    assert (tmp_path / "out" / "tiny.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("quant", ["none", "4bit"])
def test_runlora_arms_run_the_op_inside_peft_layers(monkeypatch, quant):
    """Every arm is a PEFT model but the floor; a runlora arm's step runs runlora's op in each
    adapted layer (PEFT's bnb layers too), the PEFT arm's never."""
    import runlora.layers.layer
    from runlora import configs
    from runlora.bench import model_bench as bench

    if quant != "none":
        pytest.importorskip("bitsandbytes")
    settings = BenchSettings(batch_size=1, seq_len=8, quant=quant, criterions=("flops",))
    config = configs.load_config("llama_tiny")
    model = configs.build_model(config, seed=0)
    targets = list(configs.default_target_modules(model))
    if quant != "none":
        from runlora.layers.quant import quantize_model

        quantize_model(model, 4, compute_dtype=torch.float32)
    batch = bench._make_batch(config, "causal_lm", settings)
    arms = bench.build_arms(model, batch, settings, targets)
    assert [a.name for a in arms] == ["floor", "peft", "runlora/flops"]
    calls = []
    real = runlora.layers.layer.lora_linear
    monkeypatch.setattr(
        runlora.layers.layer, "lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    n_layers = len(targets) * config.num_hidden_layers
    losses = {}
    for a in arms:
        calls.clear()
        losses[a.name] = float(a.step())
        assert len(calls) == (n_layers if a.kind == "runlora" else 0), a.name
    assert losses["runlora/flops"] == pytest.approx(losses["peft"], rel=1e-5)


def test_plan_shows_what_the_runlora_model_runs(tmp_path, capsys):
    """``runlora plan``'s plan for each target shape is the one the layers of
    ``get_runlora_model`` (PEFT layers on runlora's op) run for the same tokens."""
    import runlora
    from runlora.configs import build_model, load_config

    targets = ["q_proj", "down_proj"]
    argv = ["plan", "-m", "llama_tiny", "--batch-size", "2", "--seq-len", "16", "-r", "4"]
    assert main([*argv, "--target-modules", *targets, "-o", str(tmp_path / "p.json")]) == 0
    assert "4 layers, 2 distinct shapes" in capsys.readouterr().out
    rows = json.loads((tmp_path / "p.json").read_text())["layers"]
    planned = {name: row["plan"] for row in rows for name in row["layers"]}
    assert len(planned) == 4
    model = runlora.get_runlora_model(
        build_model(load_config("llama_tiny"), seed=0),
        runlora.LoraConfig(r=4, lora_alpha=8, target_modules=targets),
    )
    ids = torch.randint(0, 512, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    ran = {
        name.removeprefix("base_model.model."): m._last_plan[1]
        for name, m in model.named_modules()
        if runlora.integrations.peft.is_accelerated(m)
    }
    assert ran.keys() == planned.keys()
    for name, plan in ran.items():
        if ".layers.0." not in name:  # layer 0's input has no grad: planned without dX
            assert (plan.forward, plan.backward) == (
                planned[name]["forward"],
                planned[name]["backward"],
            ), name
    assert main([*argv, "--target-modules", "nothing"]) == 2
    assert "no nn.Linear matches" in _error_line(capsys)


def test_layer_bench_ratios_on_a_stubbed_clock():
    clock = FakeClock()

    def arm(name, kind, ms):
        def step():
            clock.now += ms / 1e3

        return LayerArm(name, kind, step, frozenset())

    settings = LayerSettings(min_run_time=0.0, min_rounds=2, warmup_rounds=0)
    rows = measure_layer(
        [arm("frozen", "frozen", 10), arm("peft", "peft", 14), arm("runlora", "runlora", 11)],
        settings,
        clock=clock,
    )
    by = {r["arm"]: r for r in rows}
    assert by["runlora"]["x_frozen"] == pytest.approx(1.1)
    assert by["runlora"]["x_peft"] == pytest.approx(11 / 14)
    assert by["peft"]["x_frozen"] == pytest.approx(1.4)


@pytest.mark.slow
def test_layer_bench_end_to_end(tmp_path, capsys):
    prefix = tmp_path / "layer"
    argv = [
        "layer-bench",
        "--shapes",
        "32x48",
        "48x32",
        "-r",
        "4",
        "-n",
        "64",
        "-d",
        "0.1",
        "-o",
        str(prefix),
        *QUICK,
    ]
    assert main(argv) == 0
    with open(f"{prefix}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["in"], r["arm"]) for r in rows] == [
        ("32", "frozen"),
        ("32", "peft"),
        ("32", "runlora"),
        ("48", "frozen"),
        ("48", "peft"),
        ("48", "runlora"),
    ]
    saved = {r["arm"]: float(r["saved_mib"]) for r in rows[:3]}
    assert saved["frozen"] == 0.0 < saved["runlora"] < saved["peft"]
    doc = json.loads(prefix.with_suffix(".json").read_text())
    assert doc["variants"] is False and len(doc["rows"]) == 6
    assert "x frozen" in capsys.readouterr().out


@pytest.mark.slow
def test_layer_bench_variants_times_every_pair(tmp_path):
    from runlora.ops.variants import LAYOUTS, Problem
    from runlora.planning.scoring import candidates

    prefix = tmp_path / "variants"
    argv = [
        "layer-bench",
        "--variants",
        "--shapes",
        "32x48",
        "-r",
        "4",
        "-n",
        "64",
        "-o",
        str(prefix),
        "--min-rounds",
        "1",
        "--warmup",
        "0",
        "--min-run-time",
        "0",
        "--no-progress",
    ]
    assert main(argv) == 0
    rows = json.loads(prefix.with_suffix(".json").read_text())["rows"]
    pairs = len(list(candidates(Problem(64, 32, 48, 4))))
    assert len(rows) == 2 + pairs * len(LAYOUTS)
    assert rows == sorted(rows, key=lambda r: r["ms_mean"])


def test_layer_bench_bad_shape(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["layer-bench", "--shapes", "1024by1024"])
    assert exc.value.code == 2
    assert "a shape is INxOUT" in capsys.readouterr().err


def test_dora_arms_run_the_dora_op_and_report_against_their_lora_twins(monkeypatch, capsys):
    """``--dora``: PEFT's DoRA arm runs PEFT's forward, runlora's DoRA arms run ``dora_linear``
    in every adapted layer (saving U, or not), with PEFT DoRA's loss; the table has the ratios."""
    import runlora.layers.layer
    from runlora import configs
    from runlora.bench import model_bench as bench
    from runlora.bench.harness import measure_arms

    settings = BenchSettings(batch_size=1, seq_len=8, criterions=("flops",), dora=True)
    config = configs.load_config("llama_tiny")
    model = configs.build_model(config, seed=0)
    targets = list(configs.default_target_modules(model))
    batch = bench._make_batch(config, "causal_lm", settings)
    arms = bench.build_arms(model, batch, settings, targets)
    names = ["floor", "peft", "peft_dora", "runlora/flops", "runlora_dora/flops"]
    assert [a.name for a in arms] == [*names, "runlora_dora_lowmem/flops"]
    calls = []
    real = runlora.layers.layer.dora_linear

    def counting(*args, **kwargs):
        calls.append(kwargs["save_output"])
        return real(*args, **kwargs)

    monkeypatch.setattr(runlora.layers.layer, "dora_linear", counting)
    n_layers = len(targets) * config.num_hidden_layers
    losses = {}
    for a in arms:
        calls.clear()
        losses[a.name] = float(a.step())
        if a.kind == "runlora_dora":
            assert calls == [not a.name.startswith("runlora_dora_lowmem")] * n_layers, a.name
        else:
            assert not calls, a.name
    assert losses["runlora_dora/flops"] == pytest.approx(losses["peft_dora"], rel=1e-5)
    assert losses["runlora_dora_lowmem/flops"] == pytest.approx(losses["peft_dora"], rel=1e-5)
    results = measure_arms(arms, warmup_rounds=0, min_run_time=0.0, min_rounds=2, max_rounds=2)
    result = bench.ConfigResult("llama_tiny", "llama", 1, 8, 2, results)
    rows = {r["arm"]: r for r in result.rows()}
    assert rows["runlora_dora/flops"]["x_lora_median"] > 0
    assert rows["runlora_dora/flops"]["x_peft_dora_median"] > 0
    assert rows["peft_dora"]["x_peft_dora_median"] is None
    assert rows["runlora/flops"]["x_lora_median"] is None
    # recomputing U saves what LoRA saves and the row norms; saving U saves more
    lowmem, saving = rows["runlora_dora_lowmem/flops"], rows["runlora_dora/flops"]
    assert lowmem["saved_mib"] < saving["saved_mib"]
    assert 1.0 <= lowmem["saved_x_lora"] < 1.1  # x and the (out,) norms; tiny N here
    table = bench.format_table([result], settings)
    assert "x PEFT DoRA" in table and "WARNING" not in table
