"""The computation orders of the LoRA op, with their cost models.

Y = X Wᵀ + s·(X Aᵀ) Bᵀ (+ bias), with X ``(N, in)``, W ``(out, in)`` frozen, A ``(r, in)``,
B ``(out, r)``. Matrix products are associative, so Y and the gradients dX, dA, dB can each be
computed in several orders whose cost depends on N, in, out and r (RunLoRA, arXiv 2312.03415).

Forward orders (``FORWARD_VARIANTS``)::

    sequential      F1  Y = X Wᵀ, then Y += s·(X Aᵀ) Bᵀ
    lowrank_first   F3  Y = s·(X Aᵀ) Bᵀ, then Y += X Wᵀ          (F1's op-order twin)
    merged          F2  Y = X (W + s·B A)ᵀ                       one big GEMM
    merged_t        F4  Y = X (Wᵀ + s·Aᵀ Bᵀ), the merged weight built transposed (NN layout)

Backward orders (``BACKWARD_VARIANTS``) are the eight ways to combine three independent choices
(L is the LoRA branch's input: X, or dropout(X)):

    dA from Z = dY B:   dA = s·Zᵀ L          or from G = dYᵀ L:  dA = s·Bᵀ G
    dB from L Aᵀ:       dB = s·dYᵀ (L Aᵀ)    or from G:          dB = s·G Aᵀ
    dX split:           dX = dY W + s·Z A    or merged:          dX = dY (W + s·B A)

Each order also has a ``*_dx_first`` twin that computes dX before the LoRA gradients. The
products are the same; what changes is which temporaries are alive together (the ``(out, in)`` G
or merged weight next to the ``(N, in)`` dX), so the twins trade peak memory, not FLOPs.

A variant is an order *and* a layout: the same skinny product asked of BLAS with the rank-r
operand on one side or the other differs in speed by up to 12x on CPU. ``LAYOUTS`` names the
two layout families the backward supports (see ``products``).

FLOPs here count matrix products only (2·m·n·k each), exactly what
``torch.utils.flop_counter.FlopCounterMode`` counts; bytes are what each product reads and writes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .checks import positive_int

__all__ = [
    "LAYOUTS",
    "FORWARD_VARIANTS",
    "BACKWARD_VARIANTS",
    "ForwardVariant",
    "BackwardVariant",
    "Problem",
    "Cost",
    "Product",
    "resolve_forward",
    "resolve_backward",
]

#: ``tuned`` asks BLAS for the skinny rank-r products with the rank-r operand transposed on the
#: left (fast on MKL/OpenBLAS); ``autograd`` uses the forms plain autograd would.
LAYOUTS = ("tuned", "autograd")


@dataclass(frozen=True)
class Problem:
    """What a cost depends on: the shape of one LoRA layer call and which gradients it needs.

    Attributes:
        n: token count N (all leading dims of x multiplied).
        in_features, out_features, r: the layer's sizes.
        needs_input_grad: dX is computed.
        needs_lora_grad: dA and dB are computed (False only for a frozen adapter).
        bias: the layer has a bias; ``bias_grad``: it is trainable.
        dropout: dropout > 0 on the LoRA branch in training mode.
        quantized: the base weight is dequantized on each use (costs one pass over W).
    """

    n: int
    in_features: int
    out_features: int
    r: int
    needs_input_grad: bool = True
    needs_lora_grad: bool = True
    bias: bool = False
    bias_grad: bool = False
    dropout: bool = False
    quantized: bool = False

    def __post_init__(self) -> None:
        for name in ("n", "in_features", "out_features", "r"):
            positive_int(name, getattr(self, name))


@dataclass(frozen=True)
class Product:
    """One matrix product ``(m, k) @ (k, n)``, or an elementwise pass when ``k == 0``.

    For a pass, ``m * n`` elements are read ``reads`` times in total and written once.
    """

    label: str
    m: int
    n: int
    k: int
    reads: int = 1

    @property
    def flops(self) -> int:
        return 2 * self.m * self.n * self.k

    @property
    def elements(self) -> int:
        """Elements moved: both operands read and the output written."""
        if self.k == 0:
            return self.m * self.n * (self.reads + 1)
        return self.m * self.k + self.k * self.n + self.m * self.n


@dataclass(frozen=True)
class Cost:
    """The products of one forward or backward, and the largest temporary it holds (elements)."""

    products: tuple[Product, ...]
    peak_elements: int = 0

    @property
    def flops(self) -> int:
        return sum(p.flops for p in self.products)

    def bytes(self, itemsize: int = 4) -> int:
        return itemsize * sum(p.elements for p in self.products)

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.products + other.products, max(self.peak_elements, other.peak_elements))


def _weight_pass(p: Problem) -> tuple[Product, ...]:
    # A quantized base weight is dequantized into a fresh (out, in) buffer on every use.
    if not p.quantized:
        return ()
    return (Product("dequantize W", p.out_features, p.in_features, 0),)


@dataclass(frozen=True)
class ForwardVariant:
    """One forward order. ``cost(problem)`` gives its products; ``merged`` orders fold s·BA into
    the base weight, which is only exact when the LoRA branch sees the same X (no dropout)."""

    name: str
    paper_name: str
    merged: bool
    description: str
    cost: Callable[[Problem], Cost] = field(repr=False, compare=False)


def _forward_split_cost(p: Problem) -> Cost:
    n, i, o, r = p.n, p.in_features, p.out_features, p.r
    prods = _weight_pass(p) + (
        Product("X Wᵀ", n, o, i),
        Product("L Aᵀ", n, r, i),
        Product("(L Aᵀ) Bᵀ", n, o, r),
    )
    if p.dropout:
        prods += (Product("dropout mask", n, i, 0, reads=1),)
    return Cost(prods, peak_elements=n * r + (n * i if p.dropout else 0))


def _forward_merged_cost(p: Problem) -> Cost:
    n, i, o, r = p.n, p.in_features, p.out_features, p.r
    prods = _weight_pass(p) + (Product("W + s·B A", o, i, r), Product("X W'ᵀ", n, o, i))
    return Cost(prods, peak_elements=o * i)


FORWARD_VARIANTS: dict[str, ForwardVariant] = {
    v.name: v
    for v in (
        ForwardVariant(
            "merged",
            "F2",
            True,
            "Y = X (W + s·B A)ᵀ: one GEMM on a merged weight",
            _forward_merged_cost,
        ),
        ForwardVariant(
            "merged_t",
            "F4",
            True,
            "Y = X (Wᵀ + s·Aᵀ Bᵀ): merged weight built as (in, out)",
            _forward_merged_cost,
        ),
        ForwardVariant(
            "sequential",
            "F1",
            False,
            "Y = X Wᵀ, then Y += s·(X Aᵀ) Bᵀ",
            _forward_split_cost,
        ),
        ForwardVariant(
            "lowrank_first",
            "F3",
            False,
            "Y = s·(X Aᵀ) Bᵀ, then Y += X Wᵀ",
            _forward_split_cost,
        ),
    )
}


@dataclass(frozen=True)
class BackwardVariant:
    """One backward order: where dA and dB come from, how dX is formed, and in which order.

    Attributes:
        da_from: ``"Z"`` (dA = s·Zᵀ L with Z = dY B) or ``"G"`` (dA = s·Bᵀ G with G = dYᵀ L).
        db_from: ``"LA"`` (dB = s·dYᵀ (L Aᵀ)) or ``"G"`` (dB = s·G Aᵀ).
        dx: ``"split"`` (dY W + s·Z A) or ``"merged"`` (dY (W + s·B A)).
        dx_first: compute dX before the LoRA gradients (lower peak for G / merged orders).
    """

    name: str
    paper_name: str
    da_from: str
    db_from: str
    dx: str
    dx_first: bool = False

    @property
    def merged(self) -> bool:
        return self.dx == "merged"

    @property
    def description(self) -> str:
        da = "s·Zᵀ L" if self.da_from == "Z" else "s·Bᵀ G"
        db = "s·dYᵀ (L Aᵀ)" if self.db_from == "LA" else "s·G Aᵀ"
        dx = "dY W + s·Z A" if self.dx == "split" else "dY (W + s·B A)"
        first = "; dX first" if self.dx_first else ""
        return f"dA = {da}; dB = {db}; dX = {dx}{first}"

    def needs(self, p: Problem) -> tuple[bool, bool, bool]:
        """Which intermediates this order computes for ``p``: (Z, L Aᵀ, G)."""
        lora, dx = p.needs_lora_grad, p.needs_input_grad
        need_z = (lora and self.da_from == "Z") or (dx and self.dx == "split")
        need_la = lora and self.db_from == "LA"
        need_g = lora and (self.da_from == "G" or self.db_from == "G")
        return need_z, need_la, need_g

    def cost(self, p: Problem, saved_la: bool = False) -> Cost:
        n, i, o, r = p.n, p.in_features, p.out_features, p.r
        need_z, need_la, need_g = self.needs(p)
        prods: list[Product] = []
        peak = 0
        if p.dropout and (p.needs_lora_grad or (p.needs_input_grad and self.dx == "split")):
            prods.append(Product("dropout mask", n, i, 0, reads=1))
        if need_z:
            prods.append(Product("Z = dY B", n, r, o))
        if need_la and not saved_la:
            prods.append(Product("L Aᵀ", n, r, i))
        if need_g:
            prods.append(Product("G = dYᵀ L", o, i, n))
            peak = o * i
        if p.needs_lora_grad:
            prods.append(
                Product("dA = Zᵀ L", r, i, n)
                if self.da_from == "Z"
                else Product("dA = Bᵀ G", r, i, o)
            )
            prods.append(
                Product("dB = dYᵀ (L Aᵀ)", o, r, n)
                if self.db_from == "LA"
                else Product("dB = G Aᵀ", o, r, i)
            )
        if p.needs_input_grad:
            prods.extend(_weight_pass(p))
            if self.dx == "merged":
                prods.append(Product("W + s·B A", o, i, r))
                prods.append(Product("dX = dY W'", n, i, o))
                alive = o * i + (0 if self.dx_first else (o * i if need_g else 0))
            else:
                prods.append(Product("dX = dY W", n, i, o))
                prods.append(Product("dX += s·Z A", n, i, r))
                if p.dropout:
                    prods.append(Product("mask Z A", n, i, 0, reads=2))
                alive = n * i if p.dropout else 0
                if need_g and not self.dx_first:
                    alive += o * i
            peak = max(peak, alive)
        return Cost(tuple(prods), peak_elements=peak)


def _backward_registry() -> dict[str, BackwardVariant]:
    paper = {
        ("Z", "LA", "split"): ("recompute_split", "B1"),
        ("Z", "G", "split"): ("z_gradient_split", "B2"),
        ("G", "G", "split"): ("gradient_split", "B3"),
        ("G", "G", "merged"): ("gradient_merged", "B4"),
        ("Z", "LA", "merged"): ("recompute_merged", "B5"),
        ("G", "LA", "split"): ("g_recompute_split", "B6"),
        ("G", "LA", "merged"): ("g_recompute_merged", "B7"),
        ("Z", "G", "merged"): ("z_gradient_merged", "B8"),
    }
    out: dict[str, BackwardVariant] = {}
    # Registry order is the tie-break order: cheapest-in-memory orders first.
    for (da, db, dx), (name, paper_name) in sorted(paper.items(), key=lambda kv: kv[1][1]):
        out[name] = BackwardVariant(name, paper_name, da, db, dx)
        out[name + "_dx_first"] = BackwardVariant(
            name + "_dx_first", paper_name + "'", da, db, dx, dx_first=True
        )
    return out


BACKWARD_VARIANTS: dict[str, BackwardVariant] = _backward_registry()

_FORWARD_ALIASES = {v.paper_name: k for k, v in FORWARD_VARIANTS.items()}
_BACKWARD_ALIASES = {v.paper_name: k for k, v in BACKWARD_VARIANTS.items()}


def _resolve(name: object, registry: dict, aliases: dict, kind: str):
    if isinstance(name, str):
        key = aliases.get(name, aliases.get(name.upper(), name))
        if key in registry:
            return registry[key]
    known = ", ".join(registry)
    raise ValueError(
        f"unknown {kind} variant {name!r}; known: {known} (or the paper's names "
        f"{', '.join(aliases)})"
    )


def resolve_forward(name: str) -> ForwardVariant:
    """The forward variant called ``name`` (``"merged"``) or by its paper name (``"F2"``)."""
    return _resolve(name, FORWARD_VARIANTS, _FORWARD_ALIASES, "forward")


def resolve_backward(name: str) -> BackwardVariant:
    """The backward variant called ``name`` (``"recompute_merged"``) or by paper name (``"B5"``)."""
    return _resolve(name, BACKWARD_VARIANTS, _BACKWARD_ALIASES, "backward")
