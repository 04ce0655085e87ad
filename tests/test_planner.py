"""The planner: criteria, the persistent cache, token buckets."""

import json
import multiprocessing as mp
import os
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import runlora
from runlora.ops.variants import Problem
from runlora.planning import cache as cache_mod
from runlora.planning import measured as timing
from runlora.planning.cache import PlanCache
from runlora.planning.planner import Plan, PlanRequest, candidates


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNLORA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(timing, "TIME_BUDGET_S", 0.02)
    return tmp_path / "cache" / "plans.json"


def _valid(plan: Plan, dropout: bool) -> None:
    assert plan.forward in runlora.FORWARD_VARIANTS
    assert plan.backward in runlora.BACKWARD_VARIANTS
    assert plan.layout in runlora.LAYOUTS
    assert plan.flops > 0
    if dropout:
        assert not plan.merged


@pytest.mark.parametrize("criterion", ["flops", "roofline", "time"])
@pytest.mark.parametrize(
    "n,i,o,r", [(1, 8, 8, 4), (3, 16, 12, 8), (2, 5, 7, 5), (64, 32, 48, 1), (200, 24, 16, 16)]
)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_each_criterion_returns_a_valid_pair(criterion, n, i, o, r, dropout):
    plan = runlora.plan_layer(n, i, o, r, criterion=criterion, dropout=dropout, bias=True)
    _valid(plan, dropout > 0)
    assert plan.criterion == criterion
    if criterion != "flops":
        assert plan.predicted_ms is not None and plan.predicted_ms > 0
    if criterion == "time":
        assert plan.measured_ms is not None and plan.measured_ms > 0


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 5000),
    i=st.integers(1, 4096),
    o=st.integers(1, 4096),
    r=st.integers(1, 64),
    needs_x=st.booleans(),
    bias=st.booleans(),
    dropout=st.sampled_from([0.0, 0.2]),
)
def test_flops_plan_is_the_minimum_over_candidates(n, i, o, r, needs_x, bias, dropout):
    plan = runlora.plan_layer(n, i, o, r, needs_input_grad=needs_x, bias=bias, dropout=dropout)
    problem = Problem(n, i, o, r, needs_input_grad=needs_x, bias=bias, dropout=dropout > 0)
    best = min(f.cost(problem).flops + b.cost(problem).flops for f, b in candidates(problem))
    assert plan.flops == best
    _valid(plan, dropout > 0)


def test_flops_prefers_merged_for_many_tokens_and_split_for_few():
    many = runlora.plan_layer(4096, 1024, 2736, 8)
    assert many.forward_variant.merged and many.backward_variant.merged
    few = runlora.plan_layer(16, 1024, 2736, 8)
    assert not few.forward_variant.merged and not few.backward_variant.merged


def test_time_plan_reports_measured_and_predicted():
    plan = runlora.plan_layer(64, 32, 32, 4, criterion="time")
    assert plan.measured_ms > 0 and plan.predicted_ms > 0
    assert "fastest measured" in plan.reason


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(criterion="fastest"), "unknown criterion 'fastest'"),
        (dict(n_tokens=0), "n_tokens must be a positive int, got 0"),
        (dict(r=-1), "r must be a positive int, got -1"),
        (dict(in_features=2.5), "in_features must be a positive int"),
        (dict(dropout=1.0), r"dropout must be a float in \[0, 1\)"),
    ],
)
def test_bad_input(kwargs, match):
    args = dict(n_tokens=8, in_features=4, out_features=4, r=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        runlora.plan_layer(**args)


def test_plan_accepts_paper_aliases_and_round_trips():
    plan = Plan("F2", "B5", "autograd")
    assert (plan.forward, plan.backward) == ("merged", "recompute_merged")
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    with pytest.raises(ValueError, match="unknown layout"):
        Plan("F1", "B1", "diagonal")


# -- the persistent cache ----------------------------------------------------------------------


def test_cache_round_trip(isolated_cache):
    plan = runlora.plan_layer(128, 64, 96, 8, criterion="roofline")
    assert isolated_cache.exists()
    on_disk = json.loads(isolated_cache.read_text())
    assert on_disk["format"] == "runlora-plan-cache"
    assert any(v == plan.to_dict() for v in on_disk["plans"].values())
    assert len(on_disk["devices"]) == 1  # the roofline calibration
    fresh = PlanCache(isolated_cache)
    assert fresh.entries("plans") == on_disk["plans"]


def test_cached_plan_is_reused_without_measuring(isolated_cache, monkeypatch):
    first = runlora.plan_layer(256, 64, 64, 4, criterion="time")
    cache_mod._DEFAULT.clear()  # a new process: only the file remains

    def boom(*a, **k):
        raise AssertionError("measured again despite a cached plan")

    monkeypatch.setattr(timing, "measure_halves", boom)
    assert runlora.plan_layer(256, 64, 64, 4, criterion="time") == first


def _writer(path, prefix, count):
    c = PlanCache(path)
    for k in range(count):
        c.put("plans", f"{prefix}{k}", {"forward": "merged", "backward": "recompute_merged"})


def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    path = tmp_path / "shared" / "plans.json"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, p, 40)) for p in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    plans = json.loads(path.read_text())["plans"]
    assert {f"{p}{k}" for p in "ab" for k in range(40)} <= plans.keys()


@pytest.mark.parametrize(
    "content",
    [
        '{"format": "runlora-plan-cache", "version": 1, "plans": {"k": ',  # truncated
        "\x00\xffgarbage",
        '{"format": "runlora-plan-cache", "version": 0, "plans": {}, "devices": {}}',
        '["not", "a", "cache"]',
    ],
    ids=["truncated", "garbage", "old-version", "foreign"],
)
def test_unreadable_cache_is_rebuilt_with_one_warning(isolated_cache, content):
    isolated_cache.parent.mkdir(parents=True)
    isolated_cache.write_text(content)
    with pytest.warns(RuntimeWarning, match="unreadable.*rebuilding") as record:
        runlora.plan_layer(128, 32, 32, 4, criterion="roofline")
        runlora.plan_layer(256, 32, 32, 4, criterion="roofline")
    assert len([w for w in record if "unreadable" in str(w.message)]) == 1
    rebuilt = json.loads(isolated_cache.read_text())
    assert rebuilt["version"] == 1 and len(rebuilt["plans"]) == 2


def test_unwritable_cache_dir_degrades_to_memory(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv("RUNLORA_CACHE_DIR", str(blocker / "cache"))
    with pytest.warns(RuntimeWarning, match="cannot write plan cache") as record:
        a = runlora.plan_layer(128, 32, 32, 4, criterion="roofline")
        b = runlora.plan_layer(128, 32, 32, 4, criterion="roofline")
    assert a == b
    assert len([w for w in record if "cannot write" in str(w.message)]) == 1


def test_clear_cache_cli(isolated_cache, capsys):
    from runlora.cli import main

    runlora.plan_layer(128, 32, 32, 4, criterion="roofline")
    assert isolated_cache.exists()
    assert main(["plan", "--clear-cache"]) == 0
    assert not isolated_cache.exists()
    assert "cleared plan cache" in capsys.readouterr().out


def test_cache_key_separates_devices_dtypes_and_flags():
    p = Problem(64, 8, 8, 2)
    keys = {
        PlanRequest(p, "time", torch.float32, "cpu").cache_key(),
        PlanRequest(p, "time", torch.bfloat16, "cpu").cache_key(),
        PlanRequest(p, "roofline", torch.float32, "cpu").cache_key(),
        PlanRequest(Problem(64, 8, 8, 2, needs_input_grad=False), "time").cache_key(),
        PlanRequest(Problem(64, 8, 8, 2, dropout=True), "time").cache_key(),
        PlanRequest(Problem(64, 8, 8, 2, bias=True), "time").cache_key(),
        PlanRequest(Problem(64, 8, 8, 2, quantized=True), "time").cache_key(),
        PlanRequest(Problem(65, 8, 8, 2), "time").cache_key(),
    }
    assert len(keys) == 8
    assert torch.__version__ in next(iter(keys))


def test_no_warning_on_a_healthy_cache(isolated_cache):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runlora.plan_layer(128, 32, 32, 4, criterion="roofline")
        cache_mod._DEFAULT.clear()
        runlora.plan_layer(128, 32, 32, 4, criterion="roofline")
    assert os.path.getsize(isolated_cache) > 0


@pytest.mark.parametrize("criterion", ["roofline", "time"])
def test_measuring_criteria_plan_a_layer_first_called_under_autocast(criterion):
    """A layer planned by measuring, first called inside torch.autocast: the candidates are
    timed in the op's dtype (bf16 here), not under the caller's autocast."""
    torch.manual_seed(0)
    layer = runlora.RunLoRALinear(torch.nn.Linear(16, 12), r=4, criterion=criterion)
    x = torch.randn(3, 5, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad is not None and layer.lora_A["default"].weight.grad is not None
    plan = layer.plan_summary()
    assert criterion in plan
