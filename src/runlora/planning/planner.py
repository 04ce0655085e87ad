"""Choosing a (forward, backward, layout) triple per layer shape.

The planner knows shapes, not modules. A criterion scores candidate pairs for a ``Problem``
(``scoring``); ``plan_layer`` keeps the best. The built-in criteria are listed in ``CRITERIA``
below: ``"flops"`` (device-free), ``"roofline"`` (``roofline``) and ``"time"`` (``measured``);
``register_criterion`` adds your own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch

from ..ops.plan import Plan
from ..ops.variants import Problem
from .cache import default_cache, plan_key
from .measured import by_time
from .roofline import by_roofline
from .scoring import by_flops, candidates

__all__ = [
    "Plan",
    "plan_layer",
    "plan_for",
    "bucket_tokens",
    "CRITERIA",
    "register_criterion",
    "install_plans",
    "clear_plan_memo",
]


Scorer = Callable[[Problem, list, "torch.dtype", str], list]
#: criterion name -> function(problem, pairs, dtype, device) -> list of (score, Plan) per pair;
#: ``plan_layer`` keeps the lowest score.
CRITERIA: dict[str, Scorer] = {
    "flops": by_flops,
    "roofline": by_roofline,
    "time": by_time,
}


def register_criterion(name: str) -> Callable[[Scorer], Scorer]:
    """A decorator that adds ``fn`` to ``CRITERIA`` under ``name`` (for criteria of your own)."""

    def deco(fn: Scorer) -> Scorer:
        CRITERIA[name] = fn
        return fn

    return deco


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


def default_plan(problem: Problem, dtype: torch.dtype | None, device) -> Plan:
    """The plan ``lora_linear(plan=None)`` runs (``runlora.ops.set_plan_resolver``): by FLOPs,
    bucketed and memoised as in ``plan_for``."""
    return plan_for(
        problem.n,
        problem.in_features,
        problem.out_features,
        problem.r,
        needs_input_grad=problem.needs_input_grad,
        bias=problem.bias,
        dropout=0.1 if problem.dropout else 0.0,
        dtype=dtype,
        device=device,
        quantized=problem.quantized,
    )
