"""Measuring the variants on the real device: the ``"time"`` criterion and its helpers.

Forward and backward are independent halves of a pair, so each half's candidates are timed
alone (``run_forward`` / ``run_backward`` on synthetic tensors of the real shape, dtype and device)
and the best pair is the best forward plus the best backward. Candidates are first ranked by the
roofline model and only those within ``PRUNE`` of the best prediction are timed, so planning a
large layer costs a handful of runs, not sixty-four.
"""

from __future__ import annotations

import os

import torch

from ..ops.dropout import draw_mask
from ..ops.function import run_backward, run_forward
from ..ops.variants import LAYOUTS, Problem
from . import roofline
from .clock import time_call
from .scoring import pair_cost, scored_plan

__all__ = ["measure_halves", "by_time", "TIME_BUDGET_S"]

#: seconds of measurement per layer shape for the "time" criterion (RUNLORA_TIME_BUDGET overrides).
TIME_BUDGET_S = float(os.environ.get("RUNLORA_TIME_BUDGET", "2.0"))
#: time only candidates predicted within this factor of the best prediction.
PRUNE = 1.25


def _operands(problem: Problem, dtype: torch.dtype, device: torch.device, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n, i, o, r = problem.n, problem.in_features, problem.out_features, problem.r

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    x, w, a, b, dy = rnd(n, i), rnd(o, i), rnd(r, i), rnd(o, r), rnd(n, o)
    bias = rnd(o) if problem.bias else None
    return x, w, a, b, dy, bias


def measure_halves(
    problem: Problem,
    forwards: list,
    backwards: list,
    dtype: torch.dtype,
    device: torch.device,
    budget_s: float,
) -> tuple[dict[str, float], dict[tuple[str, str], float]]:
    """Median ms of each forward variant and each (backward variant, layout) on ``problem``."""
    x, w, a, b, dy, bias = _operands(problem, dtype, device)
    lx = x
    mask = None
    if problem.dropout:  # a typical p; the mask is drawn as the op draws it
        mask = draw_mask(x, 0.1, seed=0)
        lx = mask.apply(x)
    share = budget_s / max(1, len(forwards) + len(backwards))
    fwd_ms = {}
    # the candidates run in ``dtype`` as the op runs them, whatever autocast the caller is under
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        for fwd in forwards:
            fwd_ms[fwd.name] = time_call(
                lambda fwd=fwd: run_forward(fwd, x, w, a, b, bias, 1.0, lx), device, share
            )
        bwd_ms = {}
        for bwd, layout in backwards:
            bwd_ms[(bwd.name, layout)] = time_call(
                lambda bwd=bwd, layout=layout: run_backward(
                    bwd,
                    layout,
                    dy,
                    lambda: w,
                    a,
                    b,
                    lx,
                    mask=mask,
                    need_x=problem.needs_input_grad,
                    need_lora=problem.needs_lora_grad,
                ),
                device,
                share,
            )
    return fwd_ms, bwd_ms


def by_time(problem, pairs, dtype, device):

    dev = torch.device(device)
    dtype = dtype or torch.float32
    fwd_pred, bwd_pred = roofline.predict_halves(problem, pairs, dtype, dev)
    best_f = min(fwd_pred.values())
    best_b = min(bwd_pred.values())
    forwards = {f.name: f for f, _ in pairs}
    backwards = {b.name: b for _, b in pairs}
    # dX-first twins run the same products: time one of each, keep the lower-peak twin.
    timed_f = [forwards[k] for k, v in fwd_pred.items() if v <= PRUNE * best_f]
    timed_b = [
        (backwards[k], lay)
        for (k, lay), v in bwd_pred.items()
        if v <= PRUNE * best_b and not backwards[k].dx_first
    ]
    fwd_ms, bwd_ms = measure_halves(problem, timed_f, timed_b, dtype, dev, TIME_BUDGET_S)
    scored = []
    for fwd, bwd in pairs:
        base = bwd.name.removesuffix("_dx_first")
        for layout in LAYOUTS:
            if fwd.name not in fwd_ms or (base, layout) not in bwd_ms:
                continue
            ms = fwd_ms[fwd.name] + bwd_ms[(base, layout)]
            cost = pair_cost(fwd, bwd, problem)
            pred = fwd_pred[fwd.name] + bwd_pred[(bwd.name, layout)]
            plan = scored_plan(
                fwd,
                bwd,
                layout,
                problem,
                dtype,
                "time",
                predicted_ms=round(pred, 4),
                measured_ms=round(ms, 4),
                reason=f"fastest measured of {len(fwd_ms)} forward x {len(bwd_ms)} backward "
                f"candidates: {ms:.3f} ms",
            )
            scored.append(((ms, cost.peak_elements, cost.flops), plan))
    return scored
