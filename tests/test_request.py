"""PlanRequest: one planning request, its key, its bucket and its wire form."""

import json

import pytest
import torch

import runlora.planning.roofline
from runlora import plan_layer
from runlora.ops.variants import Problem
from runlora.planning.planner import (
    Plan,
    bucket_tokens,
    clear_plan_memo,
    install_plans,
    plan_bucketed,
    plan_for,
    plan_request,
)
from runlora.planning.request import PlanRequest

SHAPE = (48, 80, 4)  # in, out, r
N_TOKENS = 300  # inside the bucket (256, 320]
DROPOUT = 0.3


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNLORA_CACHE_DIR", str(tmp_path / "cache"))
    yield
    clear_plan_memo()


def _request(**kwargs) -> PlanRequest:
    return PlanRequest.for_call(N_TOKENS, *SHAPE, **kwargs)


def test_equal_requests_are_one_key():
    a = _request(criterion="time", bias=True, dropout=DROPOUT)
    b = PlanRequest(
        Problem(N_TOKENS, *SHAPE, bias=True, dropout=True), "time", torch.float32, "cpu"
    )
    assert a == b and hash(a) == hash(b) and {a: 1}[b] == 1
    assert a.cache_key() == b.cache_key()
    # Defaults and spellings are normalised once: None is float32 on "cpu", a torch.device is
    # its string, and the bias gradient (a sum, no order changes it) is not part of a request.
    assert _request(dtype=None, device=None) == _request(dtype=torch.float32, device="cpu")
    assert _request(device=torch.device("cpu")).device == "cpu"
    assert PlanRequest(Problem(N_TOKENS, *SHAPE, bias=True, bias_grad=True)) == _request(bias=True)
    assert _request(dtype=torch.bfloat16) != _request()
    assert _request(needs_input_grad=False).cache_key() != _request().cache_key()


def test_bucketed_rounds_only_n():
    request = _request(criterion="roofline", quantized=True, dtype=torch.bfloat16)
    bucketed = request.bucketed()
    assert bucketed.problem.n == bucket_tokens(N_TOKENS) == 320
    assert bucketed == PlanRequest.for_call(
        320, *SHAPE, criterion="roofline", quantized=True, dtype=torch.bfloat16
    )
    assert bucketed.bucketed() is bucketed
    assert PlanRequest.for_call(257, *SHAPE).bucketed() == _request().bucketed()
    assert PlanRequest.for_call(321, *SHAPE).bucketed() != _request().bucketed()


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        dict(criterion="time", needs_input_grad=False, bias=True, dropout=0.1, quantized=True),
        dict(criterion="roofline", dtype=torch.bfloat16, device="cuda:1"),
    ],
)
def test_to_dict_round_trips_through_json(kwargs):
    request = _request(**kwargs)
    wire = json.loads(json.dumps(request.to_dict()))
    assert PlanRequest.from_dict(wire) == request


def test_dropout_is_a_flag_not_a_made_up_probability():
    """A request keeps whether dropout is on, never a p; the planner plans what the caller
    asked for, and a bad p raises also after a good one was memoised."""
    assert _request(dropout=DROPOUT) == _request(dropout=0.05)
    assert _request(dropout=DROPOUT).to_dict()["dropout"] is True
    assert _request(dropout=0.0).to_dict()["dropout"] is False
    n = 4096  # enough tokens that, without dropout, a merged order would win
    assert plan_layer(n, 64, 64, 1).merged
    expected = plan_layer(n, 64, 64, 1, dropout=DROPOUT)
    assert not expected.merged
    assert plan_request(PlanRequest.for_call(n, 64, 64, 1, dropout=DROPOUT)) == expected
    assert plan_for(n, 64, 64, 1, dropout=DROPOUT) == expected
    with pytest.raises(ValueError, match=r"dropout must be a float in \[0, 1\), got 1.5"):
        plan_for(n, 64, 64, 1, dropout=1.5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(n_tokens=0), "n_tokens must be a positive int, got 0"),
        (dict(r=-1), "r must be a positive int, got -1"),
        (dict(in_features=2.5), "in_features must be a positive int, got 2.5"),
        (dict(out_features=True), "out_features must be a positive int, got True"),
        (dict(dropout=1.0), r"dropout must be a float in \[0, 1\), got 1.0"),
        (dict(dropout=True), r"dropout must be a float in \[0, 1\), got True"),
        (dict(criterion="fastest"), "unknown criterion 'fastest'; known: flops, roofline, time"),
        (dict(dtype=torch.int64), "dtype must be a floating torch.dtype"),
        (dict(device="abacus"), "device must be a torch.device or a name such as 'cpu'"),
    ],
)
def test_bad_input_says_what_is_wrong(kwargs, match):
    args = dict(n_tokens=8, in_features=4, out_features=4, r=2)
    args.update(kwargs)
    n, i, o, r = (args.pop(k) for k in ("n_tokens", "in_features", "out_features", "r"))
    with pytest.raises(ValueError, match=match):
        PlanRequest.for_call(n, i, o, r, **args)


def test_a_request_is_for_a_trainable_adapter():
    with pytest.raises(ValueError, match="trainable adapters"):
        PlanRequest(Problem(8, 4, 4, 2, needs_lora_grad=False))
    with pytest.raises(TypeError, match="PlanRequest.for_call"):
        PlanRequest((8, 4, 4, 2))


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda d: d.pop("device"), "a PlanRequest dict has the keys"),
        (lambda d: d.update(extra=1), "a PlanRequest dict has the keys"),
        (lambda d: d.update(bias=1), "bias must be a bool, got 1"),
        (lambda d: d.update(dropout=0.1), "dropout must be a bool, got 0.1"),
        (lambda d: d.update(dtype="float99"), "dtype must name a torch dtype"),
        (lambda d: d.update(n_tokens=-3), "n_tokens must be a positive int, got -3"),
        (lambda d: d.update(criterion="fastest"), "unknown criterion 'fastest'"),
    ],
)
def test_from_dict_refuses_what_to_dict_cannot_write(change, match):
    wire = _request().to_dict()
    change(wire)
    with pytest.raises(ValueError, match=match):
        PlanRequest.from_dict(wire)


def test_installed_plan_is_keyed_by_the_local_device(monkeypatch):
    """A plan rank 0 made on its device is installed for this process's own device (the
    request's device replaced), and then runs here without measuring anything."""
    monkeypatch.setattr(
        runlora.planning.roofline, "time_call", lambda *a, **k: pytest.fail("measured")
    )
    theirs = _request(criterion="roofline", device="cuda:3").to_dict()
    chosen = Plan("sequential", "recompute_split", "autograd", criterion="roofline")
    assert install_plans([(theirs, chosen.to_dict())], device="cpu") == 1
    assert plan_bucketed(_request(criterion="roofline")) == chosen
    assert plan_for(N_TOKENS, *SHAPE, criterion="roofline", device="cpu") == chosen
    assert install_plans([(_request().to_dict(), chosen.to_dict())]) == 0  # flops: not cached
