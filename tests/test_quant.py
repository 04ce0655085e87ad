"""runlora on bitsandbytes 4-bit and 8-bit base weights (QLoRA), against PEFT's own QLoRA layers
on the very same quantized base: every computation order, PEFT's bnb LoRA layers switched to
runlora's op (``from_peft``, ``get_runlora_model``), the quantized storage left untouched,
nothing but x saved for backward, and a tiny quantized Llama that trains."""

from __future__ import annotations

import functools
import itertools
import subprocess
import sys
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import runlora.ops.function as op_module
from runlora import BACKWARD_VARIANTS, FORWARD_VARIANTS, Plan, RunLoRALinear, lora_linear
from runlora.layers.quant import quant_provider, quantize_model, require_bitsandbytes
from runlora.ops.variants import Problem
from runlora.planning.planner import plan_for
from runlora.planning.scoring import candidates, pair_cost

try:
    import bitsandbytes as bnb
except ImportError:  # the optional extra is not installed
    bnb = None

needs_bnb = pytest.mark.skipif(
    bnb is None, reason="bitsandbytes is not installed (pip install 'runlora[quant]')"
)

IN_FEATURES = 128  # a multiple of bitsandbytes' 4-bit block (64)
OUT_FEATURES = 96
RANK = 8
ALPHA = 16
SCALING = ALPHA / RANK
X_SHAPE = (2, 5, IN_FEATURES)
#: rounding stages allowed between the fp64 reference and an implementation, in eps · bound.
ERROR_SLACK = 8.0
ALL_PAIRS = list(itertools.product(FORWARD_VARIANTS, BACKWARD_VARIANTS))


@dataclass(frozen=True)
class Quant:
    """One bitsandbytes configuration of the base layer."""

    bits: int
    quant_type: str = "nf4"
    double_quant: bool = False

    def __str__(self) -> str:
        if self.bits == 8:
            return "int8"
        return f"{self.quant_type}{'-dq' if self.double_quant else ''}"


QUANTS = (
    Quant(4, "nf4", False),
    Quant(4, "nf4", True),
    Quant(4, "fp4", False),
    Quant(4, "fp4", True),
    Quant(8),
)
DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def _int8_matmul_error() -> str | None:
    """Why bitsandbytes' own 8-bit layer cannot run forward + backward on CPU, or None."""
    try:
        layer = quantize_model(nn.Sequential(nn.Linear(64, 32)), 8)[0]
        x = torch.randn(4, 64, requires_grad=True)
        layer(x).sum().backward()
    except Exception as err:  # any failure means: no reference to compare against
        return f"{type(err).__name__}: {err}"
    return None


def _skip_without_int8_matmul(quant: Quant) -> None:
    if quant.bits == 8 and _int8_matmul_error() is not None:
        pytest.skip(
            f"bitsandbytes' 8-bit matmul does not run on this CPU ({_int8_matmul_error()})"
            "; 8-bit dequantization is still tested"
        )


def _base(quant: Quant, dtype: torch.dtype, *, compute_dtype="same", bias=True) -> nn.Module:
    """A one-layer model whose ``proj`` is quantized as ``quant`` from ``dtype`` weights."""
    model = nn.Sequential(OrderedDict(proj=nn.Linear(IN_FEATURES, OUT_FEATURES, bias=bias)))
    model.to(dtype)
    return quantize_model(
        model,
        quant.bits,
        dtype if compute_dtype == "same" else compute_dtype,
        quant_type=quant.quant_type,
        double_quant=quant.double_quant,
    )


def _peft_layer(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """PEFT's bnb LoRA layer on ``model.proj``, random A and B (B non-zero), in ``dtype``."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=["proj"], init_lora_weights=False
    )
    layer = peft.get_peft_model(model, config).base_model.model.proj
    assert type(layer).__module__ == "peft.tuners.lora.bnb", type(layer)
    layer.lora_A.default.to(dtype)
    layer.lora_B.default.to(dtype)
    return layer


def _accelerated(peft_layer: nn.Module) -> nn.Module:
    """``peft_layer`` switched in place to runlora's op, checked to still be PEFT's bnb layer."""
    from runlora import from_peft
    from runlora.integrations.peft import is_accelerated

    bnb_class = type(peft_layer)
    assert from_peft(peft_layer) is peft_layer
    assert is_accelerated(peft_layer) and isinstance(peft_layer, bnb_class), type(peft_layer)
    return peft_layer


def _abs_bound_check(
    name: str, actual: Tensor, expected: Tensor, bound: Tensor, dtype: torch.dtype
) -> None:
    """``|actual - expected| <= ERROR_SLACK · eps(dtype) · bound`` elementwise (see conftest)."""
    info = torch.finfo(dtype)
    err = (actual.detach().double() - expected.detach().double()).abs()
    tol = ERROR_SLACK * info.eps * bound + info.tiny
    worst = (err / tol).max().item()
    assert worst <= 1.0, (
        f"{name} ({dtype}) is off the fp64 reference by {worst:.3g}x the "
        f"tolerance (max abs error {err.max().item():.3g})"
    )


class Reference:
    """The fp64 LoRA on the dequantized weight, and its per-element rounding bound (the same
    computation on absolute values), for one x, A, B, bias and dY."""

    def __init__(
        self, w: Tensor, x: Tensor, a: Tensor, b: Tensor, bias: Tensor | None, dy: Tensor
    ) -> None:
        def run(absolute: bool):
            def leaf(t):
                t = t.detach().double()
                return (t.abs() if absolute else t).requires_grad_(True)

            xs, as_, bs = leaf(x), leaf(a), leaf(b)
            ws = w.double().abs() if absolute else w.double()
            bias_s = None if bias is None else leaf(bias).detach()
            y = F.linear(xs, ws, bias_s) + SCALING * F.linear(F.linear(xs, as_), bs)
            grads = torch.autograd.grad(y, (xs, as_, bs), dy.double().abs() if absolute else dy)
            return y.detach(), grads

        self.y, self.grads = run(False)
        self.y_bound, self.grad_bounds = run(True)

    def check(self, y: Tensor, grads, dtype: torch.dtype, who: str) -> None:
        _abs_bound_check(f"{who} Y", y, self.y, self.y_bound, dtype)
        for name, g, g_ref, bound in zip(
            ("dx", "dA", "dB"), grads, self.grads, self.grad_bounds, strict=True
        ):
            _abs_bound_check(f"{who} {name}", g, g_ref, bound, dtype)


def _inputs(dtype: torch.dtype, layer: nn.Module):
    x = torch.randn(X_SHAPE, dtype=dtype, requires_grad=True)
    dy = torch.randn(*X_SHAPE[:-1], OUT_FEATURES, dtype=dtype)
    a, b = layer.lora_A.default.weight, layer.lora_B.default.weight
    return x, dy, a, b


# --- the op ---------------------------------------------------------------------------------


@needs_bnb
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant", QUANTS, ids=str)
def test_every_pair_matches_peft_qlora(quant, dtype):
    _skip_without_int8_matmul(quant)
    peft_layer = _peft_layer(_base(quant, dtype), dtype)
    peft_layer.train()
    provider = quant_provider(peft_layer.base_layer)
    bias = peft_layer.base_layer.bias
    x, dy, a, b = _inputs(dtype, peft_layer)
    ref = Reference(provider.dequantize(torch.float32), x, a, b, bias, dy)

    y = peft_layer(x)
    ref.check(y, torch.autograd.grad(y, (x, a, b), dy), dtype, "PEFT")
    for forward, backward in ALL_PAIRS:
        y = lora_linear(
            x,
            provider.weight,
            a,
            b,
            bias,
            scaling=SCALING,
            plan=(forward, backward),
            quant=provider,
        )
        assert y.dtype == dtype and y.shape == dy.shape
        ref.check(y, torch.autograd.grad(y, (x, a, b), dy), dtype, f"{forward}/{backward}")


@needs_bnb
@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, None], ids=str)
def test_compute_dtype_other_than_the_activations(compute_dtype):
    """bitsandbytes computes the base GEMM in its compute dtype; runlora in x's dtype, which is
    the more precise of the two here: both stay within the bf16 bound of the fp32 truth."""
    # No bias: bitsandbytes' forward casts the bias's storage to its compute dtype in place.
    base = _base(QUANTS[1], torch.float32, compute_dtype=compute_dtype, bias=False)
    peft_layer = _peft_layer(base, torch.float32)
    provider = quant_provider(peft_layer.base_layer)
    x, dy, a, b = _inputs(torch.float32, peft_layer)
    ref = Reference(provider.dequantize(torch.float32), x, a, b, peft_layer.base_layer.bias, dy)
    y = peft_layer(x)
    ref.check(y, torch.autograd.grad(y, (x, a, b), dy), torch.bfloat16, "PEFT")
    y = lora_linear(
        x, provider.weight, a, b, peft_layer.base_layer.bias, scaling=SCALING, quant=provider
    )
    ref.check(y, torch.autograd.grad(y, (x, a, b), dy), torch.float32, "runlora")


@needs_bnb
@pytest.mark.parametrize("quant", QUANTS, ids=str)
def test_dequantize_matches_peft(quant):
    from peft.utils.integrations import dequantize_bnb_weight

    layer = _base(quant, torch.float32).proj
    weight_before = layer.weight.data.clone()
    state = getattr(layer, "state", None)
    expected = dequantize_bnb_weight(layer.weight, state).float()
    w = quant_provider(layer).dequantize(torch.float32)
    assert w.shape == (OUT_FEATURES, IN_FEATURES) and w.dtype == torch.float32
    torch.testing.assert_close(w, expected, rtol=2e-7, atol=0.0)
    assert w.data_ptr() != layer.weight.data_ptr()
    assert torch.equal(layer.weight.data, weight_before)
    bf16 = quant_provider(layer).dequantize(torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.float(), expected, rtol=2**-8, atol=0.0)


@needs_bnb
@pytest.mark.parametrize("quant", QUANTS, ids=str)
def test_saved_for_backward_is_x_only_and_no_dequantized_weight_outlives_its_use(quant):
    layer = _base(quant, torch.float32).proj
    provider = quant_provider(layer)
    a = torch.randn(RANK, IN_FEATURES, requires_grad=True)
    b = torch.randn(OUT_FEATURES, RANK, requires_grad=True)
    params = {t.untyped_storage().data_ptr() for t in (layer.weight, layer.bias, a, b)}
    issued: list[weakref.ref] = []
    dequantize = provider.dequantize

    def tracked(dtype=None):
        w = dequantize(dtype)
        issued.append(weakref.ref(w))
        return w

    provider.dequantize = tracked
    for forward, backward in ALL_PAIRS:
        issued.clear()
        x = torch.randn(X_SHAPE, requires_grad=True)
        saved: dict[int, int] = {}  # storage -> bytes, each storage once, parameters left out
        with torch.autograd.graph.saved_tensors_hooks(_recorder(saved, params), lambda t: t):
            y = lora_linear(
                x,
                provider.weight,
                a,
                b,
                layer.bias,
                scaling=SCALING,
                plan=(forward, backward),
                quant=provider,
            )
        # Refcounting frees a buffer nothing holds at once, so no gc.collect() is needed (and one
        # that were needed would mean a reference cycle keeping W alive: a failure too).
        assert len(issued) == 1 and issued[0]() is None, (
            f"{forward}/{backward}: the dequantized weight is alive between forward and backward"
        )
        assert sum(saved.values()) == x.untyped_storage().nbytes(), (
            f"{forward}/{backward} saved {sum(saved.values())} bytes besides the parameters; "
            f"x alone is {x.untyped_storage().nbytes()}"
        )
        y.sum().backward()
        assert len(issued) == 2, f"{forward}/{backward}: backward must dequantize once for dX"

    issued.clear()
    x = torch.randn(X_SHAPE)  # no dX needed: backward never touches W
    lora_linear(
        x, provider.weight, a, b, layer.bias, scaling=SCALING, quant=provider
    ).sum().backward()
    assert len(issued) == 1


@needs_bnb
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_weight_repacked_for_cpu_inference_still_dequantizes(double_quant):
    pack = getattr(bnb.functional, "_convert_weight_packed_for_cpu", None)
    if pack is None:
        pytest.skip("this bitsandbytes has no CPU inference repacking")
    layer = _base(Quant(4, "nf4", double_quant), torch.float32).proj
    provider = quant_provider(layer)
    expected = provider.dequantize()
    # What Linear4bit.forward does to itself in eval mode without grad on an AVX512-BF16 CPU.
    layer.weight.data, layer.weight.quant_state = pack(layer.weight.data, layer.weight.quant_state)
    before = [layer.weight.data.clone(), layer.weight.quant_state.absmax.clone()]
    w = provider.dequantize(torch.float32)
    assert provider.dtype == torch.float32
    torch.testing.assert_close(w, expected, rtol=2**-8, atol=0)  # block scales now in bf16
    assert torch.equal(before[0], layer.weight.data)
    assert torch.equal(before[1], layer.weight.quant_state.absmax)
    assert layer.weight.quant_state.packing_format_for_cpu


def _recorder(saved: dict[int, int], params: set[int]):
    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    return pack


def _quant_storage(layer: nn.Module) -> list[Tensor]:
    """Every tensor that makes up a bnb layer's quantized weight, cloned."""
    tensors = [layer.weight.data]
    state = getattr(layer.weight, "quant_state", None)
    if state is not None:
        tensors += [state.absmax, state.code]
        if state.nested:
            tensors += [state.state2.absmax, state.state2.code, state.offset]
    else:
        tensors.append(layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB)
    return [t.clone() for t in tensors]


@needs_bnb
@pytest.mark.parametrize("host", ["peft", "runlora_linear"])
@pytest.mark.parametrize("quant", QUANTS, ids=str)
def test_quantized_storage_is_bit_identical_after_training(quant, host):
    base = _base(quant, torch.float32)
    if host == "peft":
        layer = _accelerated(_peft_layer(base, torch.float32))
    else:
        layer = RunLoRALinear(base.proj, r=RANK, lora_alpha=ALPHA, init_lora_weights=False)
    before = _quant_storage(layer.base_layer)
    a0 = layer.lora_A.default.weight.detach().clone()
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    merged = [b for b in BACKWARD_VARIANTS if BACKWARD_VARIANTS[b].merged][:2]
    for forward, backward in zip(FORWARD_VARIANTS, itertools.cycle(merged)):
        layer.plan = Plan(forward, backward)
        x = torch.randn(X_SHAPE, requires_grad=True)
        layer(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    after = _quant_storage(layer.base_layer)
    assert all(torch.equal(u, v) for u, v in zip(before, after, strict=True))
    assert not torch.equal(layer.lora_A.default.weight, a0)


@needs_bnb
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant", QUANTS, ids=str)
def test_runlora_linear_on_a_quantized_base_matches_peft(quant, dtype):
    _skip_without_int8_matmul(quant)
    peft_layer = _peft_layer(_base(quant, dtype), dtype)
    layer = RunLoRALinear(peft_layer.base_layer, r=RANK, lora_alpha=ALPHA)
    assert layer.lora_A.default.weight.dtype == dtype
    with torch.no_grad():
        layer.lora_A.default.weight.copy_(peft_layer.lora_A.default.weight)
        layer.lora_B.default.weight.copy_(peft_layer.lora_B.default.weight)
    x, dy, _, _ = _inputs(dtype, peft_layer)
    ref = Reference(
        quant_provider(peft_layer.base_layer).dequantize(torch.float32),
        x,
        layer.lora_A.default.weight,
        layer.lora_B.default.weight,
        peft_layer.base_layer.bias,
        dy,
    )
    for module in (peft_layer, layer):
        a, b = module.lora_A.default.weight, module.lora_B.default.weight
        y = module(x)
        ref.check(y, torch.autograd.grad(y, (x, a, b), dy), dtype, type(module).__name__)
    with pytest.raises(NotImplementedError, match="quantized"):
        layer.merge()


@needs_bnb
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant", QUANTS, ids=str)
def test_peft_bnb_layer_runs_runlora_and_matches_peft(quant, dtype, monkeypatch):
    """PEFT's own ``Linear4bit``/``Linear8bitLt`` LoRA layer, switched by ``from_peft``: its
    forward is runlora's op (once per call, every order through ``layer.plan``), within the
    rounding bound of the fp64 truth, as PEFT's forward on the same layer is."""
    _skip_without_int8_matmul(quant)
    layer = _peft_layer(_base(quant, dtype), dtype).train()
    x, dy, a, b = _inputs(dtype, layer)
    ref = Reference(
        quant_provider(layer.base_layer).dequantize(torch.float32),
        x,
        a,
        b,
        layer.base_layer.bias,
        dy,
    )
    y_peft = layer(x)
    ref.check(y_peft, torch.autograd.grad(y_peft, (x, a, b), dy), dtype, "PEFT")
    _accelerated(layer)
    import runlora.layers.layer

    calls = []
    monkeypatch.setattr(
        runlora.layers.layer, "lora_linear", _counting(calls, runlora.layers.layer.lora_linear)
    )
    for plan in [None, *ALL_PAIRS]:
        layer.plan = None if plan is None else Plan(*plan)
        calls.clear()
        y = layer(x)
        assert len(calls) == 1 and y.dtype == dtype and y.shape == dy.shape, plan
        ref.check(y, torch.autograd.grad(y, (x, a, b), dy), dtype, f"runlora in PEFT {plan}")
    with torch.no_grad():  # eval, no grad: still the op (no bnb CPU inference repacking)
        layer.eval()
        layer.plan = None
        calls.clear()
        y = layer(x)
        assert len(calls) == 1
        _abs_bound_check("eval Y", y, ref.y, ref.y_bound, dtype)


# --- errors, planner, conversion ------------------------------------------------------------


def test_missing_bitsandbytes_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(ImportError, match=r"pip install 'runlora\[quant\]'"):
        require_bitsandbytes()
    with pytest.raises(ImportError, match=r"pip install 'runlora\[quant\]'"):
        quantize_model(nn.Sequential(nn.Linear(8, 8)), 4)
    assert quant_provider(nn.Linear(8, 8)) is None  # plain layers never need bitsandbytes


#: Run in a fresh interpreter where ``import bitsandbytes`` fails (a meta-path blocker), as on
#: a machine without the optional extra.
_WITHOUT_BNB = """
import sys

class NoBitsandbytes:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "bitsandbytes":
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)")
        return None

sys.meta_path.insert(0, NoBitsandbytes())
try:
    import bitsandbytes
except ImportError:
    pass
else:
    raise SystemExit("the blocker let bitsandbytes in")

import torch
import runlora
import runlora.integrations.distributed
import runlora.integrations.peft
from runlora.layers import layer, quant

assert "bitsandbytes" not in sys.modules, "importing runlora imported bitsandbytes"
assert (quant.is_quantized_base, quant.base_handler) in layer._BASE_KINDS
lin = torch.nn.Linear(8, 4)
assert layer.base_args_fn(lin) is layer._dense_args and not quant.is_quantized_base(lin)
wrapped = runlora.RunLoRALinear(lin, 2, init_lora_weights=False)
x = torch.randn(3, 8)
want = lin(x) + x @ wrapped.delta_weight().t()
torch.testing.assert_close(wrapped(x), want)
try:
    quant.require_bitsandbytes()
except ImportError as err:
    assert "pip install 'runlora[quant]'" in str(err), err
else:
    raise SystemExit("require_bitsandbytes found the blocked bitsandbytes")
print("ok")
"""


def test_runlora_imports_and_runs_without_bitsandbytes():
    """The layers package (and runlora with it) imports without bitsandbytes, registers the
    quantized kind anyway, and runs dense layers; only asking for a quantized base needs it."""
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_BNB], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr


@needs_bnb
@pytest.mark.parametrize("quant", (QUANTS[0], QUANTS[-1]), ids=str)
def test_bitsandbytes_layers_are_a_registered_base_kind(quant):
    """Importing runlora registers bitsandbytes' layers ahead of the dense kind (they subclass
    nn.Linear): a wrapped quantized layer reads its base through the quantized handler."""
    from runlora.layers.layer import base_args_fn, is_supported_base
    from runlora.layers.quant import base_handler

    proj = _base(quant, torch.float32).proj
    assert isinstance(proj, nn.Linear) and is_supported_base(proj)
    assert base_args_fn(proj) is base_handler
    layer = RunLoRALinear(proj, RANK, ALPHA, init_lora_weights=False)
    _, _, provider = layer.base_weight_args()
    assert provider is not None and provider.bits == quant.bits
    assert (layer.out_features, layer.in_features) == (OUT_FEATURES, IN_FEATURES)


@needs_bnb
def test_unquantized_or_trainable_bnb_layers_are_refused():
    with pytest.raises(ValueError, match="not quantized yet"):
        quant_provider(bnb.nn.Linear4bit(64, 32, device="meta"))
    with pytest.raises(ValueError, match="has_fp16_weights=False"):
        quant_provider(bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=True))
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        quantize_model(nn.Sequential(nn.Linear(8, 8)), 3)


@needs_bnb
def test_op_checks_use_the_quantized_shape():
    provider = quant_provider(_base(QUANTS[0], torch.float32).proj)
    assert provider.shape == (OUT_FEATURES, IN_FEATURES)
    a, b = torch.randn(RANK, IN_FEATURES), torch.randn(OUT_FEATURES, RANK)
    with pytest.raises(ValueError, match="x must have shape"):
        lora_linear(torch.randn(3, IN_FEATURES + 1), provider.weight, a, b, quant=provider)
    with pytest.raises(TypeError, match="one floating dtype"):
        lora_linear(
            torch.randn(3, IN_FEATURES, dtype=torch.bfloat16), provider.weight, a, b, quant=provider
        )


def test_planner_counts_one_dequantization_per_use_of_w():
    n, i, o, r = 4096, 1024, 2736, 8
    for needs_x in (True, False):
        plain = Problem(n, i, o, r, needs_input_grad=needs_x)
        quantized = Problem(n, i, o, r, needs_input_grad=needs_x, quantized=True)
        for fwd, bwd in candidates(plain):
            base, q = pair_cost(fwd, bwd, plain), pair_cost(fwd, bwd, quantized)
            passes = [p for p in q.products if p.label == "dequantize W"]
            assert len(passes) == (2 if needs_x else 1), (fwd.name, bwd.name)
            assert q.flops == base.flops
            assert q.bytes() - base.bytes() == 4 * sum(p.elements for p in passes)
    plan = plan_for(n, i, o, r, quantized=True)
    assert plan.flops == plan_for(n, i, o, r).flops


@needs_bnb
def test_planner_cost_counts_what_the_quantized_op_runs():
    from torch.utils.flop_counter import FlopCounterMode

    provider = quant_provider(_base(QUANTS[0], torch.float32).proj)
    a = torch.randn(RANK, IN_FEATURES, requires_grad=True)
    b = torch.randn(OUT_FEATURES, RANK, requires_grad=True)
    x_grad = True  # the case that dequantizes twice (without dX, backward never needs W)
    for forward, backward in ALL_PAIRS:
        x = torch.randn(X_SHAPE, requires_grad=x_grad)
        with FlopCounterMode(display=False) as counter:
            lora_linear(
                x, provider.weight, a, b, plan=(forward, backward), quant=provider
            ).sum().backward()
        problem = Problem(
            x.numel() // IN_FEATURES,
            IN_FEATURES,
            OUT_FEATURES,
            RANK,
            needs_input_grad=x_grad,
            quantized=True,
        )
        cost = pair_cost(FORWARD_VARIANTS[forward], BACKWARD_VARIANTS[backward], problem)
        assert cost.flops == counter.get_total_flops(), (forward, backward)


@needs_bnb
@pytest.mark.parametrize("quant", [QUANTS[1], QUANTS[2], QUANTS[4]], ids=str)
def test_quantize_model_matches_transformers_bitsandbytes_loading(quant, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = _tiny_llama(transformers)
    model.save_pretrained(tmp_path)
    if quant.bits == 4:
        config = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.quant_type,
            bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_compute_dtype=torch.float32,
        )
    else:
        config = transformers.BitsAndBytesConfig(load_in_8bit=True)
    loaded = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path, quantization_config=config, device_map="cpu", dtype=torch.float32
    )
    ours = quantize_model(
        model,
        quant.bits,
        torch.float32,
        quant_type=quant.quant_type,
        double_quant=quant.double_quant,
    )
    assert getattr(ours, f"is_loaded_in_{quant.bits}bit")
    theirs = dict(loaded.named_modules())
    converted = 0
    for name, module in ours.named_modules():
        provider = quant_provider(module)
        assert type(theirs[name]) is type(module), name
        if provider is not None:
            converted += 1
            assert torch.equal(provider.dequantize(), quant_provider(theirs[name]).dequantize())
    assert converted == 7 * 2 and type(ours.lm_head) is nn.Linear


# --- models ---------------------------------------------------------------------------------

MODEL_QUANTS = (Quant(4, "nf4", True), Quant(8))
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _bnb_config(transformers, quant: Quant):
    if quant.bits == 8:
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=torch.float32,
    )


def _batch(seed: int = 0) -> dict:
    ids = torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def _lora_grads(model) -> dict[str, Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if "lora_" in n}


@needs_bnb
@pytest.mark.parametrize("quant", MODEL_QUANTS, ids=str)
def test_get_runlora_model_on_a_bitsandbytes_loaded_llama_matches_peft(quant, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from peft.tuners.lora import bnb as peft_bnb

    from runlora import LoraConfig, get_runlora_model
    from runlora.integrations.peft import is_accelerated

    _skip_without_int8_matmul(quant)
    _tiny_llama(transformers).save_pretrained(tmp_path)

    def load():
        return transformers.LlamaForCausalLM.from_pretrained(
            tmp_path,
            quantization_config=_bnb_config(transformers, quant),
            device_map="cpu",
            dtype=torch.float32,
        )

    kwargs = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    reference = peft.get_peft_model(load(), peft.LoraConfig(**kwargs))
    ours = get_runlora_model(load(), LoraConfig(**kwargs))
    assert isinstance(ours, peft.PeftModel)
    lora_state = {k: v for k, v in reference.state_dict().items() if "lora_" in k}
    assert not ours.load_state_dict(lora_state, strict=False).unexpected_keys
    layers = _lora_layers(ours)
    assert len(layers) == 3 * 2
    assert all(quant_provider(m.base_layer) is not None for m in layers.values())
    bnb_class = peft_bnb.Linear8bitLt if quant.bits == 8 else peft_bnb.Linear4bit
    assert all(is_accelerated(m) and isinstance(m, bnb_class) for m in layers.values())

    losses = []
    for model in (reference, ours):
        model.train()  # bnb's 8-bit CPU layer dequantizes (as runlora does) in training mode
        loss = model(**_batch()).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)
    theirs, mine = _lora_grads(reference), _lora_grads(ours)
    assert theirs.keys() == mine.keys() and len(mine) == 12
    for name in mine:
        torch.testing.assert_close(mine[name], theirs[name], rtol=1e-4, atol=1e-6, msg=name)


@needs_bnb
@pytest.mark.parametrize("quant", MODEL_QUANTS, ids=str)
def test_from_peft_runs_a_peft_qlora_model_on_runlora(quant, monkeypatch):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from runlora import from_peft

    _skip_without_int8_matmul(quant)

    def build():
        model = quantize_model(
            _tiny_llama(transformers),
            quant.bits,
            torch.float32,
            quant_type=quant.quant_type,
            double_quant=quant.double_quant,
        )
        torch.manual_seed(1)
        return peft.get_peft_model(
            model,
            peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False),
        ).train()

    reference, model = build(), build()
    a_tensor = next(p for n, p in model.named_parameters() if "lora_A" in n)
    assert from_peft(model) is model
    assert next(p for n, p in model.named_parameters() if "lora_A" in n) is a_tensor
    calls = []
    monkeypatch.setattr(
        op_module._LoRAFunction, "apply", _counting(calls, op_module._LoRAFunction.apply)
    )
    losses = []
    for m in (reference, model):
        loss = m(**_batch()).loss
        loss.backward()
        losses.append(loss.detach())
    assert len(calls) == 3 * 2  # every adapted layer ran runlora's op, none PEFT's forward
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)
    theirs, mine = _lora_grads(reference), _lora_grads(model)
    assert theirs.keys() == mine.keys() and len(mine) == 12
    for name in mine:
        torch.testing.assert_close(mine[name], theirs[name], rtol=1e-4, atol=1e-6, msg=name)


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """PEFT's LoRA layers of ``model`` by name (accelerated or not)."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def _counting(calls: list, fn):
    def wrapper(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    return wrapper


@needs_bnb
@pytest.mark.parametrize("quant", MODEL_QUANTS, ids=str)
def test_quantized_llama_trains_and_its_adapter_loads_in_peft(quant, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    import runlora
    from runlora import LoraConfig, get_runlora_model
    from runlora.integrations.peft import is_accelerated

    _skip_without_int8_matmul(quant)

    def build():
        return quantize_model(
            _tiny_llama(transformers),
            quant.bits,
            torch.float32,
            quant_type=quant.quant_type,
            double_quant=quant.double_quant,
        )

    model = get_runlora_model(build(), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    layers = _lora_layers(model)
    assert len(layers) == 7 * 2 and all(is_accelerated(m) for m in layers.values())
    storage = {n: _quant_storage(m.base_layer) for n, m in layers.items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    batch, losses = _batch(), []
    for _ in range(6):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    for name, layer in layers.items():
        after = _quant_storage(layer.base_layer)
        assert all(torch.equal(u, v) for u, v in zip(storage[name], after, strict=True)), name

    model.save_pretrained(tmp_path)  # PEFT's own save
    with torch.no_grad():
        trained = model(**batch).loss
        ours = runlora.from_pretrained(build(), tmp_path).train()
        assert all(is_accelerated(m) for m in _lora_layers(ours).values())
        theirs = peft.PeftModel.from_pretrained(build(), tmp_path).train()
        assert not any(is_accelerated(m) for m in _lora_layers(theirs).values())
        torch.testing.assert_close(ours(**batch).loss, trained, rtol=1e-6, atol=0)
        torch.testing.assert_close(theirs(**batch).loss, trained, rtol=1e-5, atol=0)


def _tiny_llama(transformers, seed: int = 0):
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).float()
