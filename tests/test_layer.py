"""RunLoRALinear: no weight copy, PEFT's math on nn.Linear and Conv1D, plans per shape, merge."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import runlora.layers.layer
from runlora import Plan, RunLoRALinear

IN, OUT, R, ALPHA = 16, 24, 4, 8
#: merge then unmerge adds and subtracts s·B A once each: fp32 rounding of |W| + |s·B A|.
MERGE_ATOL = 1e-6


def reference(layer: RunLoRALinear, x: torch.Tensor) -> torch.Tensor:
    """PEFT's forward: base_layer(x) + lora_B(lora_A(x)) * scaling (no dropout)."""
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    return layer.base_layer(x) + b(a(x)) * layer.scaling["default"]


def conv1d(in_f: int, out_f: int) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    layer = transformers.pytorch_utils.Conv1D(out_f, in_f)
    nn.init.normal_(layer.bias)
    return layer


BASES = {
    "linear": lambda: nn.Linear(IN, OUT),
    "linear_nobias": lambda: nn.Linear(IN, OUT, False),
    "conv1d": lambda: conv1d(IN, OUT),
}


@pytest.mark.parametrize("kind", list(BASES))
def test_wraps_without_copy_and_matches_peft_math(kind):
    base = BASES[kind]()
    ptr = base.weight.data_ptr()
    layer = RunLoRALinear(base, R, ALPHA, init_lora_weights=False)
    assert layer.base_layer is base and layer.weight.data_ptr() == ptr
    assert not base.weight.requires_grad
    assert (layer.in_features, layer.out_features) == (IN, OUT)
    assert layer.fan_in_fan_out == (kind == "conv1d")
    x = torch.randn(3, 5, IN, requires_grad=True)
    y = layer(x)
    x2 = x.detach().clone().requires_grad_()
    y_ref = reference(layer, x2)
    torch.testing.assert_close(y, y_ref)
    dy = torch.randn_like(y)
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    grads = torch.autograd.grad(y, [x, *params], dy)
    grads_ref = torch.autograd.grad(y_ref, [x2, *params], dy)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref)


def test_trainable_bias_gets_its_gradient():
    layer = RunLoRALinear(nn.Linear(IN, OUT), R, ALPHA, init_lora_weights=False)
    layer.base_layer.bias.requires_grad_(True)
    x = torch.randn(6, IN)
    layer(x).sum().backward()
    torch.testing.assert_close(layer.base_layer.bias.grad, torch.full((OUT,), 6.0))


def test_plan_per_shape_chosen_at_first_sight(monkeypatch):
    layer = RunLoRALinear(nn.Linear(IN, OUT), R, ALPHA)
    assert "by flops at first call" in repr(layer)
    calls = []
    real = runlora.layers.layer.lookup_plan
    monkeypatch.setattr(
        runlora.layers.layer, "lookup_plan", lambda n, *a, **k: calls.append(n) or real(n, *a, **k)
    )
    layer(torch.randn(2, 3, IN))
    layer(torch.randn(700, IN))
    assert calls == [6, 700]
    text = layer.extra_repr()
    assert f"in_features={IN}, out_features={OUT}, r={R}" in text
    assert "N≤768" in text and layer._last_plan[1].forward in text


def test_pinned_plan_is_used():
    layer = RunLoRALinear(nn.Linear(IN, OUT), R, ALPHA, init_lora_weights=False)
    layer.plan = Plan("merged", "recompute_merged")
    x = torch.randn(4, IN)
    torch.testing.assert_close(layer(x), reference(layer, x))
    assert "merged/recompute_merged (fixed)" in repr(layer)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_unmerge(kind):
    layer = RunLoRALinear(BASES[kind](), R, ALPHA, init_lora_weights=False)
    w0 = layer.weight.detach().clone()
    ptr = layer.weight.data_ptr()
    x = torch.randn(5, IN)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        assert layer.merged and layer.weight.data_ptr() == ptr
        delta = layer.scaling["default"] * (
            layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        )
        torch.testing.assert_close(layer.weight, w0 + (delta.t() if kind == "conv1d" else delta))
        torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
        merged_w = layer.weight.clone()
        layer.merge()
        assert torch.equal(layer.weight, merged_w), "merge is not idempotent"
        layer.unmerge()
        assert not layer.merged
        torch.testing.assert_close(layer.weight, w0, rtol=0, atol=MERGE_ATOL)
        torch.testing.assert_close(layer(x), unmerged)


def test_disable_adapters_unmerges_and_runs_base():
    layer = RunLoRALinear(nn.Linear(IN, OUT), R, ALPHA, init_lora_weights=False)
    x = torch.randn(5, IN)
    layer.merge()
    layer.disable_adapters = True
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x))
    assert not layer.merged


def test_init_options_and_scaling():
    default = RunLoRALinear(nn.Linear(IN, OUT), R, ALPHA)
    assert torch.count_nonzero(default.lora_B["default"].weight) == 0
    assert default.scaling["default"] == ALPHA / R
    x = torch.randn(3, IN)
    torch.testing.assert_close(default(x), default.base_layer(x))
    gaussian = RunLoRALinear(nn.Linear(256, OUT), 8, init_lora_weights="gaussian")
    assert abs(gaussian.lora_A["default"].weight.std().item() - 1 / 8) < 0.02
    rs = RunLoRALinear(nn.Linear(IN, OUT), R, ALPHA, use_rslora=True, init_lora_weights=False)
    assert rs.scaling["default"] == ALPHA / math.sqrt(R)
    assert torch.count_nonzero(rs.lora_B["default"].weight) > 0


def test_dropout_only_in_training():
    layer = RunLoRALinear(nn.Linear(IN, OUT), R, ALPHA, lora_dropout=0.5, init_lora_weights=False)
    x = torch.randn(64, IN)
    layer.eval()
    torch.testing.assert_close(layer(x), reference(layer, x))
    layer.train()
    assert not torch.allclose(layer(x), reference(layer, x))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: nn.Conv2d(3, 3, 1), "cannot wrap a Conv2d"),
        (lambda: nn.Embedding(10, 4), "cannot wrap a Embedding"),
    ],
)
def test_unsupported_base_is_refused(make, match):
    with pytest.raises(TypeError, match=match):
        RunLoRALinear(make(), R)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r": 0}, "r must be a positive int, got 0"),
        ({"lora_dropout": 1.5}, r"lora_dropout must be a float in \[0, 1\)"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights must be True, False or 'gaussian'"),
        ({"criterion": "nope"}, "unknown criterion 'nope'"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RunLoRALinear(nn.Linear(IN, OUT), **kwargs)


def test_fp32_adapters_on_a_bf16_base_run_in_bf16_and_train_in_fp32():
    torch.manual_seed(0)
    base = nn.Linear(24, 16).to(torch.bfloat16).requires_grad_(False)
    layer = RunLoRALinear(base, r=4, lora_alpha=8, init_lora_weights=False)
    layer.lora_A.float()
    layer.lora_B.float()
    x = torch.randn(3, 5, 24, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    ref = base(x.double().float().to(torch.bfloat16)).double() + 2.0 * (
        x.double() @ a.double().t() @ b.double().t()
    )
    torch.testing.assert_close(y.double(), ref, rtol=3e-2, atol=3e-2)
    y.float().square().sum().backward()
    assert a.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    assert x.grad.dtype == torch.bfloat16


def _zero3_partitioned(layer: nn.Linear) -> nn.Linear:
    """Make ``layer`` look like DeepSpeed ZeRO-3 left it: empty data, full shape in ds_shape."""
    for p in layer.parameters():
        p.ds_shape, p.ds_id = tuple(p.shape), id(p)
        p.data = torch.empty(0)
    return layer


def test_a_base_partitioned_by_zero3_is_wrapped_from_its_full_shape():
    layer = RunLoRALinear(_zero3_partitioned(nn.Linear(12, 5)), r=3)
    assert (layer.in_features, layer.out_features) == (12, 5)
    assert layer.lora_A["default"].weight.shape == (3, 12)
    assert layer.lora_B["default"].weight.shape == (5, 3)


def test_a_wrapped_layer_pickles_and_deep_copies():
    import copy
    import io

    layer = RunLoRALinear(nn.Linear(6, 4), r=2, init_lora_weights=False)
    x = torch.randn(3, 6)
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        twin.lora_B["default"].weight.add_(1.0)
    assert not torch.allclose(twin(x), layer(x))  # the copy reads its own weights
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    torch.testing.assert_close(again(x), layer(x), rtol=0, atol=0)


def test_a_registered_base_kind_is_sized_from_its_handler():
    """A custom base kind whose weight is not at ``.weight`` (sizes come from its handler)."""

    class Stored(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(48, 32), requires_grad=False)

    saved = list(runlora.layers.layer._BASE_KINDS)
    try:
        runlora.layers.layer.register_base_kind(
            lambda m: isinstance(m, Stored), lambda m, fan_in_fan_out: (m.w, None, None)
        )
        layer = RunLoRALinear(Stored(), 4, 8, init_lora_weights=False)
        assert (layer.in_features, layer.out_features) == (32, 48)
        x = torch.randn(5, 32)
        want = x @ layer.base_layer.w.t() + layer.delta_weight().matmul(x.t()).t()
        torch.testing.assert_close(layer(x), want)
    finally:
        runlora.layers.layer._BASE_KINDS[:] = saved
