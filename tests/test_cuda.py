"""CUDA-only checks, skipped without a CUDA device (``pytest -m cuda``; ``make gpu-check`` runs
them with tests/test_function.py's CUDA tests, which cover every pair in fp32 and bf16):

- every (forward, backward) pair and layout against the fp64 reference in fp16;
- dropout: masks drawn on the device from a seed, regenerated in backward identical to the
  forward's (an identity probe reads the mask off Y and the gradients), and every split pair
  against the reference with that mask;
- QLoRA: every pair on a bitsandbytes 4-bit base (nf4/fp4, with and without double quant);
- the "time" and "roofline" criteria measuring on the device, and ``runlora bench``'s memory
  figure (``max_memory_allocated``) on a tiny model.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import runlora
import runlora.ops.function as function
import runlora.planning.measured as timing
from runlora import BACKWARD_VARIANTS, FORWARD_VARIANTS, LAYOUTS, Plan, lora_linear

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

IN_FEATURES = 12
OUT_FEATURES = 10
RANK = 4
X_SHAPE = (3, 5, IN_FEATURES)
ALL_PAIRS = list(itertools.product(FORWARD_VARIANTS, BACKWARD_VARIANTS))
SPLIT_PAIRS = [
    (f, b)
    for f, b in ALL_PAIRS
    if not FORWARD_VARIANTS[f].merged and not BACKWARD_VARIANTS[b].merged
]
DROPOUT = 0.3
PROBE_P = 0.5
PROBE_TOKENS = 64
PROBE_FEATURES = 16


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("forward", "backward"), ALL_PAIRS)
def test_every_pair_and_layout_matches_reference_in_fp16(
    forward, backward, layout, lora_inputs, check_reference
):
    plan = Plan(forward, backward, layout)
    for kwargs in ({"x_layout": "transposed"}, {"bias": None, "x_grad": False}):
        inputs = lora_inputs(
            X_SHAPE, OUT_FEATURES, RANK, dtype=torch.float16, device="cuda", **kwargs
        )
        y = check_reference(inputs, plan=plan)
        assert y.device.type == "cuda"


# --- dropout --------------------------------------------------------------------------------


def _identity_probe(plan: Plan):
    """W = 0, A = B = I, s = 1, x = 1 on CUDA in fp64: Y = keep / (1 - p) shows the forward's
    mask, and dX = dY ⊙ Y, dA = dB = dYᵀ Y hold only if backward applied that same mask."""
    eye = torch.eye(PROBE_FEATURES, dtype=torch.float64, device="cuda")
    x = torch.ones(PROBE_TOKENS, PROBE_FEATURES, dtype=torch.float64, device="cuda")
    x.requires_grad_()
    a, b = eye.clone().requires_grad_(), eye.clone().requires_grad_()
    w = torch.zeros_like(eye)
    y = lora_linear(x, w, a, b, scaling=1.0, dropout=PROBE_P, plan=plan)
    dy = torch.randn_like(y)
    y.backward(dy)
    return y.detach(), x.grad, a.grad, b.grad, dy


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("forward", "backward"), SPLIT_PAIRS)
def test_backward_regenerates_the_forwards_mask_on_cuda(forward, backward, layout):
    y, dx, da, db, dy = _identity_probe(Plan(forward, backward, layout))
    assert y.device.type == "cuda"
    assert set(y.unique().tolist()) <= {0.0, 1.0 / (1.0 - PROBE_P)}
    assert 0 < int((y == 0).sum()) < y.numel()
    torch.testing.assert_close(dx, dy * y, rtol=0, atol=1e-12)
    torch.testing.assert_close(da, dy.t() @ y)
    torch.testing.assert_close(db, dy.t() @ y)


def test_masks_on_cuda_are_dense_seeded_and_drop_p(monkeypatch):
    from runlora.ops.dropout import draw_mask

    x = torch.zeros(4096, 256, dtype=torch.bfloat16, device="cuda")
    masks = [draw_mask(x, 0.1, seed) for seed in (7, 7, 8)]
    assert all(m.keep_dense is not None and m.keep_dense.device.type == "cuda" for m in masks)
    assert torch.equal(masks[0].keep(), masks[1].keep())
    assert not torch.equal(masks[0].keep(), masks[2].keep())
    dropped = 1.0 - masks[0].keep().float().mean().item()
    assert abs(dropped - 0.1) < 5 * (0.1 * 0.9 / x.numel()) ** 0.5

    seen = []
    real = function._draw_mask

    def spy(x2d, p, seed):
        mask = real(x2d, p, seed)
        seen.append((seed, mask.keep().clone()))
        return mask

    monkeypatch.setattr(function, "_draw_mask", spy)
    xs = torch.randn(64, 32, device="cuda", requires_grad=True)
    a = torch.randn(4, 32, device="cuda", requires_grad=True)
    b = torch.randn(16, 4, device="cuda", requires_grad=True)
    w = torch.randn(16, 32, device="cuda")
    lora_linear(xs, w, a, b, dropout=DROPOUT, plan=SPLIT_PAIRS[0]).sum().backward()
    (seed_f, keep_f), (seed_b, keep_b) = seen
    assert seed_f == seed_b and torch.equal(keep_f, keep_b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("forward", "backward"), SPLIT_PAIRS)
def test_split_pairs_with_dropout_match_reference_on_cuda(
    forward, backward, dtype, lora_inputs, check_reference, seed
):
    inputs = lora_inputs(X_SHAPE, OUT_FEATURES, RANK, dtype=dtype, device="cuda")
    torch.manual_seed(seed)  # the op draws its mask seed from torch's CPU generator
    x2d = inputs.x.reshape(-1, IN_FEATURES)
    keep = function._draw_mask(x2d, DROPOUT, function._new_seed()).keep().reshape(inputs.x.shape)
    torch.manual_seed(seed)
    check_reference(inputs, keep=keep, dropout=DROPOUT, plan=Plan(forward, backward))


# --- QLoRA: a 4-bit base ----------------------------------------------------------------------

QLORA_IN, QLORA_OUT, QLORA_R, QLORA_SCALING = 128, 96, 8, 2.0
ERROR_SLACK = 8.0


def _within(name, actual, expected, bound, dtype):
    info = torch.finfo(dtype)
    err = (actual.detach().double() - expected).abs()
    worst = (err / (ERROR_SLACK * info.eps * bound + info.tiny)).max().item()
    assert worst <= 1.0, f"{name} ({dtype}): {worst:.3g}x the tolerance"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("quant_type", "double_quant"), [("nf4", False), ("nf4", True), ("fp4", True)]
)
def test_every_pair_on_a_4bit_base_on_cuda(quant_type, double_quant, dtype):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    from runlora.layers.quant import quant_provider, quantize_model

    model = nn.Sequential(OrderedDict(proj=nn.Linear(QLORA_IN, QLORA_OUT)))
    model.to(device="cuda", dtype=dtype)
    quantize_model(model, 4, dtype, quant_type=quant_type, double_quant=double_quant)
    provider = quant_provider(model.proj)
    assert provider is not None and provider.weight.device.type == "cuda"
    assert provider.weight.element_size() == 1  # packed, not a dense copy
    w = provider.dequantize(torch.float32).double()
    bias = model.proj.bias
    x = torch.randn(*X_SHAPE[:-1], QLORA_IN, device="cuda", dtype=dtype, requires_grad=True)
    a = (torch.randn(QLORA_R, QLORA_IN, device="cuda") * QLORA_IN**-0.5).to(dtype)
    b = (torch.randn(QLORA_OUT, QLORA_R, device="cuda") * QLORA_R**-0.5).to(dtype)
    a.requires_grad_()
    b.requires_grad_()
    dy = torch.randn(*X_SHAPE[:-1], QLORA_OUT, device="cuda", dtype=dtype)

    def reference(absolute: bool):
        def leaf(t):
            t = t.detach().double()
            return (t.abs() if absolute else t).requires_grad_()

        xs, as_, bs = leaf(x), leaf(a), leaf(b)
        ws = w.abs() if absolute else w
        bias_s = None if bias is None else bias.detach().double()
        bias_s = bias_s.abs() if absolute and bias_s is not None else bias_s
        y = F.linear(xs, ws, bias_s) + QLORA_SCALING * F.linear(F.linear(xs, as_), bs)
        g = dy.double().abs() if absolute else dy.double()
        return y.detach(), torch.autograd.grad(y, (xs, as_, bs), g)

    y_ref, g_ref = reference(False)
    y_bound, g_bound = reference(True)
    for forward, backward in ALL_PAIRS:
        y = lora_linear(
            x, provider.weight, a, b, bias, scaling=QLORA_SCALING, plan=(forward, backward),
            quant=provider,
        )  # fmt: skip
        assert y.dtype == dtype and y.device.type == "cuda"
        grads = torch.autograd.grad(y, (x, a, b), dy)
        who = f"{quant_type}{'-dq' if double_quant else ''} {forward}/{backward}"
        _within(f"{who} Y", y, y_ref, y_bound, dtype)
        for name, g, ref, bound in zip(("dx", "dA", "dB"), grads, g_ref, g_bound, strict=True):
            _within(f"{who} {name}", g, ref, bound, dtype)


# --- planning and bench on the device --------------------------------------------------------


def test_time_and_roofline_criteria_measure_on_cuda(monkeypatch, tmp_path):
    from runlora.planning.roofline import calibrate

    monkeypatch.setenv("RUNLORA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(timing, "TIME_BUDGET_S", 0.3)
    cal = calibrate(torch.bfloat16, "cuda", refresh=True)
    assert cal["peak_flops"] > 1e12 and cal["bandwidth"] > 1e10 and cal["overhead_s"] > 0
    for criterion in ("roofline", "time"):
        plan = runlora.plan_layer(
            8192, 2048, 2048, 16, criterion=criterion, dtype=torch.bfloat16, device="cuda"
        )
        assert plan.criterion == criterion
        if criterion == "time":
            assert plan.measured_ms is not None and plan.measured_ms > 0
        else:
            assert plan.predicted_ms is not None and plan.predicted_ms > 0


def test_bench_on_cuda_reports_max_memory_allocated():
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from runlora.bench.model_bench import BenchSettings, run_bench

    settings = BenchSettings(
        batch_size=2, seq_len=64, r=8, dtype="bf16", device="cuda", min_run_time=0.0,
        warmup_rounds=1, min_rounds=2,
    )  # fmt: skip
    (result,) = run_bench(["llama_tiny"], settings)
    arms = {a.kind: a for a in result.arms}
    assert set(arms) == {"floor", "peft", "runlora"}
    for arm in result.arms:
        assert arm.peak_kind == "cuda_max_allocated" and arm.peak_bytes > 0
        assert len(arm.times_ms) >= 2 and all(t > 0 for t in arm.times_ms)
    assert arms["runlora"].saved_bytes <= arms["peft"].saved_bytes
