"""``runlora layer-bench``: one LoRA layer's forward + backward, against the frozen nn.Linear.

For each shape ``(in, out)`` and rank r, on X ``(N, in)`` requiring grad and a fixed dY:

    frozen    the nn.Linear alone, W frozen: 1.00 is the floor any exact LoRA layer can reach
    peft      PEFT's ``lora.Linear`` around that same nn.Linear (``get_peft_model`` on a one-layer
              module; the LoRA layer is called directly, without the PeftModel wrapper)
    runlora   ``runlora.lora_linear`` on the same W, A and B, with ``plan_layer``'s plan

All arms share W; runlora's A and B are copies of PEFT's, and with dropout 0 both outputs are
checked to agree before timing; timed and measured as the model bench's arms
(``harness.measure_arms``). ``variant_arms`` instead times every exact (forward, backward,
layout) triple of runlora on one shape, to see which order and layout the device prefers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..ops.checks import dropout_probability, positive_int
from ..ops.function import lora_linear
from ..ops.variants import LAYOUTS, Problem
from ..planning.planner import Plan, plan_layer
from ..planning.scoring import candidates, pair_cost
from .harness import (
    DTYPES,
    Arm,
    BenchError,
    Clock,
    check_run,
    mean_ratio,
    measure_arms,
    round_ratio_median,
    timing_of,
)
from .memory import MIB, storage_ptrs
from .report import text_table

__all__ = [
    "LayerSettings",
    "LayerArm",
    "layer_arms",
    "variant_arms",
    "measure_layer",
    "format_layer_table",
]


@dataclass(frozen=True)
class LayerSettings:
    """What to measure; ``shapes`` are ``(in, out)`` pairs (Llama: attention 1024 x 1024,
    MLP up 1024 x 2736, down 2736 x 1024)."""

    n_tokens: int = 4096
    shapes: tuple[tuple[int, int], ...] = ((1024, 1024), (1024, 2736), (2736, 1024))
    ranks: tuple[int, ...] = (8, 64)
    lora_alpha: float = 16.0
    dropout: float = 0.0
    dtype: str = "fp32"
    device: str = "cpu"
    criterion: str = "flops"
    min_run_time: float = 2.0
    warmup_rounds: int = 2
    min_rounds: int = 5
    max_rounds: int = 10_000
    seed: int = 0

    def check(self) -> None:
        """Raise ValueError, saying what to change, on settings that cannot run."""
        positive_int("n tokens", self.n_tokens)
        for r in self.ranks:
            positive_int("rank", r)
        for d in (d for shape in self.shapes for d in shape):
            positive_int("shape size", d)
        if not self.shapes or not self.ranks:
            raise BenchError("give at least one shape and one rank")
        dropout_probability("lora dropout", self.dropout)
        check_run(dtype=self.dtype, criterions=(self.criterion,), **timing_of(self))


@dataclass
class LayerArm(Arm):
    """One timed implementation of one layer call: ``step()`` is forward + backward; ``kind``
    is ``"frozen"``, ``"peft"`` or ``"runlora"``, the latter with the ``plan`` it runs."""

    plan: Plan | None = None


class _OneLayer(nn.Module):
    def __init__(self, proj: nn.Linear) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


@dataclass
class _Case:
    """The tensors of one (in, out, r) measurement, shared by every arm."""

    x: torch.Tensor  # (N, in), requires grad
    dy: torch.Tensor  # (N, out)
    linear: nn.Linear  # W frozen
    peft_layer: nn.Module  # peft.tuners.lora.Linear around ``linear``
    lora_a: torch.Tensor  # (r, in), a copy of PEFT's
    lora_b: torch.Tensor  # (out, r), a copy of PEFT's
    scaling: float
    dropout: float

    def runlora(self, plan: Plan) -> torch.Tensor:
        return lora_linear(
            self.x,
            self.linear.weight,
            self.lora_a,
            self.lora_b,
            scaling=self.scaling,
            dropout=self.dropout,
            plan=plan,
        )

    def step(self, fn: Callable[[], torch.Tensor], *leaves: torch.Tensor):
        """forward + backward of ``fn`` with dY, after clearing the leaves' grads."""

        def run() -> torch.Tensor:
            for t in leaves:
                t.grad = None
            y = fn()
            y.backward(self.dy)
            return y

        return run

    @property
    def peft_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.peft_layer
        return layer.lora_A["default"].weight, layer.lora_B["default"].weight

    @property
    def exclude(self) -> frozenset[int]:
        return storage_ptrs((self.linear.weight, self.lora_a, self.lora_b, *self.peft_params))


def _case(in_f: int, out_f: int, r: int, settings: LayerSettings) -> _Case:
    import peft

    dtype, device = DTYPES[settings.dtype], settings.device
    gen = torch.Generator().manual_seed(settings.seed)
    x = torch.randn(settings.n_tokens, in_f, generator=gen).to(device, dtype)
    dy = torch.randn(settings.n_tokens, out_f, generator=gen).to(device, dtype)
    torch.manual_seed(settings.seed)
    linear = nn.Linear(in_f, out_f, bias=False).to(device, dtype).requires_grad_(False)
    peft_model = peft.get_peft_model(
        _OneLayer(linear),
        peft.LoraConfig(
            r=r,
            lora_alpha=settings.lora_alpha,
            lora_dropout=settings.dropout,
            target_modules=["proj"],
            init_lora_weights=False,
        ),  # B random, not 0
        autocast_adapter_dtype=False,
    )
    layer = peft_model.base_model.model.proj
    a, b = (
        t.detach().clone().requires_grad_(True)
        for t in (layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    )
    return _Case(
        x.requires_grad_(True), dy, linear, layer, a, b, layer.scaling["default"], settings.dropout
    )


def _check_agree(case: _Case, plan: Plan) -> None:
    """runlora and PEFT give the same Y (without dropout, whose masks differ)."""
    if case.dropout == 0.0:
        with torch.no_grad():
            tol = 1e-3 if case.x.dtype == torch.float32 else 5e-2
            torch.testing.assert_close(
                case.runlora(plan), case.peft_layer(case.x), rtol=tol, atol=tol
            )


def _reference_arms(case: _Case) -> list[LayerArm]:
    a_peft, b_peft = case.peft_params
    return [
        LayerArm("frozen", "frozen", case.step(lambda: case.linear(case.x), case.x), case.exclude),
        LayerArm(
            "peft",
            "peft",
            case.step(lambda: case.peft_layer(case.x), case.x, a_peft, b_peft),
            case.exclude,
        ),
    ]


def layer_arms(in_f: int, out_f: int, r: int, settings: LayerSettings) -> list[LayerArm]:
    """frozen, peft and runlora (planned by ``settings.criterion``) on one shape."""
    case = _case(in_f, out_f, r, settings)
    plan = plan_layer(
        settings.n_tokens,
        in_f,
        out_f,
        r,
        criterion=settings.criterion,
        dropout=settings.dropout,
        dtype=case.x.dtype,
        device=settings.device,
    )
    _check_agree(case, plan)
    ours = case.step(lambda: case.runlora(plan), case.x, case.lora_a, case.lora_b)
    return [*_reference_arms(case), LayerArm("runlora", "runlora", ours, case.exclude, plan=plan)]


def variant_arms(in_f: int, out_f: int, r: int, settings: LayerSettings) -> list[LayerArm]:
    """frozen, peft, and runlora with every exact (forward, backward, layout) on one shape."""
    case = _case(in_f, out_f, r, settings)
    problem = Problem(settings.n_tokens, in_f, out_f, r, dropout=settings.dropout > 0.0)
    arms = _reference_arms(case)
    for fwd, bwd in candidates(problem):
        for layout in LAYOUTS:
            cost = pair_cost(fwd, bwd, problem)
            plan = Plan(fwd.name, bwd.name, layout, flops=cost.flops)
            _check_agree(case, plan)
            step = case.step(lambda plan=plan: case.runlora(plan), case.x, case.lora_a, case.lora_b)
            arms.append(
                LayerArm(
                    f"{fwd.name}+{bwd.name}/{layout}", "runlora", step, case.exclude, plan=plan
                )
            )
    return arms


def measure_layer(
    arms: list[LayerArm],
    settings: LayerSettings,
    *,
    clock: Clock = time.perf_counter,
    progress: bool = False,
    desc: str = "",
) -> list[dict]:
    """``measure_arms`` on the layer's arms, one row per arm: ms mean/std/median, ``x_frozen``
    and ``x_peft`` (mean time over that arm's; ``*_median``: the median of the per-round
    ratios), ``saved_mib`` (saved for backward, W, A and B excluded), ``peak_mib``, the plan."""
    results = measure_arms(
        arms,
        **timing_of(settings),
        clock=clock,
        progress=progress,
        desc=desc,
    )
    by_kind = {res.kind: res for res in results}
    frozen, peft = by_kind.get("frozen"), by_kind.get("peft")
    rows = []
    for arm, res in zip(arms, results, strict=True):
        plan = arm.plan
        rows.append(
            {
                "arm": res.name,
                "kind": res.kind,
                "steps": len(res.times_ms),
                "ms_mean": res.mean_ms,
                "ms_std": res.std_ms,
                "ms_median": res.median_ms,
                "x_frozen": mean_ratio(res, frozen),
                "x_peft": mean_ratio(res, peft),
                "x_frozen_median": round_ratio_median(res, frozen),
                "x_peft_median": round_ratio_median(res, peft),
                "saved_mib": res.saved_bytes / MIB,
                "peak_mib": None if res.peak_bytes is None else res.peak_bytes / MIB,
                "forward": plan.forward if plan else None,
                "backward": plan.backward if plan else None,
                "layout": plan.layout if plan else None,
                "predicted_flops": plan.flops if plan else None,
            }
        )
    return rows


def format_layer_table(rows: list[dict]) -> str:
    """Fixed-width text, one line per (shape, r, arm); rows carry ``in``, ``out``, ``r``."""
    head = ["in x out", "r", "arm", "ms", "± std", "x frozen", "x PEFT", "saved MiB", "plan"]
    body = []
    for row in rows:
        plan = f"{row['forward']}+{row['backward']}/{row['layout']}" if row["forward"] else ""
        body.append(
            [
                f"{row['in']} x {row['out']}",
                str(row["r"]),
                row["arm"],
                f"{row['ms_mean']:.2f}",
                f"{row['ms_std']:.2f}",
                f"{row['x_frozen']:.3f}",
                f"{row['x_peft']:.3f}",
                f"{row['saved_mib']:.1f}",
                plan if row["arm"] == "runlora" else "",
            ]
        )
    return "\n".join(text_table(head, body, left={0, 2, 8}))
