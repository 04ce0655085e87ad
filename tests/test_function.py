"""runlora.lora_linear against plain autograd: every computation order, layout, dtype and input
form gives the reference's output and gradients."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runlora import BACKWARD_VARIANTS, FORWARD_VARIANTS, LAYOUTS, Plan
from runlora.planning.planner import plan_for

pytestmark = pytest.mark.usefixtures("single_thread")

IN_FEATURES = 12
OUT_FEATURES = 10
RANK = 4
X_SHAPE_3D = (3, 5, IN_FEATURES)
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
LOW_PRECISION = (torch.bfloat16, torch.float16)
ALL_PAIRS = list(itertools.product(FORWARD_VARIANTS, BACKWARD_VARIANTS))
#: one pair per kind of order: split/merged forward x Z/G/recompute backward x split/merged dX.
SAMPLE_PLANS = (
    Plan("sequential", "recompute_split"),
    Plan("lowrank_first", "gradient_split_dx_first", layout="autograd"),
    Plan("merged", "recompute_merged"),
    Plan("merged_t", "gradient_merged", layout="autograd"),
    Plan("sequential", "z_gradient_merged_dx_first"),
    Plan("lowrank_first", "g_recompute_split"),
)
#: how x and dY are laid out in memory (see conftest.in_layout).
MEMORY_LAYOUTS = ("contiguous", "transposed", "sliced", "expanded")
SCALINGS = (1.0, 2.0, 16 / 8**0.5, 0.0, -0.75)  # alpha / r, rsLoRA alpha / sqrt(r), edge values
# Hypothesis draws shapes (small, for speed) and every option of the op.
MAX_TOKENS = 64
MAX_FEATURES = 48
HYPOTHESIS = settings(
    max_examples=40,
    deadline=None,
    # The autouse seed fixture only reseeds torch; each example reseeds from its own draw.
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def _plan_id(plan: Plan) -> str:
    return f"{plan.forward}/{plan.backward}/{plan.layout}"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("forward", "backward"), ALL_PAIRS)
def test_every_pair_and_layout_matches_reference(
    forward, backward, layout, lora_inputs, check_reference
):
    for dtype in DTYPES:
        inputs = lora_inputs(X_SHAPE_3D, OUT_FEATURES, RANK, dtype=dtype, x_layout="sliced")
        check_reference(inputs, plan=Plan(forward, backward, layout))


@pytest.mark.parametrize("x_layout", MEMORY_LAYOUTS)
@pytest.mark.parametrize(
    "x_shape",
    [(IN_FEATURES,), (7, IN_FEATURES), X_SHAPE_3D, (2, 3, 2, IN_FEATURES)],
    ids=["1d", "2d", "3d", "4d"],
)
def test_x_rank_and_memory_layout(x_shape, x_layout, lora_inputs, check_reference):
    for plan in SAMPLE_PLANS:
        inputs = lora_inputs(x_shape, OUT_FEATURES, RANK, dtype=torch.float64, x_layout=x_layout)
        check_reference(inputs, plan=plan)


@pytest.mark.parametrize("bias", [None, "frozen", "trainable"])
@pytest.mark.parametrize(
    ("a_grad", "b_grad"), [(True, True), (True, False), (False, True), (False, False)]
)
@pytest.mark.parametrize("x_grad", [True, False])
def test_which_inputs_require_grad(x_grad, a_grad, b_grad, bias, lora_inputs, check_reference):
    for plan in SAMPLE_PLANS:
        inputs = lora_inputs(
            X_SHAPE_3D,
            OUT_FEATURES,
            RANK,
            dtype=torch.float64,
            x_grad=x_grad,
            a_grad=a_grad,
            b_grad=b_grad,
            bias=bias,
        )
        check_reference(inputs, plan=plan)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize(
    ("in_features", "out_features", "r"),
    [
        (IN_FEATURES, OUT_FEATURES, 1),
        (IN_FEATURES, OUT_FEATURES, OUT_FEATURES),
        (OUT_FEATURES, IN_FEATURES, OUT_FEATURES),
    ],
    ids=["r=1", "r=out<in", "r=in<out"],
)
def test_rank_extremes(in_features, out_features, r, dtype, lora_inputs, check_reference):
    for forward, backward in ALL_PAIRS:
        inputs = lora_inputs((9, in_features), out_features, r, dtype=dtype)
        check_reference(inputs, plan=(forward, backward))


@pytest.mark.parametrize("plan", SAMPLE_PLANS, ids=_plan_id)
@pytest.mark.parametrize("scaling", SCALINGS)
def test_scaling_values(scaling, plan, lora_inputs, check_reference):
    inputs = lora_inputs(X_SHAPE_3D, OUT_FEATURES, RANK, dtype=torch.float32, scaling=scaling)
    check_reference(inputs, plan=plan)


@pytest.mark.parametrize(
    "plan",
    [
        Plan("merged", "recompute_merged"),
        ("F2", "B5"),
        ("f3", "b3'"),
        ["sequential", "recompute_split", "autograd"],
        ("merged_t", "B4", "tuned"),
        None,
    ],
    ids=["Plan", "alias-tuple", "lowercase-alias", "list-with-layout", "mixed-names", "None"],
)
def test_plan_forms(plan, lora_inputs, check_reference):
    inputs = lora_inputs(X_SHAPE_3D, OUT_FEATURES, RANK, dtype=torch.float64)
    check_reference(inputs, plan=plan)


def test_plan_none_runs_the_planned_pair(lora_inputs, monkeypatch):
    """plan=None asks plan_for for this call's shape and options, and runs what it returns."""
    import runlora.ops.function as function

    inputs = lora_inputs(X_SHAPE_3D, OUT_FEATURES, RANK, bias="frozen")
    ran = []
    original = function.run_forward

    def spy(fwd, *args, **kwargs):
        ran.append(fwd.name)
        return original(fwd, *args, **kwargs)

    monkeypatch.setattr(function, "run_forward", spy)
    inputs.run()
    n_tokens = X_SHAPE_3D[0] * X_SHAPE_3D[1]
    expected = plan_for(
        n_tokens, IN_FEATURES, OUT_FEATURES, RANK, bias=True, dtype=torch.float32, device="cpu"
    )
    assert ran == [expected.forward]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dy_layout", MEMORY_LAYOUTS)
def test_non_contiguous_output_gradient(dy_layout, layout, lora_inputs, check_reference):
    """The gradient reaching backward may be a strided view (``y.sum()`` gives an expanded
    one); every order must read it as it is."""
    for forward, backward in ALL_PAIRS:
        inputs = lora_inputs(X_SHAPE_3D, OUT_FEATURES, RANK, dtype=torch.float64)
        check_reference(inputs, plan=Plan(forward, backward, layout), dy_layout=dy_layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_keep_xa_matches_reference(layout, lora_inputs, check_reference):
    for forward, backward in ALL_PAIRS:
        inputs = lora_inputs(X_SHAPE_3D, OUT_FEATURES, RANK, dtype=torch.float64)
        check_reference(inputs, plan=Plan(forward, backward, layout), keep_xa=True)


@pytest.mark.parametrize("plan", SAMPLE_PLANS, ids=_plan_id)
def test_no_grad_and_inference_mode(plan, lora_inputs):
    inputs = lora_inputs(X_SHAPE_3D, OUT_FEATURES, RANK, dtype=torch.float64)
    expected = inputs.run_reference()
    with torch.no_grad():
        y = inputs.run(plan=plan)
    assert not y.requires_grad
    torch.testing.assert_close(y, expected.detach())
    with torch.inference_mode():
        torch.testing.assert_close(inputs.run(plan=plan), expected.detach())
    # grad mode on, nothing requiring grad: no autograd node either
    for t in (inputs.x_leaf, inputs.lora_a, inputs.lora_b, inputs.bias):
        if t is not None:
            t.requires_grad_(False)
    y = inputs.run(plan=plan)
    assert y.grad_fn is None
    torch.testing.assert_close(y, expected.detach())


@pytest.mark.parametrize("plan", SAMPLE_PLANS, ids=_plan_id)
def test_empty_batch(plan, lora_inputs):
    inputs = lora_inputs((0, IN_FEATURES), OUT_FEATURES, RANK)
    y = inputs.run(plan=plan)
    assert y.shape == (0, OUT_FEATURES)
    y.sum().backward()
    assert inputs.lora_a.grad.abs().sum() == 0 and inputs.lora_b.grad.abs().sum() == 0
    assert inputs.x_leaf.grad.shape == (0, IN_FEATURES)


@given(data=st.data())
@HYPOTHESIS
def test_random_shapes_and_options(data, lora_inputs, check_reference):
    in_features = data.draw(st.integers(1, MAX_FEATURES), label="in")
    out_features = data.draw(st.integers(1, MAX_FEATURES), label="out")
    r = data.draw(
        st.one_of(
            st.just(1),
            st.just(min(in_features, out_features)),
            st.integers(1, min(in_features, out_features)),
        ),
        label="r",
    )
    lead = data.draw(st.lists(st.integers(1, 4), min_size=0, max_size=3), label="lead dims")
    n_last = data.draw(st.integers(1, max(1, MAX_TOKENS // math.prod(lead))), label="tokens")
    x_shape = (*lead, n_last, in_features)
    forward, backward = data.draw(st.sampled_from(ALL_PAIRS), label="pair")
    layout = data.draw(st.sampled_from(LAYOUTS), label="layout")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    inputs_seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    torch.manual_seed(inputs_seed)
    inputs = lora_inputs(
        x_shape,
        out_features,
        r,
        dtype=dtype,
        x_layout=data.draw(st.sampled_from(MEMORY_LAYOUTS), label="x layout"),
        x_grad=data.draw(st.booleans(), label="x_grad"),
        a_grad=data.draw(st.booleans(), label="a_grad"),
        b_grad=data.draw(st.booleans(), label="b_grad"),
        bias=data.draw(st.sampled_from([None, "frozen", "trainable"]), label="bias"),
        scaling=data.draw(
            st.one_of(st.sampled_from(SCALINGS), st.floats(-4.0, 4.0, allow_nan=False)),
            label="scaling",
        ),
    )
    check_reference(
        inputs,
        plan=Plan(forward, backward, layout),
        keep_xa=data.draw(st.booleans(), label="keep_xa"),
        dy_layout=data.draw(st.sampled_from(MEMORY_LAYOUTS), label="dY layout"),
    )


def test_autocast_bf16_matches_autograd_under_autocast(lora_inputs):
    """Autocast casts nothing inside a custom Function; lora_linear casts its inputs the way
    autocast casts F.linear's, so Y and the fp32 parameters' gradients match plain autograd
    under the same autocast."""
    inputs = lora_inputs(X_SHAPE_3D, OUT_FEATURES, RANK, dtype=torch.float32)
    reference = inputs.converted(torch.float32)
    for plan in SAMPLE_PLANS:
        for t in (inputs, reference):
            for leaf in t.leaves().values():
                leaf.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = inputs.run(plan=plan)
            y_ref = reference.run_reference()
        assert y.dtype == y_ref.dtype == torch.bfloat16
        dy = torch.randn(y.shape).to(y)
        y.backward(dy)
        y_ref.backward(dy)
        # Both sides round to bf16 at different points: compare at bf16 precision.
        tol = {"atol": 0.05, "rtol": 0.02}
        torch.testing.assert_close(y.float(), y_ref.float(), **tol)
        for name, leaf in inputs.leaves().items():
            ref_grad = reference.leaves()[name].grad
            assert leaf.grad.dtype == torch.float32, name
            torch.testing.assert_close(leaf.grad, ref_grad, **tol, msg=f"d{name}")


def test_autocast_leaves_float64_alone(lora_inputs, check_reference):
    """As autocast does for F.linear, fp64 inputs are not cast to the autocast dtype."""
    inputs = lora_inputs(X_SHAPE_3D, OUT_FEATURES, RANK, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        check_reference(inputs, plan=SAMPLE_PLANS[0])


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_every_pair_and_layout_matches_reference(dtype, lora_inputs, check_reference):
    for (forward, backward), layout in itertools.product(ALL_PAIRS, LAYOUTS):
        inputs = lora_inputs(
            X_SHAPE_3D, OUT_FEATURES, RANK, dtype=dtype, device="cuda", x_layout="transposed"
        )
        check_reference(inputs, plan=Plan(forward, backward, layout))
        inputs = lora_inputs(
            X_SHAPE_3D, OUT_FEATURES, RANK, dtype=dtype, device="cuda", bias=None, x_grad=False
        )
        check_reference(inputs, plan=Plan(forward, backward, layout))


@CUDA
@pytest.mark.cuda
def test_cuda_autocast_bf16(lora_inputs):
    inputs = lora_inputs(X_SHAPE_3D, OUT_FEATURES, RANK, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = inputs.run(plan=SAMPLE_PLANS[0])
        y_ref = inputs.run_reference()
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), atol=0.05, rtol=0.02)
