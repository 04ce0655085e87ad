"""Interleaved timing: arms run round-robin, one step each per round, so drift and a noisy
neighbour hit every arm alike; then each arm's memory on one more, untimed step.

    interleave(steps)        seconds per call of each step, rounds aligned across steps
    measure_arms(arms)       interleave + saved-for-backward bytes and peak memory per arm
    mean_ratio(a, ref)       mean step of ``a`` over ``ref``'s
    round_ratio_median(...)  the median over rounds of ``a``'s step over ``ref``'s in that round

Also the checks every benchmark job shares (device, dtype, criteria, round counts), so the model
and layer benches raise the same errors.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..ops.checks import positive_int
from .memory import peak_bytes, saved_tensor_bytes

__all__ = [
    "DTYPES",
    "Clock",
    "BenchError",
    "resolve_device",
    "check_run",
    "timing_of",
    "interleave",
    "Arm",
    "ArmResult",
    "measure_arms",
    "mean_ratio",
    "round_ratio_median",
]

#: ``--dtype`` names of the benches and ``runlora plan``.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
Clock = Callable[[], float]


class BenchError(ValueError):
    """A setting that cannot run (bad size, dtype for the device, target names): the message
    says what to change."""


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


TIMING = ("device", "warmup_rounds", "min_run_time", "min_rounds", "max_rounds")


def timing_of(settings) -> dict:
    """The ``measure_arms`` options a bench's settings carry (``TIMING``), by name."""
    return {name: getattr(settings, name) for name in TIMING}


def check_run(
    *,
    dtype: str,
    device: str,
    criterions: tuple[str, ...],
    min_run_time: float,
    warmup_rounds: int,
    min_rounds: int,
    max_rounds: int,
) -> None:
    """Raise ValueError, saying what to change, if a job with these settings cannot run here."""
    from ..planning.planner import CRITERIA

    if isinstance(warmup_rounds, bool) or not isinstance(warmup_rounds, int) or warmup_rounds < 0:
        raise BenchError(f"warmup rounds must be an int >= 0, got {warmup_rounds!r}")
    positive_int("min rounds", min_rounds)
    positive_int("max rounds", max_rounds)
    if not min_run_time >= 0.0:
        raise BenchError(f"min run time must be >= 0 seconds, got {min_run_time}")
    if dtype not in DTYPES:
        raise BenchError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if device not in ("cpu", "cuda"):
        raise BenchError(f"device must be 'cpu' or 'cuda' (resolve 'auto' first), got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda, but torch sees no CUDA device; use --device cpu")
    if device == "cpu" and dtype == "fp16":
        raise BenchError(
            "fp16 training steps are not supported on CPU (many CPU kernels "
            "lack fp16); use --dtype bf16 or fp32, or --device cuda"
        )
    unknown = [c for c in criterions if c not in CRITERIA]
    if unknown or not criterions:
        raise BenchError(
            f"unknown criterion {unknown[0] if unknown else '(none)'!r}; "
            f"known: {', '.join(CRITERIA)}"
        )


def _no_sync() -> None:
    return None


def interleave(
    steps: dict[str, Callable[[], object]],
    *,
    warmup_rounds: int = 2,
    min_run_time: float = 15.0,
    min_rounds: int = 5,
    max_rounds: int = 10_000,
    clock: Clock = time.perf_counter,
    sync: Callable[[], None] = _no_sync,
    progress: bool = False,
    desc: str = "",
) -> dict[str, list[float]]:
    """Seconds per call of each step, the steps run round-robin.

    Each round runs every step once, starting one further along each round so no step always
    follows the same one. Warm-up rounds are run and dropped. Timed rounds go on until every
    step has run ``min_run_time`` seconds in total and at least ``min_rounds`` rounds, or
    ``max_rounds``. ``clock`` is read around each step after ``sync()`` (CUDA synchronize).
    Element k of every list is from round k.
    """
    from tqdm.auto import tqdm

    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}

    def one_round(k: int, record: bool) -> None:
        for j in range(len(names)):
            name = names[(k + j) % len(names)]
            sync()
            t0 = clock()
            steps[name]()
            sync()
            elapsed = clock() - t0
            if record:
                times[name].append(elapsed)
            else:
                last[name] = elapsed

    last: dict[str, float] = {}
    bar = tqdm(
        total=warmup_rounds + min_rounds,
        desc=desc or "bench",
        unit="round",
        disable=not progress,
        leave=False,
        file=sys.stderr,
    )
    with bar:
        for k in range(warmup_rounds):
            one_round(k, record=False)
            bar.update()
        fastest = min(last.values()) if last else 0.0
        planned = min_rounds
        if fastest > 0:
            planned = max(min_rounds, math.ceil(min_run_time / fastest))
        bar.total = warmup_rounds + min(planned, max_rounds)
        bar.refresh()
        k = 0
        while k < max_rounds and (
            k < min_rounds or min(sum(t) for t in times.values()) < min_run_time
        ):
            one_round(warmup_rounds + k, record=True)
            k += 1
            bar.update()
    return times


@dataclass
class Arm:
    """One implementation under test: ``step()`` runs forward + backward once.

    ``kind`` says what it is to the report (``"floor"``, ``"frozen"``, ``"peft"``,
    ``"runlora"``); ``exclude`` holds the storage pointers (parameters, buffers) that
    saved-for-backward bytes do not count.
    """

    name: str
    kind: str
    step: Callable[[], object]
    exclude: frozenset[int] = frozenset()
    trainable_params: int = 0


@dataclass
class ArmResult:
    """One arm measured: its step times (one per timed round) and memory."""

    name: str
    kind: str
    times_ms: list[float]
    saved_bytes: int
    peak_bytes: int | None
    peak_kind: str | None
    trainable_params: int = 0
    loss: float | None = None

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.times_ms)

    @property
    def std_ms(self) -> float:
        return statistics.stdev(self.times_ms) if len(self.times_ms) > 1 else 0.0

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)


def mean_ratio(arm: ArmResult, ref: ArmResult | None) -> float | None:
    """``arm``'s mean step over ``ref``'s; None without a reference."""
    return None if ref is None else arm.mean_ms / ref.mean_ms


def round_ratio_median(arm: ArmResult, ref: ArmResult | None) -> float | None:
    """The median over timed rounds of ``arm``'s step over ``ref``'s step in the same round:
    steadier than ``mean_ratio`` when the machine's speed drifts between rounds."""
    if ref is None:
        return None
    return statistics.median(a / b for a, b in zip(arm.times_ms, ref.times_ms, strict=True))


def measure_arms(
    arms: list[Arm],
    *,
    device: str = "cpu",
    warmup_rounds: int = 2,
    min_run_time: float = 15.0,
    min_rounds: int = 5,
    max_rounds: int = 10_000,
    clock: Clock = time.perf_counter,
    progress: bool = False,
    desc: str = "",
) -> list[ArmResult]:
    """Time the arms interleaved (``interleave``), then measure each one's memory on one more,
    untimed step (hooks and counters cost time, so they stay out of the timed steps). One
    result per arm, in order; ``loss`` is the step's result when that is a scalar tensor."""
    sync = torch.cuda.synchronize if device == "cuda" else _no_sync
    times = interleave(
        {arm.name: arm.step for arm in arms},
        warmup_rounds=warmup_rounds,
        min_run_time=min_run_time,
        min_rounds=min_rounds,
        max_rounds=max_rounds,
        clock=clock,
        sync=sync,
        progress=progress,
        desc=desc,
    )
    results = []
    for arm in arms:
        box: dict[str, object] = {}

        def counted(arm: Arm = arm, box: dict = box) -> None:
            box["saved"], box["out"] = saved_tensor_bytes(arm.step, arm.exclude)

        peak, peak_kind = peak_bytes(counted, device)
        out = box["out"]
        scalar = isinstance(out, torch.Tensor) and out.numel() == 1
        results.append(
            ArmResult(
                arm.name,
                arm.kind,
                [t * 1e3 for t in times[arm.name]],
                int(box["saved"]),
                peak,
                peak_kind,
                arm.trainable_params,
                float(out.detach().float()) if scalar else None,
            )
        )
    return results
