"""Bad input to the op and the planner raises a clear error before any tensor work."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from runlora import Plan, lora_linear, plan_layer
from runlora.ops.variants import Problem

IN_FEATURES = 12
OUT_FEATURES = 10
RANK = 4
N_TOKENS = 6


class _OpRecorder(TorchDispatchMode):
    """Records every tensor operation run while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def assert_raises_before_any_work(exc: type[Exception], match: str, fn) -> None:
    with _OpRecorder() as recorder, pytest.raises(exc, match=match):
        fn()
    assert recorder.ops == [], f"ran {recorder.ops} before raising"


def _args(**overrides):
    """Valid op arguments, with ``overrides`` replacing some of them."""
    args = {
        "x": torch.randn(N_TOKENS, IN_FEATURES, requires_grad=True),
        "weight": torch.randn(OUT_FEATURES, IN_FEATURES),
        "lora_A": torch.randn(RANK, IN_FEATURES, requires_grad=True),
        "lora_B": torch.randn(OUT_FEATURES, RANK, requires_grad=True),
        "bias": torch.randn(OUT_FEATURES, requires_grad=True),
    }
    args.update(overrides)
    return args


def test_valid_arguments_run():
    """The baseline the cases below change one thing of."""
    args = _args()
    with _OpRecorder() as recorder:
        lora_linear(**args, plan=("F1", "B1"))
    assert recorder.ops


BAD_OP_INPUTS = [
    (
        {"x": torch.randn(N_TOKENS, IN_FEATURES + 1)},
        ValueError,
        r"x must have shape \(\.\.\., 12\) to match weight",
    ),
    ({"x": torch.tensor(1.0)}, ValueError, r"x must have shape \(\.\.\., 12\)"),
    ({"x": [[1.0] * IN_FEATURES]}, TypeError, "x must be a torch.Tensor, got list"),
    (
        {"weight": torch.randn(OUT_FEATURES * IN_FEATURES)},
        ValueError,
        r"weight, lora_A and lora_B must be 2-D",
    ),
    ({"lora_A": torch.randn(1, RANK, IN_FEATURES)}, ValueError, "must be 2-D"),
    (
        {"lora_A": torch.randn(RANK, IN_FEATURES - 1)},
        ValueError,
        r"lora_A must have shape \(r, in\) = \(4, 12\)",
    ),
    (
        {"lora_B": torch.randn(OUT_FEATURES + 1, RANK)},
        ValueError,
        r"lora_B must have shape \(out, r\) = \(10, 4\)",
    ),
    (
        {"lora_B": torch.randn(OUT_FEATURES, RANK + 1)},
        ValueError,
        r"lora_B must have shape \(out, r\) = \(10, 4\)",
    ),
    (
        {"lora_A": torch.randn(0, IN_FEATURES), "lora_B": torch.randn(OUT_FEATURES, 0)},
        ValueError,
        "r must be a positive int, got 0",
    ),
    ({"bias": torch.randn(OUT_FEATURES + 1)}, ValueError, r"bias must have shape \(out,\)"),
    ({"bias": torch.randn(1, OUT_FEATURES)}, ValueError, r"bias must have shape \(out,\)"),
    (
        {"weight": torch.randn(OUT_FEATURES, IN_FEATURES, dtype=torch.float64)},
        TypeError,
        "must share one floating dtype.*weight=torch.float64.*cast them",
    ),
    (
        {"bias": torch.randn(OUT_FEATURES, dtype=torch.bfloat16)},
        TypeError,
        "must share one floating dtype.*bias=torch.bfloat16",
    ),
    (
        {
            "x": torch.ones(N_TOKENS, IN_FEATURES, dtype=torch.int64),
            "weight": torch.ones(OUT_FEATURES, IN_FEATURES, dtype=torch.int64),
            "lora_A": torch.ones(RANK, IN_FEATURES, dtype=torch.int64),
            "lora_B": torch.ones(OUT_FEATURES, RANK, dtype=torch.int64),
            "bias": None,
        },
        TypeError,
        "floating dtype",
    ),
    (
        {"x": torch.randn(N_TOKENS, IN_FEATURES, device="meta")},
        ValueError,
        "must be on one device.*x=meta.*weight=cpu",
    ),
    (
        {"lora_B": torch.randn(OUT_FEATURES, RANK, device="meta")},
        ValueError,
        "must be on one device.*lora_B=meta",
    ),
    (
        {"weight": torch.randn(OUT_FEATURES, IN_FEATURES, requires_grad=True)},
        ValueError,
        r"weight requires grad.*requires_grad_\(False\)",
    ),
]


@pytest.mark.parametrize(("overrides", "exc", "match"), BAD_OP_INPUTS)
def test_bad_tensors(overrides, exc, match):
    args = _args(**overrides)
    assert_raises_before_any_work(exc, match, lambda: lora_linear(**args))


@pytest.mark.parametrize("dropout", [1.0, -0.1, 1.5, "0.1", None])
def test_bad_dropout(dropout):
    args = _args()
    assert_raises_before_any_work(
        ValueError,
        r"dropout must be a float in \[0, 1\)",
        lambda: lora_linear(**args, dropout=dropout),
    )


@pytest.mark.parametrize("scaling", [float("nan"), float("inf"), "2", torch.tensor(2.0), True])
def test_bad_scaling(scaling):
    args = _args()
    assert_raises_before_any_work(
        ValueError,
        "scaling must be a finite float",
        lambda: lora_linear(**args, scaling=scaling),
    )


@pytest.mark.parametrize(
    ("plan", "exc", "match"),
    [
        (("F9", "B1"), ValueError, "unknown forward variant 'F9'; known: merged"),
        (("sequential", "B9"), ValueError, "unknown backward variant 'B9'; known: "),
        (("F1", "B1", "fastest"), ValueError, "unknown layout 'fastest'; known: tuned, autograd"),
        ((1, "B1"), ValueError, "unknown forward variant 1"),
        ("F1/B1", TypeError, "plan must be a runlora.Plan, a .forward_name, backward_name. tuple"),
        (("F1",), TypeError, "plan must be a runlora.Plan"),
        (("F1", "B1", "tuned", "extra"), TypeError, "plan must be a runlora.Plan"),
        ({"forward": "F1", "backward": "B1"}, TypeError, "plan must be a runlora.Plan"),
        (42, TypeError, "plan must be a runlora.Plan"),
    ],
)
def test_bad_plan(plan, exc, match):
    args = _args()
    assert_raises_before_any_work(exc, match, lambda: lora_linear(**args, plan=plan))


def test_merged_plan_with_dropout_in_training():
    args = _args()
    assert_raises_before_any_work(
        ValueError,
        "variant 'merged' merges s·BA into the base weight.*Use a split order",
        lambda: lora_linear(**args, plan=Plan("F2", "B1"), dropout=0.1),
    )
    assert_raises_before_any_work(
        ValueError,
        "variant 'recompute_merged' merges",
        lambda: lora_linear(**args, plan=("F1", "B5"), dropout=0.1),
    )


def test_plan_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown forward variant 'F5'"):
        Plan("F5", "B1")
    with pytest.raises(ValueError, match="unknown backward variant 'recompute'"):
        Plan("F1", "recompute")
    with pytest.raises(ValueError, match="unknown layout 'column'"):
        Plan("F1", "B1", layout="column")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_tokens": 0}, "n_tokens must be a positive int, got 0"),
        ({"n_tokens": -3}, "n_tokens must be a positive int, got -3"),
        ({"in_features": 0}, "in_features must be a positive int, got 0"),
        ({"out_features": 2.5}, "out_features must be a positive int, got 2.5"),
        ({"r": 0}, "r must be a positive int, got 0"),
        ({"r": True}, "r must be a positive int, got True"),
        ({"criterion": "fastest"}, "unknown criterion 'fastest'; known: flops"),
        ({"dropout": 1.0}, r"dropout must be a float in \[0, 1\)"),
    ],
)
def test_plan_layer_bad_input(kwargs, match):
    args = {
        "n_tokens": N_TOKENS,
        "in_features": IN_FEATURES,
        "out_features": OUT_FEATURES,
        "r": RANK,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        plan_layer(**args)


@pytest.mark.parametrize("field", ["n", "in_features", "out_features", "r"])
def test_problem_rejects_non_positive_sizes(field):
    sizes = {"n": N_TOKENS, "in_features": IN_FEATURES, "out_features": OUT_FEATURES, "r": RANK}
    sizes[field] = 0
    with pytest.raises(ValueError, match=f"{field} must be a positive int, got 0"):
        Problem(**sizes)
