"""Memory accounting of one step.

saved_tensor_bytes(fn)   bytes autograd saves for backward (``saved_tensors_hooks``), each
                         storage counted once by its data pointer, parameters and buffers
                         excluded
peak_bytes(fn, device)   CUDA: ``max_memory_allocated`` over the step minus what was
                         allocated before it; CPU (Linux): the rise of the process's
                         resident set over the step, after ``malloc_trim`` and a reset of
                         its high-water mark (``/proc/self/clear_refs``). Allocator caching
                         makes the CPU figure coarser than the CUDA one.
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

__all__ = ["MIB", "PEAK_KINDS", "saved_tensor_bytes", "storage_ptrs", "peak_bytes"]

MIB = 2**20

#: What each ``peak_kind`` that ``peak_bytes`` returns measures, for the reports.
PEAK_KINDS = {
    "cuda_max_allocated": "torch.cuda.max_memory_allocated over one step, above the memory "
    "allocated before it",
    "rss_rise": "rise of the process's resident set over one step (after malloc_trim, "
    "high-water mark reset)",
}


def saved_tensor_bytes(
    fn: Callable[[], object],
    exclude: Iterable[int] = (),
    exclude_params_of: nn.Module | None = None,
) -> tuple[int, object]:
    """(bytes autograd saves for backward while ``fn()`` runs, ``fn()``'s result).

    Each storage is counted once, by its data pointer; storages whose pointer is in ``exclude``
    (parameters, buffers) are not counted, nor, with ``exclude_params_of``, the storages of that
    module's parameters and buffers as registered at the moment a tensor is saved: under FSDP2 a
    layer's all-gathered weights are its parameters only while it runs, and autograd saves views
    of them (``weight.t()``) that are not Parameter objects. The tensors are kept as they are.
    """
    skip = set(exclude)
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. sparse)
            return t
        ptr = storage.data_ptr()
        if ptr and ptr not in skip:
            if exclude_params_of is None or ptr not in _live_ptrs(exclude_params_of):
                seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return sum(seen.values()), result


def storage_ptrs(tensors: Iterable[torch.Tensor]) -> frozenset[int]:
    """The data pointers of the tensors' storages (what ``saved_tensor_bytes`` excludes)."""
    return frozenset(t.untyped_storage().data_ptr() for t in tensors)


def _live_ptrs(module: nn.Module) -> frozenset[int]:
    """Storage pointers of ``module``'s parameters and buffers now (DTensors: their shards)."""
    tensors = (*module.parameters(), *module.buffers())
    return storage_ptrs(t.to_local() if hasattr(t, "to_local") else t for t in tensors)


def _rss_tools() -> tuple[Callable[[], None], Callable[[], int], Callable[[], int]] | None:
    """(reset high-water mark, current RSS bytes, peak RSS bytes), or None off Linux."""
    status = Path("/proc/self/status")
    try:
        Path("/proc/self/clear_refs").write_text("5")
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None

    def read(key: str) -> int:
        for line in status.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise OSError(f"{key} not in {status}")

    def reset() -> None:
        gc.collect()
        libc.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")

    return reset, lambda: read("VmRSS"), lambda: read("VmHWM")


def peak_bytes(fn: Callable[[], object], device: str) -> tuple[int | None, str | None]:
    """(peak memory ``fn()`` adds, its kind: a key of ``PEAK_KINDS``); (None, None) if this
    machine cannot measure it. ``fn`` runs once either way."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, "cuda_max_allocated"
    tools = _rss_tools()
    if tools is None:
        fn()
        return None, None
    reset, rss, hwm = tools
    reset()
    base = rss()
    fn()
    return max(0, hwm() - base), "rss_rise"
