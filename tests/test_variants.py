"""The variant registries, their FLOP formulas against what torch counts, and the token
bucketing and memoisation of the hot-path planner."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import runlora.planning.planner as planner
from runlora import BACKWARD_VARIANTS, FORWARD_VARIANTS, Plan, lora_linear, plan_layer
from runlora.ops.variants import Problem, resolve_backward, resolve_forward
from runlora.planning.planner import bucket_tokens, plan_for
from runlora.planning.scoring import candidates, pair_cost

pytestmark = pytest.mark.usefixtures("single_thread")

# Distinct sizes, so a product with two operands swapped would count differently.
BATCH, SEQ, IN_FEATURES, OUT_FEATURES, RANK = 2, 5, 12, 7, 3
N_TOKENS = BATCH * SEQ
DROPOUT = 0.1
SCALING = 0.5
ALL_PAIRS = list(itertools.product(FORWARD_VARIANTS, BACKWARD_VARIANTS))
# (n, in, out, r): few tokens (split orders win) to many tokens (merged orders win).
PLAN_SHAPES = [(10, 12, 7, 3), (64, 16, 48, 1), (200, 24, 8, 8), (2, 48, 48, 16), (33, 40, 40, 20)]
BUCKET_EXACT_UP_TO = 64
BUCKET_MAX_OVERSHOOT = 0.25


def test_registries():
    assert len(FORWARD_VARIANTS) == 4
    assert len(BACKWARD_VARIANTS) == 16
    assert {v.paper_name for v in FORWARD_VARIANTS.values()} == {"F1", "F2", "F3", "F4"}
    assert {v.paper_name for v in BACKWARD_VARIANTS.values()} == {
        f"B{i}{prime}" for i in range(1, 9) for prime in ("", "'")
    }
    # The eight backward orders are the eight combinations of the three choices.
    assert {(v.da_from, v.db_from, v.dx) for v in BACKWARD_VARIANTS.values()} == set(
        itertools.product(("Z", "G"), ("LA", "G"), ("split", "merged"))
    )
    assert {n for n, v in FORWARD_VARIANTS.items() if v.merged} == {"merged", "merged_t"}


@pytest.mark.parametrize("name", list(FORWARD_VARIANTS))
def test_forward_names_and_aliases_resolve(name):
    variant = FORWARD_VARIANTS[name]
    assert resolve_forward(name) is variant
    assert resolve_forward(variant.paper_name) is variant
    assert resolve_forward(variant.paper_name.lower()) is variant


@pytest.mark.parametrize("name", list(BACKWARD_VARIANTS))
def test_backward_names_and_aliases_resolve(name):
    variant = BACKWARD_VARIANTS[name]
    assert resolve_backward(name) is variant
    assert resolve_backward(variant.paper_name) is variant
    assert Plan("F1", variant.paper_name).backward == name


def _counted_flops(plan, *, x_grad, lora_grad, bias, dropout) -> int:
    """Matrix-product FLOPs torch counts over one forward and backward of the op."""
    x = torch.randn(BATCH, SEQ, IN_FEATURES, dtype=torch.float64, requires_grad=x_grad)
    w = torch.randn(OUT_FEATURES, IN_FEATURES, dtype=torch.float64)
    a = torch.randn(RANK, IN_FEATURES, dtype=torch.float64, requires_grad=lora_grad)
    b = torch.randn(OUT_FEATURES, RANK, dtype=torch.float64, requires_grad=lora_grad)
    bias_t = (
        None
        if bias is None
        else torch.randn(OUT_FEATURES, dtype=torch.float64, requires_grad=bias == "trainable")
    )
    with FlopCounterMode(display=False) as counter:
        y = lora_linear(x, w, a, b, bias_t, scaling=SCALING, dropout=dropout, plan=plan)
        if y.requires_grad:
            y.backward(torch.randn_like(y))
    return counter.get_total_flops()


@pytest.mark.parametrize(("forward", "backward"), ALL_PAIRS)
def test_pair_cost_counts_what_torch_counts(forward, backward):
    fwd, bwd = FORWARD_VARIANTS[forward], BACKWARD_VARIANTS[backward]
    dropouts = (0.0,) if fwd.merged or bwd.merged else (0.0, DROPOUT)
    for x_grad, lora_grad, bias, dropout in itertools.product(
        (True, False), (True, False), (None, "frozen", "trainable"), dropouts
    ):
        problem = Problem(
            N_TOKENS,
            IN_FEATURES,
            OUT_FEATURES,
            RANK,
            needs_input_grad=x_grad,
            needs_lora_grad=lora_grad,
            bias=bias is not None,
            bias_grad=bias == "trainable",
            dropout=dropout > 0,
        )
        counted = _counted_flops(
            (forward, backward), x_grad=x_grad, lora_grad=lora_grad, bias=bias, dropout=dropout
        )
        assert pair_cost(fwd, bwd, problem).flops == counted, (
            f"x_grad={x_grad} lora_grad={lora_grad} bias={bias} dropout={dropout}"
        )


@pytest.mark.parametrize(("n", "in_features", "out_features", "r"), PLAN_SHAPES)
def test_plan_layer_flops_are_what_its_plan_runs(n, in_features, out_features, r):
    for x_grad, bias, dropout in itertools.product((True, False), (False, True), (0.0, DROPOUT)):
        plan = plan_layer(
            n, in_features, out_features, r, needs_input_grad=x_grad, bias=bias, dropout=dropout
        )
        x = torch.randn(n, in_features, requires_grad=x_grad)
        w = torch.randn(out_features, in_features)
        a = torch.randn(r, in_features, requires_grad=True)
        b = torch.randn(out_features, r, requires_grad=True)
        bias_t = torch.randn(out_features) if bias else None
        with FlopCounterMode(display=False) as counter:
            lora_linear(x, w, a, b, bias_t, dropout=dropout, plan=plan).sum().backward()
        assert plan.flops == counter.get_total_flops(), (plan, x_grad, bias, dropout)
        # ... and no exact pair costs fewer.
        problem = Problem(
            n, in_features, out_features, r, needs_input_grad=x_grad, bias=bias, dropout=dropout > 0
        )
        assert plan.flops == min(pair_cost(f, bw, problem).flops for f, bw in candidates(problem))


def test_plan_shapes_cover_merged_and_split_plans():
    merged = {plan_layer(*shape).merged for shape in PLAN_SHAPES}
    assert merged == {True, False}


def test_bucket_tokens_is_exact_up_to_64():
    assert [bucket_tokens(n) for n in range(1, BUCKET_EXACT_UP_TO + 1)] == list(
        range(1, BUCKET_EXACT_UP_TO + 1)
    )


def test_bucket_tokens_is_monotone_and_bounded():
    buckets = [bucket_tokens(n) for n in range(1, 20_000)]
    assert all(b1 <= b2 for b1, b2 in itertools.pairwise(buckets))
    for n, b in enumerate(buckets, start=1):
        assert n <= b <= n * (1 + BUCKET_MAX_OVERSHOOT)
    assert bucket_tokens(bucket_tokens(5000)) == bucket_tokens(5000)


@given(st.integers(BUCKET_EXACT_UP_TO + 1, 2**40))
@settings(max_examples=200, deadline=None)
def test_bucket_tokens_bounds_for_large_n(n):
    b = bucket_tokens(n)
    assert n <= b <= n * (1 + BUCKET_MAX_OVERSHOOT)
    assert bucket_tokens(b) == b and bucket_tokens(n - 1) <= b <= bucket_tokens(n + 1)


def test_bucket_tokens_power_of_two_steps():
    expected = {65: 80, 80: 80, 81: 96, 129: 160, 257: 320, 300: 320, 321: 384, 513: 640}
    assert {n: bucket_tokens(n) for n in expected} == expected


def test_plan_for_is_memoised_per_bucket(monkeypatch):
    calls = []
    real_plan_request = planner.plan_request

    def counting_plan_request(request):
        calls.append(request)
        return real_plan_request(request)

    monkeypatch.setattr(planner, "plan_request", counting_plan_request)
    shape = (1237, 611, 5)  # in, out, r: a shape no other test plans
    plans = [plan_for(n, *shape) for n in (257, 300, 320, 300)]
    assert all(p is plans[0] for p in plans)
    assert len(calls) == 1 and calls[0].problem.n == bucket_tokens(300) == 320
    other = plan_for(321, *shape)
    assert len(calls) == 2 and calls[1].problem.n == bucket_tokens(321)
    # lora_linear's resolver shares the memo: the same request plans nothing new.
    problem = Problem(300, *shape)
    assert planner.default_plan(problem, torch.float32, torch.device("cpu")) is plans[0]
    assert len(calls) == 2
    assert plans[0] == plan_layer(320, *shape)
    assert other == plan_layer(bucket_tokens(321), *shape)


def test_plan_for_keys_on_every_option():
    base = plan_for(4096, 64, 64, 1)
    assert base.merged
    assert not plan_for(4096, 64, 64, 1, dropout=DROPOUT).merged
    assert plan_for(4096, 64, 64, 1, needs_input_grad=False) == plan_layer(
        bucket_tokens(4096), 64, 64, 1, needs_input_grad=False
    )
