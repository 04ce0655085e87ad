"""How a plan is chosen: one ``PlanRequest`` per layer call (``request``), criteria that score
the op's (forward, backward, layout) triples for it (``criteria``: ``scoring`` by FLOPs,
``roofline``, ``measured`` by timing on the device), the planner that keeps the best and
memoises it (``planner``), the traceable hot-path lookup (``lookup``), the on-disk cache
(``cache``), a stopwatch (``clock``), and whether projections sharing an input run fused
(``fusion``).
"""

from .fusion import Fusion, plan_fusion
from .planner import (
    CRITERIA,
    Plan,
    PlanRequest,
    default_plan,
    plan_bucketed,
    plan_for,
    plan_layer,
    plan_request,
    register_criterion,
)

__all__ = [
    "CRITERIA",
    "Fusion",
    "Plan",
    "PlanRequest",
    "default_plan",
    "plan_bucketed",
    "plan_for",
    "plan_fusion",
    "plan_layer",
    "plan_request",
    "register_criterion",
]
