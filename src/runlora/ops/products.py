"""The matrix products of the LoRA op, each in the layouts ``runlora.ops.variants.LAYOUTS`` names.

Shapes: dY ``(N, out)``, B ``(out, r)``, A ``(r, in)``, W ``(out, in)``, and L, the LoRA branch's
input, ``(N, in)``.
"tuned" puts the skinny ``r``-wide operand on the left, where BLAS runs it faster; "autograd" is
the order plain autograd uses.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["z_product", "la_product", "db_from_la", "merge_weight", "addmm_into"]


def z_product(dy: Tensor, b: Tensor, layout: str) -> Tensor:
    """Z = dY B, ``(N, r)``. The tuned form puts the skinny operand on the left."""
    if layout == "tuned":
        return (b.t() @ dy.t()).t()
    return dy @ b


def la_product(lx: Tensor, a: Tensor) -> Tensor:
    """L Aᵀ, ``(N, r)``."""
    return lx @ a.t()


def db_from_la(dy: Tensor, la: Tensor, layout: str) -> Tensor:
    """dYᵀ (L Aᵀ), ``(out, r)``."""
    if layout == "tuned":
        return (la.t() @ dy).t()
    return dy.t() @ la


def merge_weight(w: Tensor, a: Tensor, b: Tensor, s: float, w_owned: bool = False) -> Tensor:
    """W + s·B A, ``(out, in)``: in a fresh buffer, or into ``w`` itself when the caller owns it
    (a freshly dequantized weight), which saves an ``(out, in)`` allocation."""
    if w_owned:
        return addmm_into(w, b, a, alpha=s)
    return torch.addmm(w, b, a, alpha=s)


def addmm_into(c: Tensor, m1: Tensor, m2: Tensor, *, beta: float = 1.0, alpha: float = 1.0):
    """c = beta·c + alpha·m1 @ m2 in place. Written as ``addmm(out=c)`` rather than ``addmm_``
    so that FlopCounterMode, which does not know the in-place overload, counts it."""
    return torch.addmm(c, m1, m2, beta=beta, alpha=alpha, out=c)
