"""The fused multi-projection op against K ``lora_linear`` calls and plain autograd: outputs and
every gradient, its saved tensors, its cost model, and its argument errors."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch
from conftest import assert_within_bound, in_layout, leaf_shape, reference_lora
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_errors import assert_raises_before_any_work
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

import runlora.ops.function as function
from runlora import BACKWARD_VARIANTS, FORWARD_VARIANTS, Plan, lora_linear, plan_layer
from runlora.ops import fused_lora_linear
from runlora.ops.dropout import draw_mask
from runlora.ops.fused_variants import FusedProblem, fused_cost, unfused_cost
from runlora.ops.variants import Problem

IN = 12
SPLIT = ("sequential", "recompute_split")
PAIRS = list(itertools.product(FORWARD_VARIANTS, BACKWARD_VARIANTS))
SPLIT_PAIRS = [
    (f, b) for f, b in PAIRS if not FORWARD_VARIANTS[f].merged and not BACKWARD_VARIANTS[b].merged
]


@dataclass
class Fused:
    """The op's inputs, drawn in fp64 and rounded to ``dtype``; x is a view of ``x_leaf``."""

    x_leaf: Tensor
    x_shape: tuple[int, ...]
    x_layout: str
    weights: list[Tensor]
    lora_as: list[Tensor]
    lora_bs: list[Tensor]
    biases: list[Tensor | None]
    scalings: list[float]
    dropouts: list[float]

    @property
    def x(self) -> Tensor:
        return in_layout(self.x_leaf, self.x_shape, self.x_layout)

    def leaves(self) -> list[Tensor]:
        ts = [self.x_leaf, *self.lora_as, *self.lora_bs, *self.biases]
        return [t for t in ts if t is not None and t.requires_grad]

    def absolute(self) -> Fused:
        """fp64 copies of |every input|, for the rounding bound (see conftest)."""

        def conv(t):
            return None if t is None else t.detach().double().abs().requires_grad_(t.requires_grad)

        return Fused(
            conv(self.x_leaf),
            self.x_shape,
            self.x_layout,
            [conv(w) for w in self.weights],
            [conv(a) for a in self.lora_as],
            [conv(b) for b in self.lora_bs],
            [conv(b) for b in self.biases],
            [abs(s) for s in self.scalings],
            self.dropouts,
        )

    def fp64(self) -> Fused:
        def conv(t):
            return None if t is None else t.detach().double().requires_grad_(t.requires_grad)

        return Fused(
            conv(self.x_leaf),
            self.x_shape,
            self.x_layout,
            [conv(w) for w in self.weights],
            [conv(a) for a in self.lora_as],
            [conv(b) for b in self.lora_bs],
            [conv(b) for b in self.biases],
            self.scalings,
            self.dropouts,
        )


def make(
    outs,
    ranks,
    *,
    bias=None,
    dropouts=None,
    x_shape=(2, 3, IN),
    x_layout="contiguous",
    dtype=torch.float64,
    x_grad=True,
    frozen=(),
) -> Fused:
    """``bias[k]``: None, "frozen" or "trainable"; ``frozen``: the projections whose A and B
    are frozen."""
    kk = len(outs)
    in_f = x_shape[-1]
    bias = bias if bias is not None else ["trainable"] * kk
    dropouts = dropouts if dropouts is not None else [0.0] * kk

    def rand(*shape, scale=1.0, grad=False):
        t = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)
        return t.requires_grad_(grad)

    return Fused(
        rand(*leaf_shape(x_shape, x_layout), grad=x_grad),
        tuple(x_shape),
        x_layout,
        [rand(o, in_f, scale=in_f**-0.5) for o in outs],
        [rand(r, in_f, scale=in_f**-0.5, grad=k not in frozen) for k, r in enumerate(ranks)],
        [
            rand(o, r, scale=r**-0.5, grad=k not in frozen)
            for k, (o, r) in enumerate(zip(outs, ranks, strict=True))
        ],
        [
            None if b is None else rand(o, grad=b == "trainable")
            for o, b in zip(outs, bias, strict=True)
        ],
        [0.5 + 0.25 * k for k in range(kk)],
        list(dropouts),
    )


def run_fused(f: Fused, seed: int, plans=None, **kwargs):
    torch.manual_seed(seed)
    return fused_lora_linear(
        f.x,
        f.weights,
        f.lora_as,
        f.lora_bs,
        f.biases,
        scalings=f.scalings,
        dropouts=f.dropouts,
        plans=plans,
        **kwargs,
    )


def run_per_projection(f: Fused, seed: int, plans=None):
    torch.manual_seed(seed)  # the same seeds, drawn in projection order
    plans = plans or [None] * len(f.weights)
    return [
        lora_linear(
            f.x,
            f.weights[k],
            f.lora_as[k],
            f.lora_bs[k],
            f.biases[k],
            scaling=f.scalings[k],
            dropout=f.dropouts[k],
            plan=plans[k],
        )
        for k in range(len(f.weights))
    ]


def masks(f: Fused, seed: int) -> list[Tensor | None]:
    """The keep masks the op draws: one seed per projection with dropout, in projection order."""
    torch.manual_seed(seed)
    x2d = f.x.detach().reshape(-1, f.x_shape[-1])
    out = []
    for p in f.dropouts:
        out.append(None if p == 0 else draw_mask(x2d, p, function._new_seed()).keep())
    return out


def run_autograd(f: Fused, keeps) -> list[Tensor]:
    x = f.x
    x2d = x.reshape(-1, f.x_shape[-1])
    ys = []
    for k in range(len(f.weights)):
        y = reference_lora(
            x2d,
            f.weights[k],
            f.lora_as[k],
            f.lora_bs[k],
            f.biases[k],
            scaling=f.scalings[k],
            keep=keeps[k],
            dropout=f.dropouts[k],
        )
        ys.append(y.reshape(*f.x_shape[:-1], -1))
    return ys


def grads(ys, leaves, dys):
    pairs = [(y, d) for y, d in zip(ys, dys, strict=True) if y.requires_grad]
    if not pairs or not leaves:
        return ()
    outs, douts = zip(*pairs, strict=True)
    return torch.autograd.grad(outs, leaves, douts, allow_unused=True)


def check(f: Fused, seed: int, plans=None, *, per_projection=True) -> None:
    """Fused outputs and gradients within rounding of fp64 autograd on the same inputs (the
    conftest bound), and, in fp32/fp64, equal to K ``lora_linear`` calls to rounding."""
    dtype = f.x_leaf.dtype
    ys = run_fused(f, seed, plans)
    dys = [torch.randn(y.shape, dtype=torch.float64).to(dtype) for y in ys]
    got = [*ys, *grads(ys, f.leaves(), dys)]

    keeps = masks(f, seed)
    exact, bound_in = f.fp64(), f.absolute()
    ref_ys = run_autograd(exact, keeps)
    expected = [*ref_ys, *grads(ref_ys, exact.leaves(), [d.double() for d in dys])]
    abs_ys = run_autograd(bound_in, keeps)
    bound = [*abs_ys, *grads(abs_ys, bound_in.leaves(), [d.double().abs() for d in dys])]
    for i, (a, e, b) in enumerate(zip(got, expected, bound, strict=True)):
        assert_within_bound(f"output/grad {i}", a, e, b, dtype)

    if per_projection and dtype != torch.bfloat16:
        ys2 = run_per_projection(f, seed, plans)
        assert [y.requires_grad for y in ys] == [y.requires_grad for y in ys2]
        want = [*ys2, *grads(ys2, f.leaves(), dys)]
        tol = {torch.float64: 1e-12, torch.float32: 2e-5}[dtype]
        for i, (a, e) in enumerate(zip(got, want, strict=True)):
            torch.testing.assert_close(a, e, rtol=tol, atol=tol, msg=f"output/grad {i}")


CASES = {
    "qkv_planned": dict(outs=(10, 6, 6), ranks=(4, 4, 4)),
    "rank_pattern_mixed_orders": dict(
        outs=(10, 7, 9),
        ranks=(4, 2, 3),
        bias=("trainable", None, "frozen"),
        plans=[SPLIT, ("merged", "gradient_merged"), ("lowrank_first", "z_gradient_split")],
    ),
    "dropout_on_some": dict(
        outs=(8, 5, 5),
        ranks=(3, 5, 2),
        dropouts=(0.0, 0.3, 0.1),
        plans=[SPLIT, ("lowrank_first", "g_recompute_split"), ("sequential", "gradient_split")],
    ),
    "gate_up_dropout_no_bias": dict(
        outs=(16, 16), ranks=(4, 4), bias=(None, None), dropouts=(0.1, 0.1)
    ),
    "one_projection": dict(outs=(9,), ranks=(3,)),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_per_projection_and_autograd(case, dtype, seed):
    spec = dict(CASES[case])
    plans = spec.pop("plans", None)
    check(make(**spec, dtype=dtype), seed, plans)


@pytest.mark.parametrize(("forward", "backward"), PAIRS)
def test_every_order_beside_stacked_projections(forward, backward, seed):
    """Projection 1 runs each pair (with dropout where the pair allows it); 0 and 2 stack."""
    merged = FORWARD_VARIANTS[forward].merged or BACKWARD_VARIANTS[backward].merged
    plans = [SPLIT, (forward, backward), ("lowrank_first", "recompute_split_dx_first")]
    for p in (0.0,) if merged else (0.0, 0.2):
        f = make((6, 5, 7), (2, 3, 4), dropouts=(0.0, p, 0.0), bias=("trainable", None, None))
        check(f, seed, plans)


@pytest.mark.parametrize(
    ("x_shape", "x_layout"),
    [
        ((6, IN), "contiguous"),
        ((6, IN), "transposed"),
        ((2, 3, IN), "sliced"),
        ((2, 3, IN), "expanded"),
        ((2, 2, 3, IN), "transposed"),
        ((2, 2, 3, IN), "contiguous"),
    ],
)
def test_x_rank_and_memory_layout(x_shape, x_layout, seed):
    f = make((7, 5), (3, 2), x_shape=x_shape, x_layout=x_layout, dropouts=(0.0, 0.2))
    check(f, seed)


@pytest.mark.parametrize(
    "frozen",
    [
        dict(x_grad=False),
        dict(frozen=(1,)),
        dict(frozen=(0, 1, 2), x_grad=True, bias=("trainable", None, "frozen")),
        dict(frozen=(0,), dropouts=(0.2, 0.0, 0.0)),
        dict(x_grad=False, bias=("frozen", None, None), dropouts=(0.0, 0.0, 0.3)),
    ],
)
def test_frozen_parts(frozen, seed):
    check(make((6, 5, 4), (2, 3, 2), **frozen), seed)


def test_only_a_or_only_b_trainable(seed):
    f = make((6, 5), (2, 3))
    f.lora_as[0].requires_grad_(False)
    f.lora_bs[1].requires_grad_(False)
    check(f, seed, [SPLIT, ("merged", "gradient_merged")])


def test_gradients_accumulate_into_separate_tensors(seed):
    """Two backwards add up, and each A_k's .grad (a row block of the stacked dA) is its own."""
    f = make((6, 5, 4), (2, 3, 2))
    ref = run_per_projection(f, seed)
    once = grads(ref, f.lora_as, [torch.ones_like(y) for y in ref])
    for _ in range(2):
        ys = run_fused(f, seed)
        torch.autograd.backward(ys, [torch.ones_like(y) for y in ys])
    for a, g in zip(f.lora_as, once, strict=True):
        torch.testing.assert_close(a.grad, 2 * g, rtol=1e-12, atol=1e-12)
    f.lora_as[0].grad.zero_()
    torch.testing.assert_close(f.lora_as[1].grad, 2 * once[1], rtol=1e-12, atol=1e-12)


def test_unused_outputs_get_no_gradient(seed):
    f = make((6, 5, 4), (2, 3, 2), dropouts=(0.0, 0.0, 0.2))
    ys = run_fused(f, seed)
    got = grads([ys[0], ys[2]], f.leaves(), [torch.ones_like(ys[0]), torch.ones_like(ys[2])])
    ref = run_per_projection(f, seed)
    want = grads([ref[0], ref[2]], f.leaves(), [torch.ones_like(ref[0]), torch.ones_like(ref[2])])
    for a, e in zip(got, want, strict=True):
        assert (a is None) == (e is None)
        if a is not None:
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("x_shape", [(0, IN), (2, 0, IN)])
def test_empty_batch(x_shape, seed):
    f = make((6, 5), (2, 3), x_shape=x_shape, dropouts=(0.0, 0.2))
    ys = run_fused(f, seed, [SPLIT, ("lowrank_first", "gradient_split")])
    assert [tuple(y.shape) for y in ys] == [(*x_shape[:-1], 6), (*x_shape[:-1], 5)]
    sum(y.sum() for y in ys).backward()
    assert f.x_leaf.grad.shape == f.x_leaf.shape
    assert all(a.grad.abs().sum() == 0 for a in f.lora_as)


def test_output_gradients_of_sum_are_broadcast_views(seed):
    """``y.sum().backward()`` hands the op stride-0 gradients."""
    f = make((6, 5, 4), (2, 3, 2), dropouts=(0.0, 0.0, 0.2))
    plans = [SPLIT, ("merged", "gradient_merged"), None]
    got = torch.autograd.grad(sum(y.sum() for y in run_fused(f, seed, plans)), f.leaves())
    ref = run_per_projection(f, seed, plans)
    want = torch.autograd.grad(sum(y.sum() for y in ref), f.leaves())
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_eval_mode_and_no_grad_run_the_no_dropout_formula(seed):
    f = make((6, 5), (2, 3), dropouts=(0.3, 0.1))
    no_drop = make((6, 5), (2, 3))
    for t in ("x_leaf", "weights", "lora_as", "lora_bs", "biases", "scalings"):
        setattr(no_drop, t, getattr(f, t))
    want = run_fused(no_drop, seed)
    for y, w in zip(run_fused(f, seed, training=False), want, strict=True):
        torch.testing.assert_close(y, w, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        ys = run_fused(f, seed, training=False)
    assert all(y.grad_fn is None for y in ys)
    for y, w in zip(ys, want, strict=True):
        torch.testing.assert_close(y, w, rtol=1e-12, atol=1e-12)


def test_autocast_bf16_matches_lora_linear_under_autocast(seed):
    f = make((8, 6, 6), (4, 2, 4), dtype=torch.float32, dropouts=(0.0, 0.1, 0.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ys = run_fused(f, seed)
        ref = run_per_projection(f, seed)
    for y, r in zip(ys, ref, strict=True):
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y, r, rtol=2e-2, atol=2e-2)
    dys = [torch.randn_like(y) for y in ys]
    for a, e in zip(grads(ys, f.leaves(), dys), grads(ref, f.leaves(), dys), strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, e, rtol=3e-2, atol=3e-2)


@st.composite
def _problems(draw):
    kk = draw(st.integers(1, 4))
    x_shape = (*draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)), draw(st.integers(1, 9)))
    dropouts = [draw(st.sampled_from([0.0, 0.0, 0.25])) for _ in range(kk)]
    plans = [draw(st.sampled_from(SPLIT_PAIRS if p else PAIRS)) for p in dropouts]
    return dict(
        outs=[draw(st.integers(1, 9)) for _ in range(kk)],
        ranks=[draw(st.integers(1, 5)) for _ in range(kk)],
        bias=[draw(st.sampled_from([None, "frozen", "trainable"])) for _ in range(kk)],
        dropouts=dropouts,
        x_shape=x_shape,
        x_layout=draw(st.sampled_from(["contiguous", "transposed"])),
        x_grad=draw(st.booleans()),
        frozen=tuple(k for k in range(kk) if draw(st.integers(0, 4)) == 0),
        plans=plans,
    )


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(problem=_problems(), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_random_shapes_and_options(problem, dtype, seed):
    problem = dict(problem)
    plans = problem.pop("plans")
    check(make(**problem, dtype=dtype), seed, plans)


# --- what it keeps for backward --------------------------------------------------------------


def _saved(run) -> list[Tensor]:
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return saved


@pytest.mark.parametrize("dropouts", [(0.0, 0.0, 0.0), (0.1, 0.0, 0.2)])
def test_saves_x_once_and_the_parameters(dropouts, seed):
    f = make((10, 6, 6), (4, 2, 4), dropouts=dropouts)
    plans = [SPLIT, ("merged", "gradient_merged"), None]
    saved = _saved(lambda: run_fused(f, seed, plans))
    x = f.x
    params = [*f.weights, *f.lora_as, *f.lora_bs]
    assert sum(t.data_ptr() == x.data_ptr() for t in saved) == 1
    assert len(saved) == 1 + len(params)
    for t in saved:
        assert t.data_ptr() == x.data_ptr() or any(
            t.data_ptr() == p.data_ptr() and t.shape == p.shape for p in params
        ), f"saved a tensor of shape {tuple(t.shape)} that is neither x nor a parameter"
    # K separate calls keep x K times.
    per_layer = _saved(lambda: run_per_projection(f, seed, plans))
    assert sum(t.data_ptr() == x.data_ptr() for t in per_layer) == 3


# --- the cost model --------------------------------------------------------------------------


def _fused_problem(n, in_f, outs, ranks, *, x_grad=True, lora=None, dropouts=None, bias=None):
    kk = len(outs)
    return FusedProblem(
        tuple(
            Problem(
                n,
                in_f,
                outs[k],
                ranks[k],
                needs_input_grad=x_grad,
                needs_lora_grad=True if lora is None else lora[k],
                bias=bool(bias and bias[k]),
                dropout=bool(dropouts and dropouts[k] > 0),
            )
            for k in range(kk)
        )
    )


COST_CASES = [
    dict(plans=[SPLIT] * 3),
    dict(plans=[("merged", "gradient_merged"), SPLIT, ("lowrank_first", "g_recompute_split")]),
    dict(plans=[("sequential", "z_gradient_split"), SPLIT, SPLIT], dropouts=(0.0, 0.2, 0.0)),
    dict(plans=[SPLIT, ("merged", "recompute_merged"), SPLIT], x_grad=False),
    dict(plans=[SPLIT, ("sequential", "gradient_split"), SPLIT], lora=(True, False, True)),
    dict(plans=[SPLIT, ("merged", "z_gradient_merged"), SPLIT], dropouts=(0.1, 0.0, 0.3)),
]


@pytest.mark.parametrize("case", range(len(COST_CASES)))
def test_fused_cost_counts_what_torch_counts(case, seed):
    c = COST_CASES[case]
    plans = [Plan(*p) for p in c["plans"]]
    outs, ranks, x_shape = (7, 5, 6), (3, 2, 4), (2, 4, IN)
    lora = c.get("lora", (True,) * 3)
    dropouts = c.get("dropouts", (0.0,) * 3)
    f = make(
        outs,
        ranks,
        dropouts=dropouts,
        x_shape=x_shape,
        x_grad=c.get("x_grad", True),
        frozen=tuple(k for k in range(3) if not lora[k]),
    )
    with FlopCounterMode(display=False) as counter:
        ys = run_fused(f, seed, plans)
        torch.autograd.backward(ys, [torch.ones_like(y) for y in ys])
    problem = _fused_problem(
        8, IN, outs, ranks, x_grad=c.get("x_grad", True), lora=lora, dropouts=dropouts
    )
    assert fused_cost(problem, plans).flops == counter.get_total_flops()
    assert unfused_cost(problem, plans).flops == fused_cost(problem, plans).flops


def test_fused_reads_x_once_per_stacked_product_for_qkv_shapes():
    """N=1024, in=512, q/k/v 512 wide, r=8: fewer bytes than three lora_linear calls, the same
    FLOPs, whichever plans the projections run."""
    n, in_f, outs, ranks = 1024, 512, (512, 512, 512), (8, 8, 8)
    problem = _fused_problem(n, in_f, outs, ranks)
    planned = plan_layer(n, in_f, 512, 8)
    for plans in (
        [planned] * 3,
        [Plan(*SPLIT)] * 3,
        [Plan("lowrank_first", "z_gradient_split")] * 3,
    ):
        fused, unfused = fused_cost(problem, plans), unfused_cost(problem, plans)
        assert fused.flops == unfused.flops
        assert fused.bytes() < unfused.bytes(), plans
    # With the split orders, each of the three stacked products (forward X Aᵀ, backward X Aᵀ,
    # dA) reads x once instead of three times, and the low-rank dX is written once.
    split = [Plan(*SPLIT)] * 3
    saved = unfused_cost(problem, split).bytes() - fused_cost(problem, split).bytes()
    assert saved >= 4 * 4 * 2 * n * in_f - 4 * 2 * 3 * 8 * in_f  # less the copies of A


def test_fused_problem_rejects_projections_that_do_not_share_x():
    with pytest.raises(ValueError, match="read one x"):
        FusedProblem((Problem(8, 12, 6, 2), Problem(8, 13, 6, 2)))
    with pytest.raises(ValueError, match="at least one"):
        FusedProblem(())


# --- bad input ------------------------------------------------------------------------------


def _args(**overrides):
    f = make((6, 5), (2, 3), x_shape=(4, IN))
    args = dict(
        x=f.x,
        weights=f.weights,
        lora_As=f.lora_as,
        lora_Bs=f.lora_bs,
        biases=f.biases,
        scalings=f.scalings,
        dropouts=f.dropouts,
    )
    args.update(overrides)
    return args


BAD = [
    (dict(lora_As=[torch.randn(2, IN)]), ValueError, "lengths weights=2, lora_As=1"),
    (dict(biases=[None]), ValueError, "biases=1"),
    (dict(scalings=[1.0, 1.0, 1.0]), ValueError, "scalings=3"),
    (dict(plans=[SPLIT]), ValueError, "plans=1"),
    (
        dict(weights=[torch.randn(6, IN).double(), torch.randn(5, IN + 1).double()]),
        ValueError,
        r"projection 1: x must have shape \(\.\.\., 13\)",
    ),
    (
        dict(lora_As=[torch.randn(2, IN).double(), torch.randn(3, IN + 1).double()]),
        ValueError,
        r"projection 1: lora_A must have shape",
    ),
    (dict(weights=torch.randn(6, IN)), TypeError, "weights must be a list or tuple"),
    (
        dict(weights=[], lora_As=[], lora_Bs=[], biases=[], scalings=[], dropouts=[]),
        ValueError,
        "at least one projection",
    ),
    (dict(dropouts=[0.0, 1.5]), ValueError, "projection 1: dropout must be"),
    (
        dict(dropouts=[0.0, 0.1], plans=[SPLIT, ("merged", "recompute_split")]),
        ValueError,
        "projection 1: variant 'merged'",
    ),
]


@pytest.mark.parametrize(("overrides", "exc", "match"), BAD)
def test_bad_input_raises_before_any_work(overrides, exc, match):
    args = _args(**overrides)
    assert_raises_before_any_work(exc, match, lambda: fused_lora_linear(**args))
