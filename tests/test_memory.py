"""What the op keeps for backward: x alone (no X Aᵀ, no ``(N, out)`` tensor, no dropout mask or
dropped copy of x), plus exactly one ``(N, r)`` tensor when asked to keep X Aᵀ."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor

from runlora import BACKWARD_VARIANTS, FORWARD_VARIANTS, LAYOUTS, Plan

pytestmark = pytest.mark.usefixtures("single_thread")

IN_FEATURES = 12
OUT_FEATURES = 10
RANK = 4
X_SHAPE_3D = (3, 5, IN_FEATURES)
N_TOKENS = X_SHAPE_3D[0] * X_SHAPE_3D[1]
DROPOUT = 0.25
ALL_PAIRS = list(itertools.product(FORWARD_VARIANTS, BACKWARD_VARIANTS))
SPLIT_FORWARDS = [name for name, v in FORWARD_VARIANTS.items() if not v.merged]
SPLIT_PAIRS = [
    (f, b)
    for f, b in ALL_PAIRS
    if not FORWARD_VARIANTS[f].merged and not BACKWARD_VARIANTS[b].merged
]


def saved_for_backward(inputs, run) -> list[Tensor]:
    """The tensors ``run()`` saves for backward, one per storage, parameters excluded."""
    params = {
        t.untyped_storage().data_ptr()
        for t in (inputs.weight, inputs.lora_a, inputs.lora_b, inputs.bias)
        if t is not None
    }
    saved: dict[int, Tensor] = {}

    def pack(t: Tensor) -> Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved.setdefault(ptr, t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = run()
    y.sum().backward()  # what was saved must be enough for backward
    return list(saved.values())


def _saved_bytes(tensors: list[Tensor]) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


@pytest.mark.parametrize("x_layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("forward", "backward"), ALL_PAIRS)
def test_saves_only_x(forward, backward, layout, x_layout, lora_inputs):
    inputs = lora_inputs(X_SHAPE_3D, OUT_FEATURES, RANK, x_layout=x_layout)
    saved = saved_for_backward(inputs, lambda: inputs.run(plan=Plan(forward, backward, layout)))
    # x itself, as given (a view of the caller's storage, not a contiguous copy).
    assert len(saved) == 1
    assert saved[0].untyped_storage().data_ptr() == inputs.x_leaf.untyped_storage().data_ptr()
    assert _saved_bytes(saved) == inputs.x_leaf.untyped_storage().nbytes()


@pytest.mark.parametrize("x_grad", [True, False])
@pytest.mark.parametrize(("forward", "backward"), SPLIT_PAIRS)
def test_dropout_saves_nothing_more(forward, backward, x_grad, lora_inputs):
    inputs = lora_inputs(X_SHAPE_3D, OUT_FEATURES, RANK, x_grad=x_grad)
    saved = saved_for_backward(
        inputs, lambda: inputs.run(plan=(forward, backward), dropout=DROPOUT)
    )
    assert [t.untyped_storage().data_ptr() for t in saved] == [
        inputs.x_leaf.untyped_storage().data_ptr()
    ]


@pytest.mark.parametrize("dropout", [0.0, DROPOUT])
@pytest.mark.parametrize(
    ("forward", "backward"), [(f, b) for f in SPLIT_FORWARDS for b in ("B1", "B3", "B6'")]
)
def test_keep_xa_adds_exactly_one_n_by_r_tensor(forward, backward, dropout, lora_inputs):
    inputs = lora_inputs(X_SHAPE_3D, OUT_FEATURES, RANK)
    saved = saved_for_backward(
        inputs, lambda: inputs.run(plan=(forward, backward), dropout=dropout, keep_xa=True)
    )
    x_ptr = inputs.x_leaf.untyped_storage().data_ptr()
    extra = [t for t in saved if t.untyped_storage().data_ptr() != x_ptr]
    assert len(saved) == 2 and len(extra) == 1
    assert extra[0].shape == (N_TOKENS, RANK)
    assert extra[0].untyped_storage().nbytes() == N_TOKENS * RANK * extra[0].element_size()


@pytest.mark.parametrize("forward", [f for f, v in FORWARD_VARIANTS.items() if v.merged])
def test_keep_xa_with_a_merged_forward_keeps_only_x(forward, lora_inputs):
    """A merged forward never forms X Aᵀ, so there is nothing to keep."""
    inputs = lora_inputs(X_SHAPE_3D, OUT_FEATURES, RANK)
    saved = saved_for_backward(inputs, lambda: inputs.run(plan=(forward, "B1"), keep_xa=True))
    assert len(saved) == 1


def test_the_count_sees_what_plain_autograd_saves(lora_inputs):
    """The counting itself: PEFT-style autograd keeps X Aᵀ, the mask and dropout(x) too."""
    inputs = lora_inputs(X_SHAPE_3D, OUT_FEATURES, RANK)
    saved = saved_for_backward(inputs, lambda: inputs.run_reference())
    assert any(t.shape[-1] == RANK and t.numel() == N_TOKENS * RANK for t in saved)
    keep = torch.rand(X_SHAPE_3D) >= DROPOUT
    with_dropout = saved_for_backward(
        inputs, lambda: inputs.run_reference(keep=keep, dropout=DROPOUT)
    )
    assert (
        _saved_bytes(with_dropout)
        > _saved_bytes(saved)
        > _saved_bytes(saved_for_backward(inputs, lambda: inputs.run()))
    )


@pytest.mark.parametrize("dropout", [0.0, DROPOUT])
def test_peft_layer_on_runlora_saves_only_x(dropout):
    """PEFT's own ``lora.Linear`` switched to runlora's op (``from_peft``) saves x alone, with
    dropout too; the same layer on PEFT's forward saves X Aᵀ (and with dropout a mask and the
    dropped x) besides."""
    peft = pytest.importorskip("peft")
    from torch import nn

    from runlora import from_peft

    def saved_by(layer, x) -> list[Tensor]:
        params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
        saved: dict[int, Tensor] = {}

        def pack(t: Tensor) -> Tensor:
            if t.untyped_storage().data_ptr() not in params:
                saved.setdefault(t.untyped_storage().data_ptr(), t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = layer(x)
        y.sum().backward()
        return list(saved.values())

    config = peft.LoraConfig(
        r=RANK, lora_alpha=2 * RANK, lora_dropout=dropout, target_modules=["0"]
    )
    layer = peft.get_peft_model(nn.Sequential(nn.Linear(IN_FEATURES, OUT_FEATURES)), config)
    layer = layer.base_model.model[0].train()
    x = torch.randn(X_SHAPE_3D, requires_grad=True)
    theirs = saved_by(layer, x)
    from_peft(layer)
    ours = saved_by(layer, x)
    assert [t.untyped_storage().data_ptr() for t in ours] == [x.untyped_storage().data_ptr()]
    assert _saved_bytes(theirs) > _saved_bytes(ours)
    assert any(t.numel() == N_TOKENS * RANK for t in theirs)
