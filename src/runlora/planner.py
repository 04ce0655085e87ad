"""Choosing a (forward, backward, layout) triple per layer shape.

The planner knows shapes, not modules. A criterion is a function that scores candidate pairs for
a ``Problem``; ``plan_layer`` keeps the best. ``"flops"`` needs no device; further criteria
register themselves in ``CRITERIA`` and callers do not change.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from .cache import default_cache, plan_key
from .variants import (
    BACKWARD_VARIANTS,
    FORWARD_VARIANTS,
    LAYOUTS,
    BackwardVariant,
    Cost,
    ForwardVariant,
    Problem,
    resolve_backward,
    resolve_forward,
)

__all__ = [
    "Plan",
    "plan_layer",
    "plan_for",
    "bucket_tokens",
    "CRITERIA",
    "candidates",
    "pair_cost",
    "as_plan",
    "install_plans",
]


@dataclass(frozen=True)
class Plan:
    """One planned (forward, backward) pair for one layer shape.

    Attributes:
        forward, backward: variant names (paper aliases such as ``"F2"``/``"B5"`` are accepted and
            stored under their full names).
        layout: ``"tuned"`` or ``"autograd"`` (see ``runlora.variants``).
        flops: predicted matrix-product FLOPs of forward + backward, or None for a hand-made plan.
        bytes: predicted bytes moved by those products.
        criterion: what chose it (``"flops"``, ``"time"``, ``"roofline"``, ``"manual"``).
        predicted_ms, measured_ms: per-criterion figures for the chosen pair, if any.
        reason: one line on why this pair won.
    """

    forward: str
    backward: str
    layout: str = "tuned"
    flops: int | None = None
    bytes: int | None = None
    criterion: str = "manual"
    predicted_ms: float | None = None
    measured_ms: float | None = None
    reason: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "forward", resolve_forward(self.forward).name)
        object.__setattr__(self, "backward", resolve_backward(self.backward).name)
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; known: {', '.join(LAYOUTS)}")

    @property
    def forward_variant(self) -> ForwardVariant:
        return FORWARD_VARIANTS[self.forward]

    @property
    def backward_variant(self) -> BackwardVariant:
        return BACKWARD_VARIANTS[self.backward]

    @property
    def merged(self) -> bool:
        """True if either half folds s·BA into the base weight (not allowed with dropout)."""
        return self.forward_variant.merged or self.backward_variant.merged

    def to_dict(self) -> dict:
        return {
            "forward": self.forward,
            "backward": self.backward,
            "layout": self.layout,
            "flops": self.flops,
            "bytes": self.bytes,
            "criterion": self.criterion,
            "predicted_ms": self.predicted_ms,
            "measured_ms": self.measured_ms,
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def _check_dropout(plan: Plan, dropout: bool) -> None:
    if dropout and plan.merged:
        half = plan.forward if plan.forward_variant.merged else plan.backward
        raise ValueError(
            f"variant {half!r} merges s·BA into the base weight, which is only exact without "
            "dropout: the LoRA branch sees dropout(x) while the base sees x. Use a split order "
            "(forward 'sequential'/'lowrank_first', backward '*_split'), dropout=0, or plan=None"
        )


def as_plan(plan: Plan | tuple[str, str] | list, *, dropout: bool = False) -> Plan:
    """A ``Plan`` from a Plan or a ``(forward_name, backward_name)`` pair, checked for dropout."""
    if isinstance(plan, Plan):
        result = plan
    elif isinstance(plan, (tuple, list)) and len(plan) in (2, 3):
        result = Plan(*plan)
    else:
        raise TypeError(
            "plan must be a runlora.Plan, a (forward_name, backward_name) tuple or None, "
            f"got {plan!r}"
        )
    _check_dropout(result, dropout)
    return result


def candidates(problem: Problem) -> Iterable[tuple[ForwardVariant, BackwardVariant]]:
    """Every (forward, backward) pair that is exact for ``problem``."""
    for fwd in FORWARD_VARIANTS.values():
        if problem.dropout and fwd.merged:
            continue
        for bwd in BACKWARD_VARIANTS.values():
            if problem.dropout and bwd.merged:
                continue
            yield fwd, bwd


def pair_cost(fwd: ForwardVariant, bwd: BackwardVariant, problem: Problem) -> Cost:
    """The products of forward + backward of one pair on ``problem``."""
    return fwd.cost(problem) + bwd.cost(problem)


Scorer = Callable[[Problem, list, "torch.dtype", str], list]
#: criterion name -> function(problem, pairs, dtype, device) -> list of (score, Plan) per pair;
#: ``plan_layer`` keeps the lowest score.
CRITERIA: dict[str, Scorer] = {}


def register_criterion(name: str) -> Callable[[Scorer], Scorer]:
    def deco(fn: Scorer) -> Scorer:
        CRITERIA[name] = fn
        return fn

    return deco


def scored_plan(fwd, bwd, layout: str, problem: Problem, dtype, criterion: str, **fields) -> Plan:
    """A ``Plan`` for one candidate pair with its FLOP and byte counts filled in."""
    cost = pair_cost(fwd, bwd, problem)
    size = _itemsize(dtype)
    return Plan(fwd.name, bwd.name, layout, cost.flops, cost.bytes(size), criterion, **fields)


def _itemsize(dtype: torch.dtype | None) -> int:
    return torch.empty((), dtype=dtype or torch.float32).element_size()


@register_criterion("flops")
def _by_flops(problem, pairs, dtype, device):
    size = _itemsize(dtype)
    scored = []
    for fwd, bwd in pairs:
        cost = pair_cost(fwd, bwd, problem)
        plan = Plan(
            fwd.name,
            bwd.name,
            "tuned",
            cost.flops,
            cost.bytes(size),
            "flops",
            reason=f"fewest FLOPs ({cost.flops:.3g}), then fewest bytes, then lowest peak",
        )
        scored.append(((cost.flops, cost.bytes(size), cost.peak_elements), plan))
    return scored


def _positive(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def plan_layer(
    n_tokens: int,
    in_features: int,
    out_features: int,
    r: int,
    *,
    criterion: str = "flops",
    needs_input_grad: bool = True,
    bias: bool = False,
    dropout: float = 0.0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    quantized: bool = False,
) -> Plan:
    """The best (forward, backward) pair for one LoRA layer call.

    Args:
        n_tokens: N, the token count (batch × sequence).
        in_features, out_features, r: the layer's sizes.
        criterion: a key of ``runlora.planner.CRITERIA`` (``"flops"``: fewest FLOPs).
        needs_input_grad: whether x requires grad (False for the first layer).
        bias: whether the layer has a bias.
        dropout: LoRA dropout probability in training; > 0 rules out merged orders.
        dtype, device: what the plan will run on (used by measuring criteria).
        quantized: the base weight is dequantized on each use.

    Returns:
        A ``Plan`` whose ``flops`` is the predicted forward + backward matrix-product count.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; known: {', '.join(CRITERIA)}")
    for name, value in (
        ("n_tokens", n_tokens),
        ("in_features", in_features),
        ("out_features", out_features),
        ("r", r),
    ):
        _positive(name, value)
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
    problem = Problem(
        n_tokens,
        in_features,
        out_features,
        r,
        needs_input_grad=bool(needs_input_grad),
        bias=bool(bias),
        bias_grad=False,
        dropout=dropout > 0.0,
        quantized=bool(quantized),
    )
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if criterion == "flops":  # cheap and device-free: never cached on disk
        return _best(CRITERIA[criterion](problem, list(candidates(problem)), dtype, dev))
    cache = default_cache()
    key = plan_key(problem, criterion, dev, dtype or torch.float32)
    hit = cache.get("plans", key)
    if hit is not None:
        try:
            return Plan.from_dict(hit)
        except (TypeError, ValueError):
            pass  # an entry from another runlora version: plan again and overwrite it
    plan = _best(CRITERIA[criterion](problem, list(candidates(problem)), dtype, dev))
    cache.put("plans", key, plan.to_dict())
    return plan


def _best(scored: list) -> Plan:
    return min(scored, key=lambda sp: sp[0])[1]


def bucket_tokens(n_tokens: int) -> int:
    """The token-count bucket a plan is shared over: N rounded up to the next of four steps per
    power of two (…, 256, 320, 384, 448, 512, 640, …). Exact below 64 tokens.

    Which order wins changes only where N crosses a ratio of in, out and r, so a plan made at the
    bucket's top holds for every N in it to within a few percent of the cost, and a new sequence
    length costs no new planning in the hot path.
    """
    if n_tokens <= 64:
        return n_tokens
    top = 1 << (n_tokens - 1).bit_length()  # next power of two >= n
    step = top // 8
    return -(-n_tokens // step) * step


def plan_for(
    n_tokens: int,
    in_features: int,
    out_features: int,
    r: int,
    *,
    criterion: str = "flops",
    needs_input_grad: bool = True,
    bias: bool = False,
    dropout: float = 0.0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    quantized: bool = False,
) -> Plan:
    """``plan_layer`` for the hot path: N is bucketed (``bucket_tokens``) and plans are memoised
    in-process, so a layer calls this on every forward at the cost of a dict lookup."""
    key = (
        n_tokens, in_features, out_features, r, criterion, needs_input_grad, bias,
        dropout > 0.0, dtype, device, quantized,
    )  # fmt: skip
    plan = _SEEN.get(key)
    if plan is not None:
        return plan
    dev = torch.device(device) if device is not None else torch.device("cpu")
    plan = _memo_plan(
        bucket_tokens(max(1, n_tokens)),
        in_features,
        out_features,
        r,
        criterion,
        bool(needs_input_grad),
        bool(bias),
        dropout > 0.0,
        dtype,
        str(dev),
        bool(quantized),
    )
    if len(_SEEN) >= _SEEN_MAX:
        _SEEN.clear()
    _SEEN[key] = plan
    return plan


#: plan_for's arguments as given (N not bucketed, device as passed) -> its Plan: one dict lookup
#: on the hot path before the bucketing and device normalisation ``_memo_plan`` needs.
_SEEN: dict[tuple, Plan] = {}
_SEEN_MAX = 1 << 16


def clear_plan_memo() -> None:
    """Forget the in-process plans (the next call of each shape plans, or reads the cache)."""
    _SEEN.clear()
    _memo_plan.cache_clear()


@functools.lru_cache(maxsize=8192)
def _memo_plan(n, in_f, out_f, r, criterion, needs_x, bias, dropout, dtype, device, quantized):
    return plan_layer(
        n,
        in_f,
        out_f,
        r,
        criterion=criterion,
        needs_input_grad=needs_x,
        bias=bias,
        dropout=0.1 if dropout else 0.0,
        dtype=dtype,
        device=device,
        quantized=quantized,
    )


def install_plans(
    entries: Iterable[tuple[dict, dict]],
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> int:
    """Adopt plans made by another process (rank 0 of a distributed job) as this process's own.

    Each entry is ``(request, plan_dict)``: ``request`` holds ``plan_for``'s arguments
    (``n_tokens``, ``in_features``, ``out_features``, ``r``, ``criterion``,
    ``needs_input_grad``, ``bias``, ``dropout``, ``quantized``), ``plan_dict`` is
    ``Plan.to_dict()``. The plan is stored in this process's plan cache under this process's own
    key (``dtype`` and ``device`` are the local ones), and the in-process memo is cleared, so the
    next ``plan_for`` of that request returns it without measuring anything. ``"flops"`` plans
    are deterministic and never cached, so they are skipped.

    Returns:
        How many plans were installed.
    """
    items = {}
    dev = torch.device(device) if device is not None else torch.device("cpu")
    for request, plan_dict in entries:
        if request["criterion"] == "flops":
            continue
        Plan.from_dict(plan_dict)  # refuse a plan this runlora version cannot run
        problem = Problem(
            bucket_tokens(max(1, request["n_tokens"])),
            request["in_features"],
            request["out_features"],
            request["r"],
            needs_input_grad=bool(request.get("needs_input_grad", True)),
            bias=bool(request.get("bias", False)),
            bias_grad=False,
            dropout=request.get("dropout", 0.0) > 0.0,
            quantized=bool(request.get("quantized", False)),
        )
        key = plan_key(problem, request["criterion"], dev, dtype or torch.float32)
        items[key] = dict(plan_dict)
    if items:
        default_cache().put_many("plans", items)
    clear_plan_memo()
    return len(items)
