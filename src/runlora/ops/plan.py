"""``Plan``: the (forward, backward, layout) triple the op runs, with what it was chosen by.

The op runs a Plan; ``runlora.planning`` chooses one. A Plan lives here, beside the variants it
names, so that the op needs nothing from the planner.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .variants import (
    BACKWARD_VARIANTS,
    FORWARD_VARIANTS,
    LAYOUTS,
    BackwardVariant,
    ForwardVariant,
    resolve_backward,
    resolve_forward,
)

__all__ = ["Plan", "as_plan"]


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
