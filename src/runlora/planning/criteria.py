"""The criteria a plan can be chosen by: name -> scorer.

A scorer is ``fn(problem, pairs, dtype, device) -> [(score, Plan), ...]`` over the exact candidate
pairs of a ``Problem``; the planner keeps the lowest score. Built in: ``"flops"`` (``scoring``,
device-free), ``"roofline"`` (``roofline``) and ``"time"`` (``measured``); ``register_criterion``
adds your own.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..ops.variants import Problem
from .measured import by_time
from .roofline import by_roofline
from .scoring import by_flops

__all__ = ["CRITERIA", "Scorer", "register_criterion", "known_criterion"]

Scorer = Callable[[Problem, list, "torch.dtype", torch.device], list]
#: criterion name -> function(problem, pairs, dtype, device) -> list of (score, Plan) per pair.
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


def known_criterion(name: object) -> str:
    """``name`` if it is a key of ``CRITERIA``, else ``ValueError`` listing the known ones."""
    if not isinstance(name, str) or name not in CRITERIA:
        raise ValueError(f"unknown criterion {name!r}; known: {', '.join(CRITERIA)}")
    return name
