"""Dropout masks drawn from an int seed, so that backward regenerates the forward's mask.

``draw_mask(x2d, p, seed)`` returns the same ``DropMask`` for the same seed, shape, p and device.
Two ways to draw it, chosen by (device, p) only, so forward and backward always agree:

- **dense** (CUDA, or p > ``SPARSE_MAX_P``): one fp32 uniform per entry, kept where ``u >= p``,
  held as a bool ``(N, in)`` tensor. On CUDA the Philox generator makes this nearly free.
- **sparse** (CPU, p ≤ ``SPARSE_MAX_P``): the positions of the dropped entries, drawn as a
  Bernoulli process through its gaps: the number of kept entries before each drop is
  geometric, ``floor(log(1 - u) / log(1 - p))`` for a uniform u. That needs about p·N·in
  uniforms instead of N·in, and applying the mask is a copy plus p·N·in scattered zeros instead
  of a multiply by an ``(N, in)`` mask. On this project's 2-core CPU, drawing and applying a
  1024 × 512 mask takes 0.67 ms instead of 4.9 ms at p = 0.1 (1.7 vs 5.6 ms at p = 0.3, even at
  p = 0.5). Each entry is still dropped independently with probability p (to the fp32
  resolution of the uniforms, as in the dense draw).

Both keep the scaling 1/(1 - p) out: the op folds it into the rank-r terms.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["DropMask", "draw_mask", "SPARSE_MAX_P"]

#: Up to this p, CPU masks are drawn as drop positions (their cost grows with p).
SPARSE_MAX_P = 0.4


class DropMask:
    """Which entries of an ``(N, in)`` input dropout zeroes.

    Exactly one of ``keep_dense`` (bool ``(N, in)``, True = kept) and ``dropped`` (sorted flat
    int64 indices of the zeroed entries) is set.
    """

    __slots__ = ("shape", "keep_dense", "dropped")

    def __init__(self, shape, keep_dense: Tensor | None = None, dropped: Tensor | None = None):
        self.shape = tuple(shape)
        self.keep_dense = keep_dense
        self.dropped = dropped

    def keep(self) -> Tensor:
        """The keep mask as a bool ``(N, in)`` tensor."""
        if self.keep_dense is not None:
            return self.keep_dense
        n = self.shape[0] * self.shape[1]
        keep = torch.ones(n, dtype=torch.bool, device=self.dropped.device)
        return keep.index_fill_(0, self.dropped, False).view(self.shape)

    def apply(self, x2d: Tensor) -> Tensor:
        """``x ⊙ keep`` in a fresh ``(N, in)`` buffer."""
        if self.keep_dense is not None:
            return x2d * self.keep_dense
        out = x2d.clone(memory_format=torch.contiguous_format)
        out.view(-1).index_fill_(0, self.dropped, 0)
        return out

    def add_masked_(self, acc: Tensor, t: Tensor, alpha: float) -> Tensor:
        """``acc += alpha · (t ⊙ keep)`` in place; ``t`` (contiguous, fresh) may be overwritten."""
        if self.keep_dense is not None:
            return acc.addcmul_(t, self.keep_dense, value=alpha)
        t.view(-1).index_fill_(0, self.dropped, 0)
        return acc.add_(t, alpha=alpha)


def _dropped_positions(n: int, p: float, gen: torch.Generator, device) -> Tensor:
    """Sorted flat indices in ``[0, n)`` of a Bernoulli(p) process, drawn through its gaps."""
    chunks = [torch.empty(0, dtype=torch.int64, device=device)]
    if p <= 0.0:
        return chunks[0]
    log_keep = math.log1p(-p)
    start = 0
    while start < n:
        rest = n - start
        m = int(p * rest + 6.0 * math.sqrt(rest * p * (1.0 - p)) + 16)  # rarely too few
        u = torch.rand(m, generator=gen, device=device)
        # kept entries before each drop; a gap of n or more means no further drop in [0, n)
        gaps = torch.log1p(u.neg_()).div_(log_keep).clamp_(max=n).floor_()
        pos = gaps.to(torch.int64).add_(1).cumsum_(0).add_(start - 1)
        k = int(torch.searchsorted(pos, n))  # how many fall inside [0, n)
        chunks.append(pos[:k])
        if k < m:
            break
        start = int(pos[-1]) + 1
    return chunks[-1] if len(chunks) == 2 else torch.cat(chunks)


def draw_mask(x2d: Tensor, p: float, seed: int) -> DropMask:
    """The dropout mask for ``x2d`` ``(N, in)`` at probability ``p``, drawn from ``seed``."""
    gen = torch.Generator(device=x2d.device)
    gen.manual_seed(seed)
    if x2d.device.type == "cpu" and p <= SPARSE_MAX_P:
        return DropMask(x2d.shape, dropped=_dropped_positions(x2d.numel(), p, gen, x2d.device))
    # Uniforms in fp32 whatever x's dtype, so p is honoured exactly in bf16/fp16 too.
    u = torch.rand(x2d.shape, generator=gen, device=x2d.device, dtype=torch.float32)
    return DropMask(x2d.shape, keep_dense=u >= p)
