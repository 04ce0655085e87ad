"""The plan lookup of the hot path, written so that ``torch.compile`` can trace it.

``planner.plan_for`` buckets N and memoises, but its search is plain Python that Dynamo cannot
trace (and should not: a plan is a constant of the graph). Here the bucket is found by a binary
search over the bucket tops, so that under dynamic shapes Dynamo only guards ``N`` to its bucket
(a new bucket recompiles, a new N inside it does not), and the search itself runs once per bucket
outside the graph through ``torch.compiler.assume_constant_result``.
"""

from __future__ import annotations

import torch

from .planner import Plan, plan_for
from .request import bucket_tokens

__all__ = ["lookup_plan", "token_bucket"]


def _bucket_tops(limit: int = 1 << 40) -> tuple[int, ...]:
    tops = [bucket_tokens(1)]
    while tops[-1] < limit:
        tops.append(bucket_tokens(tops[-1] + 1))
    return tuple(tops)


_TOPS = _bucket_tops()


def token_bucket(n_tokens) -> int:
    """``bucket_tokens(n_tokens)`` as a Python int, also when ``n_tokens`` is a symbolic size."""
    lo, hi = 0, len(_TOPS) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if n_tokens <= _TOPS[mid]:
            hi = mid
        else:
            lo = mid + 1
    return _TOPS[lo]


@torch.compiler.assume_constant_result
def _plan_fields(bucket, in_f, out_f, r, criterion, needs_x, bias, dropout, dtype, device, quant):
    # Plain constants in, plain constants out: Dynamo runs this once per bucket, outside the graph.
    plan = plan_for(
        bucket,
        in_f,
        out_f,
        r,
        criterion=criterion,
        needs_input_grad=needs_x,
        bias=bias,
        dropout=dropout,
        dtype=dtype,
        device=device,
        quantized=quant,
    )
    return plan.forward, plan.backward, plan.layout, plan.criterion


def lookup_plan(
    n_tokens,
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
    """``plan_for`` with the same arguments; traceable by Dynamo without graph breaks.

    Eagerly it is ``plan_for`` (which builds the ``PlanRequest`` on a memo miss) and returns its
    Plan (with its FLOP figures); under ``torch.compile`` a Plan carrying the chosen names only,
    rebuilt in the graph from constants.
    """
    if not torch.compiler.is_compiling():
        return plan_for(
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
    fwd, bwd, layout, chosen_by = _plan_fields(
        token_bucket(n_tokens),
        in_features,
        out_features,
        r,
        criterion,
        bool(needs_input_grad),
        bool(bias),
        float(dropout),
        dtype,
        str(torch.device(device)) if device is not None else "cpu",
        bool(quantized),
    )
    return Plan(fwd, bwd, layout, criterion=chosen_by)
