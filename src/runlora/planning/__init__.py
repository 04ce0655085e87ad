"""How a plan is chosen: criteria that score the op's (forward, backward, layout) triples per
layer shape (``scoring`` by FLOPs, ``roofline``, ``measured`` by timing on the device), the
planner that keeps the best and memoises it (``planner``), the traceable hot-path lookup
(``lookup``), the on-disk cache (``cache``) and a stopwatch (``clock``).
"""

from .planner import CRITERIA, Plan, default_plan, plan_for, plan_layer, register_criterion

__all__ = ["CRITERIA", "Plan", "default_plan", "plan_for", "plan_layer", "register_criterion"]
