"""Scoring candidate pairs: which (forward, backward) pairs are exact for a ``Problem``, what they
cost (``runlora.ops.variants``' FLOP and byte model), and the ``"flops"`` criterion.

A criterion is ``fn(problem, pairs, dtype, device) -> [(score, Plan), ...]``; the planner keeps
the lowest score. ``by_flops`` needs no device; ``roofline.by_roofline`` and
``measured.by_time`` build on the same helpers.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..ops.plan import Plan
from ..ops.variants import (
    BACKWARD_VARIANTS,
    FORWARD_VARIANTS,
    BackwardVariant,
    Cost,
    ForwardVariant,
    Problem,
)

__all__ = ["candidates", "pair_cost", "scored_plan", "itemsize", "by_flops"]


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


def scored_plan(fwd, bwd, layout: str, problem: Problem, dtype, criterion: str, **fields) -> Plan:
    """A ``Plan`` for one candidate pair with its FLOP and byte counts filled in."""
    cost = pair_cost(fwd, bwd, problem)
    size = itemsize(dtype)
    return Plan(fwd.name, bwd.name, layout, cost.flops, cost.bytes(size), criterion, **fields)


def itemsize(dtype: torch.dtype | None) -> int:
    return torch.empty((), dtype=dtype or torch.float32).element_size()


def by_flops(problem, pairs, dtype, device):
    size = itemsize(dtype)
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
