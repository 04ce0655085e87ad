"""runlora's DoRA op (``dora_linear``) against PEFT's DoRA layer and a plain-autograd reference:
every order, dtype, input form and dropout; what it saves; the ‖W‖² cache; bad input."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_within_bound, in_layout, leaf_shape
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_errors import assert_raises_before_any_work
from torch import Tensor, nn

import runlora.ops.dora as dora
import runlora.ops.function as function
from runlora import BACKWARD_VARIANTS, FORWARD_VARIANTS, Plan, dora_linear
from runlora.ops.dora_variants import (
    DoRAPlan,
    choose_dora_plan,
    dora_cost,
    dora_orders,
    saved_elements,
)
from runlora.ops.dropout import draw_mask
from runlora.ops.variants import Problem

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("single_thread")

IN_FEATURES = 12
OUT_FEATURES = 10
RANK = 4
X_SHAPE_3D = (3, 5, IN_FEATURES)  # N = 15 tokens: no saved shape is ambiguous
N_TOKENS = 15
SCALING = 0.75
DROPOUT = 0.3
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
ALL_PAIRS = [Plan(f, b) for f, b in itertools.product(FORWARD_VARIANTS, BACKWARD_VARIANTS)]
#: every DoRA order: each legal (norm, scale, dm) for each LoRA pair.
ALL_ORDERS = [o for pair in ALL_PAIRS for o in dora_orders(pair)]
DROPOUT_ORDERS = [o for pair in ALL_PAIRS for o in dora_orders(pair, dropout=True)]
SAMPLE_ORDERS = [
    DoRAPlan(Plan("sequential", "recompute_split"), "factored", "output", "saved"),
    DoRAPlan(Plan("lowrank_first", "gradient_split_dx_first", "autograd"), "factored", "weight"),
    DoRAPlan(Plan("merged", "recompute_merged"), "merged", "weight", "gradient"),
    DoRAPlan(Plan("merged_t", "gradient_merged", "autograd"), "merged", "output", "saved"),
    DoRAPlan(Plan("merged", "z_gradient_merged_dx_first"), "factored", "output", "recompute"),
    DoRAPlan(Plan("sequential", "g_recompute_split"), "factored", "weight", "gradient"),
]
SAMPLE_DROPOUT_ORDERS = [
    DoRAPlan(Plan("sequential", "recompute_split"), "factored", "weight", "recompute"),
    DoRAPlan(Plan("merged", "gradient_merged", "autograd"), "factored", "weight", "gradient"),
    DoRAPlan(Plan("lowrank_first", "recompute_merged"), "factored", "weight", "gradient"),
]
HYPOTHESIS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def _order_id(plan: DoRAPlan) -> str:
    lora = plan.lora
    return f"{lora.forward}/{lora.backward}/{lora.layout}/{plan.norm}/{plan.scale}/{plan.dm}"


# --- the reference: PEFT's formulas by plain autograd ------------------------------------------


def reference_dora(x, w, a, b, m, bias, s, *, keep=None, p=0.0, norm=None, bound=False):
    """PEFT's DoRA output. ``keep``: the dropout mask (training with dropout), None for none.
    ``norm``: n to use (default: ‖W + s·B A‖ of these inputs, detached). ``bound``: the inputs
    are absolute values and |g - 1| is bounded by g + 1, for the error bound."""
    if norm is None:
        norm = torch.linalg.vector_norm(w + s * b @ a, dim=1).detach()
    g = m / norm
    if keep is None:
        y = g * (F.linear(x, w) + s * F.linear(F.linear(x, a), b))
        return y if bias is None else y + bias
    xd = x * keep / (1.0 - p)
    g1 = g + 1.0 if bound else g - 1.0
    return F.linear(x, w, bias) + g1 * F.linear(xd, w) + g * s * F.linear(F.linear(xd, a), b)


@dataclass
class DoraInputs:
    """The op's inputs; x is a view of ``x_leaf`` in ``x_layout`` (see conftest.in_layout)."""

    x_leaf: Tensor
    weight: Tensor
    lora_a: Tensor
    lora_b: Tensor
    magnitude: Tensor
    bias: Tensor | None
    scaling: float
    x_shape: tuple[int, ...]
    x_layout: str = "contiguous"

    @property
    def x(self) -> Tensor:
        return in_layout(self.x_leaf, self.x_shape, self.x_layout)

    def leaves(self) -> dict[str, Tensor]:
        named = {
            "x": self.x_leaf,
            "lora_A": self.lora_a,
            "lora_B": self.lora_b,
            "magnitude": self.magnitude,
            "bias": self.bias,
        }
        return {k: t for k, t in named.items() if t is not None and t.requires_grad}

    def converted(self, dtype, *, absolute=False) -> DoraInputs:
        def conv(t):
            if t is None:
                return None
            c = t.detach().to(dtype)
            return (c.abs() if absolute else c.clone()).requires_grad_(t.requires_grad)

        return replace(
            self,
            x_leaf=conv(self.x_leaf),
            weight=conv(self.weight),
            lora_a=conv(self.lora_a),
            lora_b=conv(self.lora_b),
            magnitude=conv(self.magnitude),
            bias=conv(self.bias),
            scaling=abs(self.scaling) if absolute else self.scaling,
        )

    def args(self):
        return (self.x, self.weight, self.lora_a, self.lora_b, self.magnitude, self.bias)

    def run(self, **kwargs) -> Tensor:
        return dora_linear(*self.args(), scaling=self.scaling, **kwargs)

    def norm(self) -> Tensor:
        w, a, b = (t.detach().double() for t in (self.weight, self.lora_a, self.lora_b))
        return torch.linalg.vector_norm(w + self.scaling * b @ a, dim=1)


def make_inputs(
    x_shape=X_SHAPE_3D,
    out_features=OUT_FEATURES,
    r=RANK,
    *,
    dtype=torch.float64,
    x_layout="contiguous",
    x_grad=True,
    a_grad=True,
    b_grad=True,
    m_grad=True,
    bias="trainable",
    scaling=SCALING,
    device="cpu",
) -> DoraInputs:
    """Unit-order random inputs drawn in fp64 and rounded to ``dtype``; lora_B is non-zero and
    m is the norm times 1 ± 0.3, so g = m / n is far from PEFT's initial 1."""
    in_features = x_shape[-1]

    def rand(*shape, scale=1.0, grad=False):
        t = torch.randn(shape, dtype=torch.float64) * scale
        return t.to(device=device, dtype=dtype).requires_grad_(grad)

    inputs = DoraInputs(
        x_leaf=rand(*leaf_shape(x_shape, x_layout), grad=x_grad),
        weight=rand(out_features, in_features, scale=in_features**-0.5),
        lora_a=rand(r, in_features, scale=in_features**-0.5, grad=a_grad),
        lora_b=rand(out_features, r, scale=r**-0.5, grad=b_grad),
        magnitude=rand(out_features),
        bias=None if bias is None else rand(out_features, grad=bias == "trainable"),
        scaling=scaling,
        x_shape=tuple(x_shape),
        x_layout=x_layout,
    )
    m = inputs.norm() * (1.0 + 0.3 * torch.randn(out_features, dtype=torch.float64)).to(device)
    inputs.magnitude = m.to(dtype).requires_grad_(m_grad)
    return inputs


def _grads(y, leaves, dy):
    if not leaves:
        return {}
    return dict(zip(leaves, torch.autograd.grad(y, list(leaves.values()), dy), strict=True))


def _mask_for(inputs: DoraInputs, seed: int, p: float = DROPOUT) -> Tensor:
    """The keep mask the op draws after ``torch.manual_seed(seed)``, shaped like x."""
    torch.manual_seed(seed)
    x2d = inputs.x.reshape(-1, inputs.x.shape[-1])
    keep = draw_mask(x2d, p, function._new_seed()).keep()
    return keep.reshape(inputs.x.shape)


def _run_seeded(inputs: DoraInputs, seed: int, **kwargs) -> Tensor:
    torch.manual_seed(seed)
    return inputs.run(**kwargs)


def check_reference(inputs: DoraInputs, seed: int, *, dropout=0.0, **op_kwargs) -> Tensor:
    """The op's Y and gradients against the fp64 reference, within the dtype-scaled bound of
    conftest (evaluated on |inputs|, with the true norm over κ). Returns the op's output."""
    dtype = inputs.x_leaf.dtype
    y = _run_seeded(inputs, seed, dropout=dropout, **op_kwargs)
    dropout = dropout if op_kwargs.get("training", True) else 0.0  # eval: no dropout
    keep = _mask_for(inputs, seed, dropout).double() if dropout else None
    assert y.shape == (*inputs.x.shape[:-1], inputs.weight.shape[0]) and y.dtype == dtype
    dy = torch.randn(y.shape, dtype=torch.float64).to(y)
    grads = _grads(y, inputs.leaves(), dy)
    norm = inputs.norm()
    # n's own rounding grows with how much the rows of W and s·B A cancel: by up to
    # κ = ‖|W| + |s|·|B| |A|‖² / n² (1 unless they do), for any way of computing n.
    w, a, b = (t.detach().double().abs() for t in (inputs.weight, inputs.lora_a, inputs.lora_b))
    kappa = (torch.linalg.vector_norm(w + abs(inputs.scaling) * b @ a, dim=1) / norm) ** 2
    ref = inputs.converted(torch.float64)
    y_ref = reference_dora(*ref.args(), ref.scaling, keep=keep, p=dropout, norm=norm)
    grads_ref = _grads(y_ref, ref.leaves(), dy.double())
    absolute = inputs.converted(torch.float64, absolute=True)
    y_bound = reference_dora(
        *absolute.args(), absolute.scaling, keep=keep, p=dropout, norm=norm / kappa, bound=True
    )
    grads_bound = _grads(y_bound, absolute.leaves(), dy.double().abs())
    context = f", dropout={dropout}, {op_kwargs}"
    assert_within_bound("Y", y, y_ref, y_bound, dtype, context)
    for name, grad in grads.items():
        assert_within_bound(f"d{name}", grad, grads_ref[name], grads_bound[name], dtype, context)
    return y


# --- every order, dtype and input form ----------------------------------------------------------


def test_every_order_matches_reference_in_fp64(seed):
    """All 480 DoRA orders without dropout (norm x scale x dm x every LoRA pair)."""
    for plan in ALL_ORDERS:
        check_reference(make_inputs(x_layout="sliced"), seed, plan=plan)


def test_every_order_matches_reference_with_dropout_in_fp64(seed):
    for plan in DROPOUT_ORDERS:
        check_reference(make_inputs(x_layout="transposed"), seed, plan=plan, dropout=DROPOUT)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("plan", SAMPLE_ORDERS, ids=_order_id)
def test_sample_orders_in_every_dtype(plan, dtype, seed):
    check_reference(make_inputs(dtype=dtype), seed, plan=plan)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("plan", SAMPLE_DROPOUT_ORDERS, ids=_order_id)
def test_sample_dropout_orders_in_every_dtype(plan, dtype, seed):
    check_reference(make_inputs(dtype=dtype), seed, plan=plan, dropout=DROPOUT)


@pytest.mark.parametrize("x_layout", ["contiguous", "transposed", "sliced", "expanded"])
@pytest.mark.parametrize(
    "x_shape", [(7, IN_FEATURES), X_SHAPE_3D, (2, 3, 2, IN_FEATURES)], ids=["2d", "3d", "4d"]
)
def test_x_rank_and_memory_layout(x_shape, x_layout, seed):
    for plan in SAMPLE_ORDERS[:3]:
        check_reference(make_inputs(x_shape, x_layout=x_layout), seed, plan=plan)
    check_reference(
        make_inputs(x_shape, x_layout=x_layout), seed, plan=SAMPLE_DROPOUT_ORDERS[0], dropout=0.2
    )


@pytest.mark.parametrize("bias", [None, "frozen", "trainable"])
@pytest.mark.parametrize("frozen", ["x", "lora_A", "lora_B", "magnitude", "adapter", "all"])
def test_frozen_parts(frozen, bias, seed):
    grads = {
        "x_grad": frozen not in ("x", "all"),
        "a_grad": frozen not in ("lora_A", "adapter", "all"),
        "b_grad": frozen not in ("lora_B", "adapter", "all"),
        "m_grad": frozen not in ("magnitude", "all"),
    }
    for plan in (None, SAMPLE_ORDERS[0], SAMPLE_ORDERS[2], SAMPLE_ORDERS[5]):
        check_reference(make_inputs(bias=bias, **grads), seed, plan=plan)
    check_reference(make_inputs(bias=bias, **grads), seed, plan=None, dropout=DROPOUT)


@pytest.mark.parametrize("scaling", [2.0, 0.0, -0.75])
def test_scalings_and_planned_default(scaling, seed):
    for save_output in (True, False):
        inputs = make_inputs(scaling=scaling)
        check_reference(inputs, seed, save_output=save_output)
        check_reference(inputs, seed, save_output=save_output, dropout=DROPOUT)


def test_zero_magnitude_rows_are_exact(seed):
    """No division by g or m: a zero magnitude gives finite, exact gradients."""
    inputs = make_inputs()
    with torch.no_grad():
        inputs.magnitude[::3] = 0.0
    for plan in SAMPLE_ORDERS + SAMPLE_DROPOUT_ORDERS:
        p = DROPOUT if plan in SAMPLE_DROPOUT_ORDERS else 0.0
        check_reference(inputs, seed, plan=plan, dropout=p)


def test_keep_xa(seed):
    for plan in SAMPLE_ORDERS:
        check_reference(make_inputs(), seed, plan=plan, keep_xa=True)
    for plan in SAMPLE_DROPOUT_ORDERS:
        check_reference(make_inputs(), seed, plan=plan, keep_xa=True, dropout=DROPOUT)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda(dtype, seed):
    """On CUDA the dropout mask is drawn dense and the norms reduce on the device."""
    for plan in [None, *SAMPLE_ORDERS]:
        check_reference(make_inputs(dtype=dtype, device="cuda"), seed, plan=plan)
    for plan in [None, *SAMPLE_DROPOUT_ORDERS]:
        check_reference(make_inputs(dtype=dtype, device="cuda"), seed, plan=plan, dropout=0.5)


def test_eval_mode_and_no_grad_run_the_no_dropout_formula(seed):
    inputs = make_inputs()
    for plan in SAMPLE_ORDERS:
        y = check_reference(inputs, seed, plan=plan, dropout=0.5, training=False)
        with torch.no_grad():
            torch.testing.assert_close(inputs.run(plan=plan), y, rtol=0, atol=0)


def test_backward_uses_the_forward_mask(monkeypatch, seed):
    """The dropout check above fails if backward drew another mask than forward."""
    original = dora._draw_mask
    calls = []

    def another_mask_in_backward(x2d, p, s):
        calls.append(s)
        return original(x2d, p, s + (len(calls) > 1))

    monkeypatch.setattr(dora, "_draw_mask", another_mask_in_backward)
    with pytest.raises(AssertionError, match="off the fp64 reference"):
        check_reference(make_inputs(), seed, plan=SAMPLE_DROPOUT_ORDERS[0], dropout=DROPOUT)


TOKENS = st.integers(1, 24)
FEATURES = st.integers(1, 24)


@HYPOTHESIS
@given(
    data=st.data(),
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    n=TOKENS,
    in_features=FEATURES,
    out_features=FEATURES,
    r=st.integers(1, 8),
    dtype=st.sampled_from(DTYPES),
    x_layout=st.sampled_from(["contiguous", "transposed", "sliced", "expanded"]),
    dropout=st.sampled_from([0.0, 0.0, 0.2, 0.5]),
    bias=st.sampled_from([None, "frozen", "trainable"]),
    grads=st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans()),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_and_orders(
    data, lead, n, in_features, out_features, r, dtype, x_layout, dropout, bias, grads, seed
):
    torch.manual_seed(seed)
    x_grad, a_grad, b_grad, m_grad = grads
    inputs = make_inputs(
        (*lead, n, in_features),
        out_features,
        r,
        dtype=dtype,
        x_layout=x_layout,
        x_grad=x_grad,
        a_grad=a_grad,
        b_grad=b_grad,
        m_grad=m_grad,
        bias=bias,
    )
    pair = data.draw(st.sampled_from(ALL_PAIRS))
    plan = data.draw(st.sampled_from([None, pair, *dora_orders(pair, dropout > 0.0)]))
    check_reference(inputs, seed, plan=plan, dropout=dropout)


def test_a_row_whose_update_cancels_its_weight_stays_finite_and_within_precision():
    """bf16, in_features = 1: row 5 of W and of s·B A cancel to 1 % of their size (κ ≈ 5400),
    so the factored n² is all round-off; it is floored at the round-off's size, not zero (a
    NaN output before, found by the random test above)."""
    torch.manual_seed(0)
    inputs = make_inputs((3, 3, 21, 1), 10, 8, dtype=torch.bfloat16, x_grad=False,
                         a_grad=False, b_grad=False, m_grad=False)  # fmt: skip
    n = dora.weight_norms(inputs.weight, inputs.lora_a, inputs.lora_b, inputs.scaling)
    assert torch.isfinite(n).all() and (n > 0).all()
    plan = DoRAPlan(lora=Plan("merged", "recompute_split"), norm="factored")
    y = check_reference(inputs, 0, plan=plan)
    assert torch.isfinite(y).all()
    w = torch.tensor([[2.0], [-3.0]], dtype=torch.bfloat16)  # W + s·B A = 0 exactly
    a, b = torch.ones(1, 1, dtype=torch.bfloat16), torch.tensor([[-2.0], [3.0]]).bfloat16()
    n = dora.weight_norms(w, a, b, 1.0)
    assert torch.isfinite(n).all() and (n > 0).all() and (n < 0.05).all()


# --- against PEFT's own DoRA layer --------------------------------------------------------------


class FixedMask(nn.Module):
    """Stands in for PEFT's ``lora_dropout``: dropout with a given keep mask."""

    def __init__(self, keep: Tensor, p: float) -> None:
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x: Tensor) -> Tensor:
        return x * self.keep.to(x.dtype) / (1.0 - self.p)


def peft_dora_layer(dtype, *, bias=True, dropout=0.0, fan_in_fan_out=False):
    """A PEFT DoRA layer over a tiny nn.Linear (or GPT-2 Conv1D), all in ``dtype``, with a
    non-zero lora_B, a magnitude away from its initial norm and a trainable bias."""
    if fan_in_fan_out:
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(OUT_FEATURES, IN_FEATURES)
        if not bias:
            base.bias = None
    else:
        base = nn.Linear(IN_FEATURES, OUT_FEATURES, bias=bias)
    config = peft.LoraConfig(
        r=RANK,
        lora_alpha=3,
        lora_dropout=dropout,
        target_modules=["0"],
        use_dora=True,
        fan_in_fan_out=fan_in_fan_out,
    )
    model = nn.Sequential(base).to(dtype)
    layer = peft.get_peft_model(model, config, autocast_adapter_dtype=False).base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0.0, RANK**-0.5)
        magnitude = layer.lora_magnitude_vector["default"].weight
        magnitude.mul_(1.0 + 0.3 * torch.randn_like(magnitude))
    if bias:
        layer.base_layer.bias.requires_grad_(True)
    return layer.train()


def _peft_tensors(layer):
    weight = layer.base_layer.weight
    weight = weight.t() if layer.fan_in_fan_out else weight
    return {
        "weight": weight,
        "lora_A": layer.lora_A["default"].weight,
        "lora_B": layer.lora_B["default"].weight,
        "magnitude": layer.lora_magnitude_vector["default"].weight,
        "bias": layer.base_layer.bias,
    }


def _assert_close_to_peft(name, ours, theirs, dtype):
    """fp64/fp32: to rounding; bf16/fp16: normwise within 16 eps (both round differently)."""
    assert ours.dtype == theirs.dtype == dtype, name
    if dtype in (torch.float64, torch.float32):
        tol = {torch.float64: 1e-12, torch.float32: 1e-5}[dtype]
        torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol, msg=name)
        return
    err = (ours.double() - theirs.double()).abs().max().item()
    scale = theirs.double().abs().max().item()
    assert err <= 16 * torch.finfo(dtype).eps * scale, f"{name} ({dtype}): {err:.3g} vs {scale:.3g}"


def check_against_peft(layer, dtype, seed, *, dropout=0.0, plans=(None,), x_shape=X_SHAPE_3D):
    x = torch.randn(x_shape, dtype=torch.float64).to(dtype).requires_grad_()
    tensors = _peft_tensors(layer)
    if dropout and layer.training:
        keep = _mask_for(DoraInputs(x, *tensors.values(), 1.0, tuple(x.shape)), seed, dropout)
        layer.lora_dropout["default"] = FixedMask(keep, dropout)
    y_peft = layer(x)
    dy = torch.randn(y_peft.shape, dtype=torch.float64).to(dtype)
    leaves = {"x": x, **{k: t for k, t in tensors.items() if t is not None and t.requires_grad}}
    assert set(leaves) >= {"x", "lora_A", "lora_B", "magnitude"}
    theirs = _grads(y_peft, leaves, dy)
    for plan in plans:
        torch.manual_seed(seed)
        y = dora_linear(
            x,
            tensors["weight"],
            tensors["lora_A"],
            tensors["lora_B"],
            tensors["magnitude"],
            tensors["bias"],
            scaling=layer.scaling["default"],
            dropout=dropout,
            training=layer.training,
            plan=plan,
        )
        _assert_close_to_peft(f"Y {plan}", y, y_peft, dtype)
        for name, grad in _grads(y, leaves, dy).items():
            _assert_close_to_peft(f"d{name} {plan}", grad, theirs[name], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_peft(dtype, seed):
    layer = peft_dora_layer(dtype)
    check_against_peft(layer, dtype, seed, plans=[None, *SAMPLE_ORDERS])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_peft_with_dropout(dtype, seed):
    layer = peft_dora_layer(dtype, dropout=DROPOUT)
    check_against_peft(layer, dtype, seed, dropout=DROPOUT, plans=[None, *SAMPLE_DROPOUT_ORDERS])


def test_matches_peft_in_eval_mode_and_without_bias(seed):
    layer = peft_dora_layer(torch.float64, bias=False, dropout=DROPOUT).eval()
    check_against_peft(layer, torch.float64, seed, dropout=DROPOUT, plans=[None, *SAMPLE_ORDERS])


def test_matches_peft_on_a_conv1d_base(seed):
    """GPT-2's Conv1D stores W as (in, out) (``fan_in_fan_out``): the op takes its view Wᵀ."""
    pytest.importorskip("transformers")
    layer = peft_dora_layer(torch.float64, fan_in_fan_out=True)
    check_against_peft(layer, torch.float64, seed, plans=[None, *SAMPLE_ORDERS])


def test_matches_peft_in_a_tiny_llama(seed):
    """Every projection of a tiny Llama under PEFT's DoRA, layer by layer, through the op."""
    from tiny_models import llama

    model = peft.get_peft_model(
        llama(),
        peft.LoraConfig(r=RANK, lora_alpha=8, use_dora=True, target_modules="all-linear"),
    )
    layers = [m for m in model.modules() if isinstance(m, peft.tuners.lora.Linear)]
    assert len(layers) == 14
    for layer in layers[:7]:
        with torch.no_grad():
            layer.lora_B["default"].weight.normal_(0.0, 0.1)
        x_shape = (2, 3, layer.in_features)
        check_against_peft(layer.train(), torch.float32, seed, x_shape=x_shape)


# --- what it saves -----------------------------------------------------------------------------


def saved_shapes(inputs: DoraInputs, **kwargs) -> list[tuple[int, ...]]:
    """Shapes of the non-parameter tensors the op saves for backward, one per storage."""
    params = {
        t.untyped_storage().data_ptr()
        for t in (inputs.weight, inputs.lora_a, inputs.lora_b, inputs.magnitude, inputs.bias)
        if t is not None
    }
    saved: dict[int, Tensor] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved.setdefault(ptr, t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = inputs.run(**kwargs)
    y.sum().backward()  # what was saved is enough for backward
    return sorted(tuple(t.shape) for t in saved.values())


def test_saves_an_output_sized_tensor_only_for_the_saved_order():
    for plan in ALL_ORDERS + DROPOUT_ORDERS:
        p = DROPOUT if plan in DROPOUT_ORDERS else 0.0
        for m_grad in (True, False):
            inputs = make_inputs(x_layout="sliced", m_grad=m_grad)
            expected = [(OUT_FEATURES,), X_SHAPE_3D]  # n, and x as given (a sliced view)
            if plan.dm == "saved" and m_grad:
                expected.append((N_TOKENS, OUT_FEATURES))  # U
            assert saved_shapes(inputs, plan=plan, dropout=p) == sorted(expected), plan


def test_saved_bytes_follow_the_cost_model():
    problem = Problem(N_TOKENS, IN_FEATURES, OUT_FEATURES, RANK)
    for plan in ALL_ORDERS[:10]:
        shapes = saved_shapes(make_inputs(), plan=plan)
        numel = sum(torch.Size(s).numel() for s in shapes)
        assert numel == saved_elements(plan, problem)


def test_save_output_false_saves_what_lora_saves(seed):
    inputs = make_inputs()
    shapes = saved_shapes(inputs, save_output=False)
    assert (N_TOKENS, OUT_FEATURES) not in shapes
    assert (N_TOKENS, OUT_FEATURES) in saved_shapes(inputs, save_output=True)


# --- the plan rule and the cost model -----------------------------------------------------------


def test_chooser_takes_the_saved_order_unless_told_not_to():
    for n, i, o, r in [(15, 12, 10, 4), (4096, 512, 1376, 8), (64, 4096, 4096, 16)]:
        problem = Problem(n, i, o, r)
        for pair in (Plan("sequential", "recompute_merged"), Plan("merged", "recompute_merged")):
            assert choose_dora_plan(pair, problem).dm == "saved"
            no_save = choose_dora_plan(pair, problem, save_output=False)
            assert no_save.dm == ("gradient" if n > i else "recompute")
            assert no_save.saved_bytes == 4 * (n * i + o)
            # g goes where the pass is smaller: the (out, in) weight or the (N, out) output;
            # a merged forward's weight gives the norm
            assert no_save.scale == ("weight" if n > i else "output")
            assert no_save.norm == ("merged" if pair.forward_variant.merged else "factored")


def test_saved_order_costs_no_extra_product():
    problem = Problem(4096, 512, 1376, 8)
    pair = Plan("sequential", "recompute_merged")
    flops = {
        dm: dora_cost(DoRAPlan(pair, "factored", "output", dm), problem).flops
        for dm in ("saved", "recompute", "gradient")
    }
    base = 2 * 4096 * 512 * 1376
    assert flops["recompute"] - flops["saved"] == base
    assert flops["gradient"] - flops["saved"] == base


def test_chooser_never_picks_an_order_illegal_with_dropout():
    for pair in ALL_PAIRS:
        plan = choose_dora_plan(pair, Problem(64, 512, 256, 8, dropout=True))
        plan.check_dropout(True)
        assert plan.dm != "saved"


def test_plan_round_trips_through_a_dict():
    plan = choose_dora_plan(Plan("merged", "gradient_merged"), Problem(64, 32, 48, 4))
    assert DoRAPlan.from_dict(plan.to_dict()) == plan


# --- the cached ‖W‖² ----------------------------------------------------------------------------


def _count_weight_norms(monkeypatch) -> list:
    """From now on, one entry per ‖W‖² the op computes (rather than finds in its cache)."""
    calls = []
    real = dora._row_squares
    monkeypatch.setattr(dora, "_row_squares", lambda *a: calls.append(1) or real(*a))
    return calls


def test_weight_norm_is_computed_once_per_weight(monkeypatch, seed):
    inputs = make_inputs()
    calls = _count_weight_norms(monkeypatch)
    for _ in range(3):
        check_reference(inputs, seed, plan=SAMPLE_ORDERS[0])
    assert len(calls) == 1


@pytest.mark.parametrize("edit", ["in_place", "load_state_dict", "data_swap", "forget"])
def test_weight_norm_is_rebuilt_when_the_weight_changes(edit, seed):
    linear = nn.Linear(IN_FEATURES, OUT_FEATURES, dtype=torch.float64).requires_grad_(False)
    inputs = make_inputs()
    inputs.weight = linear.weight
    check_reference(inputs, seed, plan=SAMPLE_ORDERS[0])
    new = torch.randn(OUT_FEATURES, IN_FEATURES, dtype=torch.float64)
    if edit == "in_place":
        with torch.no_grad():
            linear.weight.mul_(-2.0)
    elif edit == "load_state_dict":
        linear.load_state_dict({"weight": new, "bias": linear.bias})
    elif edit == "data_swap":  # PEFT's merge/unmerge
        linear.weight.data = new
    else:
        linear.weight.data += new  # bypasses the version counter ...
        dora.forget_weight_norms(linear.weight)  # ... so the cache is told
    for plan in SAMPLE_ORDERS:
        check_reference(inputs, seed, plan=plan)
    check_reference(inputs, seed, plan=SAMPLE_DROPOUT_ORDERS[0], dropout=DROPOUT)


def test_weight_norm_of_a_view_is_cached_on_its_base(monkeypatch, seed):
    """A Conv1D's Wᵀ is a new view each call; the cache still hits, and slices of one fused
    weight each get their own entry."""
    fused = torch.randn(3 * OUT_FEATURES, IN_FEATURES, dtype=torch.float64)
    inputs = make_inputs()
    calls = _count_weight_norms(monkeypatch)
    for _ in range(2):
        for k in range(3):
            inputs.weight = fused[k * OUT_FEATURES : (k + 1) * OUT_FEATURES]
            check_reference(inputs, seed, plan=SAMPLE_ORDERS[0])
    assert len(calls) == 3


def test_cache_goes_with_the_weight():
    weight = torch.randn(OUT_FEATURES, IN_FEATURES)
    a, b = torch.randn(RANK, IN_FEATURES), torch.randn(OUT_FEATURES, RANK)
    before = len(dora._squared_norms)
    dora.weight_norms(weight, a, b, 1.0)
    assert len(dora._squared_norms) == before + 1
    del weight
    assert len(dora._squared_norms) == before


def test_weight_norms_in_low_precision_accumulate_in_fp32():
    inputs = make_inputs(dtype=torch.bfloat16)
    n = dora.weight_norms(inputs.weight, inputs.lora_a, inputs.lora_b, SCALING)
    assert n.dtype == torch.float32
    exact = inputs.norm()
    # closer than one bf16 rounding of the norm (PEFT rounds its norm to bf16)
    assert ((n.double() - exact).abs() / exact).max() < 2.0**-9


# --- bad input ---------------------------------------------------------------------------------


def _args(**overrides):
    inputs = make_inputs(dtype=torch.float32)
    args = dict(
        zip(["x", "weight", "lora_A", "lora_B", "magnitude", "bias"], inputs.args(), strict=True)
    )
    args.update(overrides)
    return args


BAD_INPUTS = [
    (
        {"magnitude": torch.ones(OUT_FEATURES + 1)},
        ValueError,
        r"magnitude must have shape \(out,\)",
    ),
    ({"magnitude": torch.ones(1, OUT_FEATURES)}, ValueError, "magnitude must have shape"),
    (
        {"magnitude": torch.ones(OUT_FEATURES, dtype=torch.float64)},
        TypeError,
        "magnitude is torch.float64",
    ),
    ({"magnitude": torch.ones(OUT_FEATURES, device="meta")}, ValueError, "magnitude is on meta"),
    ({"magnitude": [1.0] * OUT_FEATURES}, TypeError, "magnitude must be a torch.Tensor"),
    ({"lora_B": torch.ones(OUT_FEATURES, RANK + 1)}, ValueError, "lora_B must have shape"),
    (
        {"weight": torch.ones(OUT_FEATURES, IN_FEATURES, requires_grad=True)},
        ValueError,
        "weight requires grad",
    ),
]


@pytest.mark.parametrize(("overrides", "exc", "match"), BAD_INPUTS)
def test_bad_input_raises_before_any_work(overrides, exc, match):
    args = _args(**overrides)
    assert_raises_before_any_work(exc, match, lambda: dora_linear(**args, plan=SAMPLE_ORDERS[0]))


BAD_PLANS = [
    (lambda: DoRAPlan(Plan("sequential", "recompute_split"), norm="merged"), "norm='merged'"),
    (lambda: DoRAPlan(Plan("merged", "recompute_split"), scale="weight", dm="saved"), "dm='saved'"),
    (lambda: DoRAPlan(Plan("merged", "recompute_split"), norm="row"), "unknown DoRA norm order"),
    (lambda: DoRAPlan(Plan("merged", "recompute_split"), dm="keep"), "unknown DoRA dm order"),
]


@pytest.mark.parametrize(("make", "match"), BAD_PLANS)
def test_bad_plans_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "plan", [SAMPLE_ORDERS[0], SAMPLE_ORDERS[2], SAMPLE_ORDERS[3]], ids=_order_id
)
def test_orders_that_need_no_dropout_are_refused_with_dropout(plan):
    args = _args()
    assert_raises_before_any_work(
        ValueError,
        "not available with dropout in training",
        lambda: dora_linear(**args, plan=plan, dropout=DROPOUT),
    )
    with torch.no_grad():
        dora_linear(**args, plan=plan, dropout=DROPOUT, training=False)  # eval is fine


# --- a quantized base ---------------------------------------------------------------------------


class FakeQuant:
    """The ``quant=`` interface of ``runlora.layers.quant.QuantizedWeight`` over a plain weight:
    ``dequantize`` hands out a fresh copy each call (counted), as bitsandbytes' does."""

    def __init__(self, weight: Tensor) -> None:
        self.weight, self.shape, self.calls = weight, tuple(weight.shape), 0

    def dequantize(self, dtype=None) -> Tensor:
        self.calls += 1
        return self.weight.to(dtype).clone()

    def check(self, x, lora_a, lora_b, bias) -> None:
        function.check_args(x, self.weight.to(x.dtype), lora_a, lora_b, bias, 1.0, 0.0)


@pytest.mark.parametrize("plan", SAMPLE_ORDERS + SAMPLE_DROPOUT_ORDERS, ids=_order_id)
def test_quantized_base_dequantizes_once_each_way(plan, seed):
    p = DROPOUT if plan in SAMPLE_DROPOUT_ORDERS else 0.0
    inputs = make_inputs()
    quant = FakeQuant(inputs.weight)
    x, _, a, b, m, bias = inputs.args()
    torch.manual_seed(seed)
    y = dora_linear(x, None, a, b, m, bias, scaling=SCALING, plan=plan, dropout=p, quant=quant)
    assert quant.calls == 1
    dy = torch.randn_like(y)
    ours = _grads(y, inputs.leaves(), dy)
    assert quant.calls == 2
    torch.manual_seed(seed)
    y_ref = inputs.run(plan=plan, dropout=p)
    torch.testing.assert_close(y, y_ref, rtol=1e-13, atol=1e-13)
    for name, grad in _grads(y_ref, inputs.leaves(), dy).items():
        torch.testing.assert_close(ours[name], grad, rtol=1e-13, atol=1e-13, msg=name)
    # the cached ‖W‖² follows the quantized parameter, not its fresh copies
    quant.weight.mul_(-2.0)
    with torch.no_grad():
        y = dora_linear(x, None, a, b, m, bias, scaling=SCALING, plan=plan, quant=quant)
        y_ref = reference_dora(*inputs.args(), SCALING)
    torch.testing.assert_close(y, y_ref, rtol=1e-13, atol=1e-13)


def test_autocast_runs_in_the_autocast_dtype(seed):
    """As F.linear would: the inputs are cast to bf16, gradients reach them in their own dtype."""
    inputs = make_inputs(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = inputs.run(plan=SAMPLE_ORDERS[0])
    assert y.dtype == torch.bfloat16
    dy = torch.randn_like(y)
    grads = _grads(y, inputs.leaves(), dy)
    low = inputs.converted(torch.bfloat16)
    expected = _grads(low.run(plan=SAMPLE_ORDERS[0]), low.leaves(), dy)
    for name, grad in grads.items():
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, expected[name].float(), msg=name)
