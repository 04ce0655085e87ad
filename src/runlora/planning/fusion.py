"""Whether projections that read one input run as one fused op: the planner's call for a group.

A shared-input group (q/k/v, gate/up; ``runlora.layers.groups``) can run as one
``fused_lora_linear`` call or as K ``lora_linear`` calls, each projection on its own ``Plan``
either way. ``runlora.ops.fused_variants`` gives both as ``Cost`` s: the same products, but the
fused op stacks the skinny products on x (one read of x per stacked product instead of K) and
sums dX in place (no K - 1 autograd sums), while stacking two or more A_k costs a copy of them.
The group fuses when the fused cost has no more FLOPs and moves no more bytes: stacking never
adds FLOPs, so this is a byte count, and the skinny products it saves are the memory-bound ones
(measured on CPU: the fused op is 2-10 % faster than K ops on Llama's q/k/v and gate/up,
``benchmarks/fused_op.py``).

The call depends on the shapes and plans only: every criterion, device and rank makes the same
one, and nothing is measured inside a model's forward (where activation checkpointing would see
the measurement's autograd) or backward. It is a few dozen multiplications; a group remembers
its own calls (``runlora.layers.groups``).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..ops.fused_variants import FusedProblem, fused_cost, unfused_cost
from ..ops.plan import Plan

__all__ = ["Fusion", "plan_fusion"]


class Fusion:
    """The planner's call for one group: ``fused`` (run as one op) and ``reason`` (why)."""

    __slots__ = ("fused", "reason")

    def __init__(self, fused: bool, reason: str) -> None:
        self.fused, self.reason = fused, reason

    def __repr__(self) -> str:
        return f"Fusion(fused={self.fused}, reason={self.reason!r})"


def plan_fusion(problem: FusedProblem, plans: Sequence[Plan]) -> Fusion:
    """Fused op or K separate ops for ``problem``, projection k run by ``plans[k]``."""
    plans = tuple(plans)
    fused, apart = fused_cost(problem, plans), unfused_cost(problem, plans)
    f_key, a_key = (fused.flops, fused.bytes()), (apart.flops, apart.bytes())
    if fused.flops != apart.flops:
        why = f"{fused.flops:.3g} FLOPs fused, {apart.flops:.3g} apart"
    else:
        mib = 2**20  # bytes() of fp32 elements; the comparison is the same for any dtype
        why = (
            f"{fused.flops:.3g} FLOPs either way, {f_key[1] / mib:.2f} MiB moved fused, "
            f"{a_key[1] / mib:.2f} apart (fp32)"
        )
    return Fusion(f_key <= a_key, why)
