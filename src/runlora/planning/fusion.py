"""Whether projections that read one input run as one fused op: the planner's call for a group.

A shared-input group (q/k/v, gate/up; ``runlora.layers.groups``) can run as one
``fused_lora_linear`` call or as K ``lora_linear`` calls, each projection on its own ``Plan``
either way. ``runlora.ops.fused_variants`` gives both as ``Cost`` s: the same products, but the
fused op stacks the skinny products on x (one read of x per stacked product instead of K) and
sums dX in place (no K - 1 autograd sums). Which one runs is decided like a layer's plan, by the
layers' criterion:

- ``"flops"`` (and criteria of your own): fewer FLOPs, then fewer bytes. Stacking keeps the
  FLOPs, so a group fuses whenever fusing moves fewer bytes;
- ``"roofline"``: the lower predicted time on the calibrated device;
- ``"time"``: the faster of the two, measured once on the real shapes (forward + backward).

Decisions are remembered per (``FusedProblem``, plans, criterion, dtype, device).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..ops.function import lora_linear
from ..ops.fused import fused_lora_linear
from ..ops.fused_variants import FusedProblem, fused_cost, unfused_cost
from ..ops.plan import Plan
from . import roofline
from .clock import time_call
from .measured import TIME_BUDGET_S

__all__ = ["Fusion", "plan_fusion", "clear_fusion_memo"]

_MEMO: dict[tuple, Fusion] = {}


class Fusion:
    """The planner's call for one group: ``fused`` (run as one op) and ``reason`` (why)."""

    __slots__ = ("fused", "reason")

    def __init__(self, fused: bool, reason: str) -> None:
        self.fused, self.reason = fused, reason

    def __repr__(self) -> str:
        return f"Fusion(fused={self.fused}, reason={self.reason!r})"


def plan_fusion(
    problem: FusedProblem,
    plans: Sequence[Plan],
    criterion: str,
    dtype: torch.dtype,
    device: torch.device | str,
) -> Fusion:
    """Fused op or K separate ops for ``problem`` with projection k on ``plans[k]``."""
    device = torch.device(device)
    key = (problem, tuple(plans), criterion, dtype, device)
    hit = _MEMO.get(key)
    if hit is None:
        # measuring and calibrating draw random tensors: leave the caller's streams as they were
        forked = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=forked):
            hit = _MEMO[key] = _decide(problem, tuple(plans), criterion, dtype, device)
    return hit


def clear_fusion_memo() -> None:
    """Forget every decision (``runlora.planning.clear_plan_memo`` calls it too)."""
    _MEMO.clear()


def _decide(problem, plans, criterion, dtype, device) -> Fusion:
    fused, apart = fused_cost(problem, plans), unfused_cost(problem, plans)
    if criterion == "roofline":
        calib = roofline.calibrate(dtype, device)
        r = max(p.r for p in problem.parts)
        size = dtype.itemsize
        f_ms = roofline.predict_ms(fused.products, calib, size, r)
        a_ms = roofline.predict_ms(apart.products, calib, size, r)
        return _verdict(f_ms <= a_ms, f"predicted {f_ms:.3f} ms fused, {a_ms:.3f} ms apart")
    if criterion == "time":
        f_ms, a_ms = _measure(problem, plans, dtype, device)
        return _verdict(f_ms <= a_ms, f"measured {f_ms:.3f} ms fused, {a_ms:.3f} ms apart")
    size = dtype.itemsize
    f_key = (fused.flops, fused.bytes(size))
    a_key = (apart.flops, apart.bytes(size))
    mib = 2**20
    return _verdict(
        f_key <= a_key,
        f"{fused.flops:.3g} FLOPs both ways, {f_key[1] / mib:.2f} MiB moved fused, "
        f"{a_key[1] / mib:.2f} MiB apart"
        if fused.flops == apart.flops
        else f"{fused.flops:.3g} FLOPs fused, {apart.flops:.3g} apart",
    )


def _verdict(fused: bool, why: str) -> Fusion:
    return Fusion(fused, why)


def _measure(problem: FusedProblem, plans, dtype, device) -> tuple[float, float]:
    """Median ms of forward + backward of the fused op and of the K separate ops, on random
    tensors of the real shapes."""
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, grad=False):
        t = torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)
        return t.requires_grad_(grad)

    parts = problem.parts
    lora_grad = [p.needs_lora_grad for p in parts]
    x = rnd(problem.n, problem.in_features, grad=problem.needs_input_grad)
    ws = [rnd(p.out_features, p.in_features) for p in parts]
    As = [rnd(p.r, p.in_features, grad=g) for p, g in zip(parts, lora_grad, strict=True)]
    Bs = [rnd(p.out_features, p.r, grad=g) for p, g in zip(parts, lora_grad, strict=True)]
    biases = [rnd(p.out_features) if p.bias else None for p in parts]
    dys = [rnd(problem.n, p.out_features) for p in parts]
    dropouts = [0.1 if p.dropout else 0.0 for p in parts]
    leaves = [t for t in (x, *As, *Bs) if t.requires_grad]

    def backward(ys) -> None:
        ys = list(ys)
        if not leaves:  # an inference call: the forward is all there is
            return
        torch.autograd.backward(ys, dys, inputs=leaves)
        for t in leaves:
            t.grad = None

    def fused() -> None:
        k = len(parts)
        backward(
            fused_lora_linear(
                x, ws, As, Bs, biases, scalings=[1.0] * k, dropouts=dropouts, plans=plans
            )
        )

    def apart() -> None:
        backward(
            lora_linear(x, w, a, b, bias, scaling=1.0, dropout=p, plan=plan)
            for w, a, b, bias, p, plan in zip(ws, As, Bs, biases, dropouts, plans, strict=True)
        )

    share = TIME_BUDGET_S / 2
    with torch.enable_grad():
        return time_call(fused, device, share), time_call(apart, device, share)
