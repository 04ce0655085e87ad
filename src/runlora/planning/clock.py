"""A stopwatch for device work: median milliseconds of a call, synchronised on CUDA."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["time_call", "sync"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    fn: Callable[[], object], device: torch.device, budget_s: float, max_reps: int = 25
) -> float:
    """Median milliseconds of ``fn()`` after one warm-up, repeated within ``budget_s`` (≥ 1 run).

    When the warm-up alone takes the whole budget, its time is the answer (large shapes on CPU).
    """
    t0 = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t0
    if first > budget_s:
        return first * 1e3
    times = []
    start = time.perf_counter()
    while len(times) < max_reps:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s and len(times) >= 1:
            break
    return statistics.median(times) * 1e3
