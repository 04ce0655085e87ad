"""Choosing a (forward, backward, layout) triple per layer call.

The planner knows shapes, not modules. Every entry point builds one ``PlanRequest``
(``request``): ``plan_request`` plans it exactly (through the on-disk cache when the criterion
measures), ``plan_bucketed`` plans its token bucket once per process (what the layers run). A
criterion (``criteria.CRITERIA``: ``"flops"``, ``"roofline"``, ``"time"``, or your own through
``register_criterion``) scores the exact candidate pairs; the lowest score wins.

``plan_layer`` and ``plan_for`` take the request's fields as arguments: ``plan_layer`` is the
public front, ``plan_for`` the hot path (one dict lookup per call, the request built on a miss).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import replace

import torch

from ..ops.plan import Plan
from ..ops.variants import Problem
from .cache import default_cache
from .criteria import CRITERIA, register_criterion
from .request import PlanRequest, bucket_tokens
from .scoring import candidates

__all__ = [
    "Plan",
    "PlanRequest",
    "plan_request",
    "plan_bucketed",
    "plan_layer",
    "plan_for",
    "default_plan",
    "bucket_tokens",
    "CRITERIA",
    "register_criterion",
    "install_plans",
    "clear_plan_memo",
]


def plan_request(request: PlanRequest) -> Plan:
    """The best plan for exactly ``request`` (its N as it is).

    ``"flops"`` plans are computed each time (cheap and device-free); the others are read from
    the on-disk plan cache under ``request.cache_key()``, or chosen and written there.
    """
    problem = request.problem
    device = torch.device(request.device)
    score = CRITERIA[request.criterion]
    if request.criterion == "flops":
        return _best(score(problem, list(candidates(problem)), request.dtype, device))
    cache = default_cache()
    key = request.cache_key()
    hit = cache.get("plans", key)
    if hit is not None:
        try:
            return Plan.from_dict(hit)
        except (TypeError, ValueError):
            pass  # an entry from another runlora version: plan again and overwrite it
    plan = _best(score(problem, list(candidates(problem)), request.dtype, device))
    cache.put("plans", key, plan.to_dict())
    return plan


def _best(scored: list) -> Plan:
    return min(scored, key=lambda sp: sp[0])[1]


@functools.lru_cache(maxsize=8192)
def _memo_plan(request: PlanRequest) -> Plan:
    return plan_request(request)


def plan_bucketed(request: PlanRequest) -> Plan:
    """The plan a layer runs for ``request``: that of its token bucket (``request.bucketed()``),
    planned once per process and memoised."""
    return _memo_plan(request.bucketed())


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
        criterion: a key of ``runlora.CRITERIA`` (``"flops"``: fewest FLOPs).
        needs_input_grad: whether x requires grad (False for the first layer).
        bias: whether the layer has a bias.
        dropout: LoRA dropout probability in training, in [0, 1); > 0 rules out merged orders.
        dtype, device: what the plan will run on (used by measuring criteria; default float32
            on the CPU).
        quantized: the base weight is dequantized on each use.

    Returns:
        A ``Plan`` whose ``flops`` is the predicted forward + backward matrix-product count.
    """
    return plan_request(
        PlanRequest.for_call(
            n_tokens,
            in_features,
            out_features,
            r,
            criterion=criterion,
            needs_input_grad=needs_input_grad,
            bias=bias,
            dropout=dropout,
            dtype=dtype,
            device=device,
            quantized=quantized,
        )
    )


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
    """``plan_layer`` for the hot path: N is bucketed (``bucket_tokens``; N = 0, an empty input,
    plans as 1) and plans are memoised in-process, so a layer calls this on every forward at the
    cost of a dict lookup."""
    key = (
        n_tokens, in_features, out_features, r, criterion, needs_input_grad, bias, dropout,
        dtype, device, quantized,
    )  # fmt: skip
    plan = _SEEN.get(key)
    if plan is None:
        request = PlanRequest.for_call(
            max(1, n_tokens),
            in_features,
            out_features,
            r,
            criterion=criterion,
            needs_input_grad=needs_input_grad,
            bias=bias,
            dropout=dropout,
            dtype=dtype,
            device=device,
            quantized=quantized,
        )
        plan = _remember(key, plan_bucketed(request))
    return plan


def default_plan(problem: Problem, dtype: torch.dtype | None, device) -> Plan:
    """The plan ``lora_linear(plan=None)`` runs (``runlora.ops.set_plan_resolver``): by FLOPs,
    bucketed and memoised as in ``plan_for``."""
    key = (problem, dtype, device)
    plan = _SEEN.get(key)
    if plan is None:
        plan = _remember(key, plan_bucketed(PlanRequest(problem, "flops", dtype, device)))
    return plan


#: the hot path's arguments as given (``plan_for``'s, or ``default_plan``'s Problem, dtype and
#: device; N not bucketed, device as passed) -> their Plan: one dict lookup per call, before the
#: request is built. Only arguments that built a valid request are stored.
_SEEN: dict[tuple, Plan] = {}
_SEEN_MAX = 1 << 16


def _remember(key: tuple, plan: Plan) -> Plan:
    if len(_SEEN) >= _SEEN_MAX:
        _SEEN.clear()
    _SEEN[key] = plan
    return plan


def clear_plan_memo() -> None:
    """Forget the in-process plans (the next call of each shape plans, or reads the cache)."""
    _SEEN.clear()
    _memo_plan.cache_clear()


def install_plans(
    entries: Iterable[tuple[dict, dict]],
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> int:
    """Adopt plans made by another process (rank 0 of a distributed job) as this process's own.

    Each entry is ``(request, plan_dict)``: ``request`` is ``PlanRequest.to_dict()``,
    ``plan_dict`` is ``Plan.to_dict()``. ``dtype`` and ``device``, when given, replace the
    request's (the local ones: rank 0 planned on its own device). The plan is stored in this
    process's plan cache under the bucketed request's key and the in-process memo is cleared, so
    the next ``plan_for`` of that request returns it without measuring anything. ``"flops"``
    plans are deterministic and never cached, so they are skipped.

    Returns:
        How many plans were installed.

    Raises:
        ValueError: for a request that is not ``PlanRequest.to_dict()``'s or a plan naming
            variants this runlora version does not have.
    """
    local = {k: v for k, v in (("dtype", dtype), ("device", device)) if v is not None}
    items = {}
    for request_dict, plan_dict in entries:
        request = replace(PlanRequest.from_dict(request_dict), **local)
        if request.criterion == "flops":
            continue
        Plan.from_dict(plan_dict)  # refuse a plan this runlora version cannot run
        items[request.bucketed().cache_key()] = dict(plan_dict)
    if items:
        default_cache().put_many("plans", items)
    clear_plan_memo()
    return len(items)
