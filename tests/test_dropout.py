"""Dropout on the LoRA branch: the backward sees exactly the forward's mask (regenerated from a
seed, never stored), the expectation is preserved, eval mode is exact, and merged orders, which
cannot apply a mask to the LoRA branch alone, are refused or never planned."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import runlora.ops.function as function
from runlora import BACKWARD_VARIANTS, FORWARD_VARIANTS, LAYOUTS, Plan, lora_linear, plan_layer
from runlora.planning.planner import plan_for

pytestmark = pytest.mark.usefixtures("single_thread")

IN_FEATURES = 12
OUT_FEATURES = 10
RANK = 4
X_SHAPE_3D = (3, 5, IN_FEATURES)
DROPOUT = 0.3
ALL_PAIRS = list(itertools.product(FORWARD_VARIANTS, BACKWARD_VARIANTS))
SPLIT_PAIRS = [
    (f, b)
    for f, b in ALL_PAIRS
    if not FORWARD_VARIANTS[f].merged and not BACKWARD_VARIANTS[b].merged
]
MERGED_PAIRS = [pair for pair in ALL_PAIRS if pair not in SPLIT_PAIRS]
# The identity probe: W = 0, A = B = I, s = 1 and x = 1 make Y = dropout(x) = keep / (1 - p).
PROBE_FEATURES = 16
PROBE_TOKENS = 64
PROBE_DROPOUT = 0.5
SPARSE_P = 0.2  # at most runlora.ops.dropout.SPARSE_MAX_P: drawn as drop positions on CPU
# Expectation test: one row repeated, so the token mean estimates E[Y] for that row.
EXPECTATION_TOKENS = 4096
SIGMAS = 5.0
PLANNER_SHAPES = [
    (n, i, o, r)
    for n in (1, 64, 4096, 65536)
    for i, o in ((64, 64), (1024, 4096), (4096, 1024))
    for r in (1, 8, 64)
]


def _probe(plan, layout: str, p: float = PROBE_DROPOUT):
    """Run the identity probe; return (Y, dX, dA, dB, dY)."""
    eye = torch.eye(PROBE_FEATURES, dtype=torch.float64)
    x = torch.ones(PROBE_TOKENS, PROBE_FEATURES, dtype=torch.float64, requires_grad=True)
    a = eye.clone().requires_grad_()
    b = eye.clone().requires_grad_()
    w = torch.zeros(PROBE_FEATURES, PROBE_FEATURES, dtype=torch.float64)
    y = lora_linear(x, w, a, b, scaling=1.0, dropout=p, plan=Plan(*plan, layout))
    dy = torch.randn_like(y)
    y.backward(dy)
    return y.detach(), x.grad, a.grad, b.grad, dy


def _assert_backward_saw_forward_mask(plan, layout: str, p: float = PROBE_DROPOUT) -> None:
    y, dx, da, db, dy = _probe(plan, layout, p)
    # Y = keep / (1 - p): the forward's mask is readable from Y itself.
    assert set(y.unique().tolist()) <= {0.0, 1.0 / (1.0 - p)}
    # dX = s · keep / (1 - p) ⊙ (dY B A) = dY ⊙ Y, dA = s · (dY B)ᵀ L = dYᵀ Y, dB = dYᵀ (L Aᵀ).
    torch.testing.assert_close(dx, dy * y, rtol=0, atol=1e-12)
    torch.testing.assert_close(da, dy.t() @ y)
    torch.testing.assert_close(db, dy.t() @ y)


@pytest.mark.parametrize("p", [PROBE_DROPOUT, SPARSE_P])  # dense and sparse masks on CPU
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("forward", "backward"), SPLIT_PAIRS)
def test_backward_uses_the_forward_mask(forward, backward, layout, p):
    _assert_backward_saw_forward_mask((forward, backward), layout, p)


@pytest.mark.parametrize("p", [PROBE_DROPOUT, SPARSE_P])
def test_mask_probe_catches_a_backward_with_another_mask(monkeypatch, p):
    """The probe above would fail if backward drew its own mask."""
    original = function._draw_mask
    calls = []

    def another_mask_in_backward(x2d, p, seed):
        calls.append(seed)
        return original(x2d, p, seed + (len(calls) > 1))

    monkeypatch.setattr(function, "_draw_mask", another_mask_in_backward)
    with pytest.raises(AssertionError):
        _assert_backward_saw_forward_mask(SPLIT_PAIRS[0], "tuned", p)


def test_mask_drops_the_requested_fraction():
    y = _probe(SPLIT_PAIRS[0], "tuned")[0]
    dropped = (y == 0).double().mean().item()
    std = (PROBE_DROPOUT * (1 - PROBE_DROPOUT) / y.numel()) ** 0.5
    assert abs(dropped - PROBE_DROPOUT) < SIGMAS * std


def _forward_mask(inputs, seed: int) -> torch.Tensor:
    """The keep mask the op draws after ``torch.manual_seed(seed)``, shaped like x."""
    torch.manual_seed(seed)
    x = inputs.x
    mask_seed = function._new_seed()
    return (
        function._draw_mask(x.reshape(-1, x.shape[-1]), DROPOUT, mask_seed).keep().reshape(x.shape)
    )


@pytest.mark.parametrize("x_grad", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("forward", "backward"), SPLIT_PAIRS)
def test_matches_reference_with_the_same_mask(
    forward, backward, layout, x_grad, lora_inputs, check_reference, seed
):
    for dtype in (torch.float64, torch.bfloat16):
        inputs = lora_inputs(
            X_SHAPE_3D, OUT_FEATURES, RANK, dtype=dtype, x_layout="transposed", x_grad=x_grad
        )
        keep = _forward_mask(inputs, seed)
        torch.manual_seed(seed)
        check_reference(
            inputs,
            keep=keep,
            dropout=DROPOUT,
            plan=Plan(forward, backward, layout),
            keep_xa=x_grad,
        )


def test_same_seed_same_mask_other_seed_other_mask(lora_inputs):
    inputs = lora_inputs(X_SHAPE_3D, OUT_FEATURES, RANK)
    outputs = []
    for s in (1, 1, 2):
        torch.manual_seed(s)
        outputs.append(inputs.run(dropout=DROPOUT))
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.equal(outputs[0], outputs[2])


def test_backward_twice_gives_the_same_gradients(lora_inputs):
    """The mask is regenerated from the saved seed, not from the RNG's state at backward."""
    inputs = lora_inputs(X_SHAPE_3D, OUT_FEATURES, RANK)
    y = inputs.run(dropout=DROPOUT, plan=SPLIT_PAIRS[0])
    first = torch.autograd.grad(y.sum(), [inputs.lora_a], retain_graph=True)[0]
    torch.randn(100)  # move the global RNG on
    second = torch.autograd.grad(y.sum(), [inputs.lora_a])[0]
    assert torch.equal(first, second)


@pytest.mark.parametrize(("forward", "backward"), SPLIT_PAIRS[:4])
def test_expectation_is_preserved(forward, backward, lora_inputs):
    row = lora_inputs((1, IN_FEATURES), OUT_FEATURES, RANK, dtype=torch.float64, x_grad=False)
    x = row.x.expand(EXPECTATION_TOKENS, IN_FEATURES).contiguous()
    args = (x, row.weight, row.lora_a, row.lora_b, row.bias)
    kwargs = {"scaling": row.scaling, "plan": (forward, backward)}
    with torch.no_grad():
        mean = lora_linear(*args, dropout=DROPOUT, **kwargs).mean(0)
        exact = lora_linear(*args, **kwargs)[0]
        # Each token's LoRA term deviates by sum_j (keep_j / (1 - p) - 1) x_j M_jo with
        # M = s Aᵀ Bᵀ; the factors are independent with variance p / (1 - p).
        m = row.scaling * row.lora_a.t() @ row.lora_b.t()  # (in, out)
        var = DROPOUT / (1 - DROPOUT) * (row.x[0, :, None] ** 2 * m**2).sum(0)
        std_of_mean = (var / EXPECTATION_TOKENS).sqrt()
    assert ((mean - exact).abs() <= SIGMAS * std_of_mean).all(), (mean - exact) / std_of_mean


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("forward", "backward"), ALL_PAIRS)
def test_eval_mode_is_exact_and_allows_merged_orders(
    forward, backward, layout, lora_inputs, check_reference
):
    inputs = lora_inputs(X_SHAPE_3D, OUT_FEATURES, RANK, dtype=torch.float64)
    plan = Plan(forward, backward, layout)
    y = check_reference(inputs, plan=plan, dropout=0.5, training=False)
    torch.testing.assert_close(y, inputs.run(plan=plan), rtol=0, atol=0)


@pytest.mark.parametrize(("forward", "backward"), MERGED_PAIRS)
def test_merged_orders_with_dropout_in_training_are_refused(forward, backward, lora_inputs):
    inputs = lora_inputs(X_SHAPE_3D, OUT_FEATURES, RANK)
    for plan in ((forward, backward), Plan(forward, backward)):
        with pytest.raises(
            ValueError, match="merges s·BA into the base weight.*only exact without dropout"
        ):
            inputs.run(plan=plan, dropout=DROPOUT)


@pytest.mark.parametrize(("n", "in_features", "out_features", "r"), PLANNER_SHAPES)
def test_planner_never_merges_with_dropout(n, in_features, out_features, r):
    for needs_x, bias in itertools.product((True, False), repeat=2):
        opts = {"needs_input_grad": needs_x, "bias": bias}
        assert not plan_layer(n, in_features, out_features, r, dropout=DROPOUT, **opts).merged
        assert not plan_for(n, in_features, out_features, r, dropout=DROPOUT, **opts).merged


def test_planner_merges_without_dropout_somewhere():
    """The test above is not vacuous: without dropout some of those shapes plan merged."""
    assert any(plan_layer(*shape).merged for shape in PLANNER_SHAPES)


def test_plan_none_with_dropout_runs(lora_inputs, check_reference, seed):
    inputs = lora_inputs((64, 64), 64, 1, dtype=torch.float64)
    assert plan_for(64, 64, 64, 1).merged  # without dropout this shape would merge
    keep = _forward_mask(inputs, seed)
    torch.manual_seed(seed)
    check_reference(inputs, keep=keep, dropout=DROPOUT, plan=None)


@pytest.mark.parametrize("dropout", [0.0, DROPOUT])
@pytest.mark.parametrize(("forward", "backward"), SPLIT_PAIRS[::3])
def test_activation_checkpointing_gives_the_same_gradients(
    forward, backward, dropout, lora_inputs, seed
):
    """Checkpointing reruns the forward in backward with the RNG state restored, so the
    regenerated mask, and every gradient, is the one of a plain run."""
    inputs = lora_inputs(X_SHAPE_3D, OUT_FEATURES, RANK, dtype=torch.float64)
    leaves = list(inputs.leaves().values())

    def step(checkpointed: bool) -> list[torch.Tensor]:
        torch.manual_seed(seed)

        def layer(x):
            return lora_linear(
                x,
                inputs.weight,
                inputs.lora_a,
                inputs.lora_b,
                inputs.bias,
                scaling=inputs.scaling,
                dropout=dropout,
                plan=(forward, backward),
            )

        x = inputs.x
        y = checkpoint(layer, x, use_reentrant=False) if checkpointed else layer(x)
        return torch.autograd.grad((y * y).sum(), leaves)

    for plain, checkpointed in zip(step(False), step(True), strict=True):
        torch.testing.assert_close(checkpointed, plain, rtol=0, atol=0)


@pytest.mark.parametrize("p", [PROBE_DROPOUT, SPARSE_P])
@pytest.mark.parametrize(("forward", "backward"), SPLIT_PAIRS[::5])
def test_frozen_adapter_input_grad_sees_the_forward_mask(forward, backward, p):
    """Only dX needed (A, B frozen): backward applies the regenerated mask to dX alone."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 10, dtype=torch.float64, generator=g, requires_grad=True)
    shapes = ((7, 10), (3, 10), (7, 3))  # W, A, B: frozen
    w, a, b = (torch.randn(*s, dtype=torch.float64, generator=g) for s in shapes)
    torch.manual_seed(1)
    y = lora_linear(x, w, a, b, scaling=0.7, dropout=p, plan=Plan(forward, backward))
    dy = torch.randn(y.shape, dtype=torch.float64, generator=g)
    y.backward(dy)
    torch.manual_seed(1)
    keep = function._draw_mask(x.detach(), p, function._new_seed()).keep().double()
    x2 = x.detach().clone().requires_grad_()
    (x2 @ w.t() + 0.7 * ((x2 * keep / (1 - p)) @ a.t()) @ b.t()).backward(dy)
    torch.testing.assert_close(x.grad, x2.grad)
