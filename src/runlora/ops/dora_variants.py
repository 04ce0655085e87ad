"""The computation orders of the DoRA op, with their cost models (``runlora.ops.dora`` runs them).

DoRA (arXiv 2402.09353; PEFT's ``use_dora=True``) scales each output row of the LoRA-adapted
weight to a learned magnitude m ``(out,)``::

    n = ‖W + s·B A‖ per output row, detached (DoRA §4.3)      g = m / n
    y = g ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + bias                       (no dropout, or eval)

A DoRA order is a LoRA (forward, backward) pair, which computes the products of W, A and B, plus
three choices of its own:

``norm``: where n comes from.
    ``factored``  n² = ‖W‖² + 2s·rowsum(B ⊙ (W Aᵀ)) + s²·rowsum((B (A Aᵀ)) ⊙ B), with ‖W‖²
                  cached per frozen weight: one skinny ``(out, in)·(in, r)`` product, no
                  ``(out, in)`` temporary.
    ``merged``    from the merged weight W' = W + s·B A that a merged forward builds anyway (one
                  pass over it). Only with the LoRA forwards ``merged``/``merged_t``.
``scale``: where g is applied in forward.
    ``output``    to the ``(N, out)`` output: y = g ⊙ U + bias, U = x Wᵀ + s·(x Aᵀ) Bᵀ.
    ``weight``    to the rows of W and B, before the LoRA forward runs on g ⊙ W, g ⊙ B: an
                  ``(out, in)`` pass instead of an ``(N, out)`` one, nearly free with a merged
                  forward (it folds s·(g ⊙ B) A into the fresh g ⊙ W in place).
``dm``: where the magnitude's gradient dm = Σ_tokens dY ⊙ U / n gets the U term.
    ``saved``     U ``(N, out)`` saved from forward: no extra product, N·out more bytes saved.
    ``recompute`` Σ dY ⊙ (X Wᵀ) with X Wᵀ recomputed in backward (one more N·in·out product),
                  plus s·rowsum(dB° ⊙ B), which the LoRA backward's dB° = s·dYᵀ (X Aᵀ) gives
                  for free.
    ``gradient``  rowsum((dYᵀ X) ⊙ W) (the same N·in·out FLOPs, an ``(out, in)`` temporary
                  instead of an ``(N, out)`` one), plus the same free rank-r term.

There is no exact way to get Σ dY ⊙ (X Wᵀ) without either keeping ``(N, out)`` numbers from
forward or a second N·in·out product: it is the weight-gradient-sized contraction a frozen
layer never computes. ``saved`` trades memory for that product; the others trade the product
for memory. (Sharing G = dYᵀ X with a LoRA backward that forms it would make ``gradient`` free,
but the LoRA orders that form G only win when r is a sizeable fraction of in and out.)

With dropout in training, PEFT computes the base output separately:
y = x Wᵀ + bias + (g − 1) ⊙ (x_d Wᵀ) + g ⊙ s·(x_d Aᵀ) Bᵀ, x_d = dropout(x). The op runs the LoRA
pair on L = x ⊙ keep with weights h ⊙ W and g ⊙ B, h = (g − 1)/(1 − p), plus the base product:
``scale`` is ``weight``, ``norm`` ``factored``, and ``dm`` ``recompute`` or ``gradient``. Every
LoRA pair is exact there, merged ones included: the pair sees one input, L.

FLOPs count matrix products only, bytes what each product or pass reads and writes, as in
``runlora.ops.variants``. The cached ‖W‖² is not counted (it is computed once per weight).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .plan import Plan, as_plan
from .variants import Cost, Problem, Product

__all__ = [
    "NORM_ORDERS",
    "SCALE_ORDERS",
    "DM_ORDERS",
    "DoRAPlan",
    "as_dora_plan",
    "dora_forward_cost",
    "dora_backward_cost",
    "dora_cost",
    "saved_elements",
    "dora_orders",
    "choose_dora_plan",
]

NORM_ORDERS = ("factored", "merged")
SCALE_ORDERS = ("output", "weight")
DM_ORDERS = ("saved", "recompute", "gradient")


@dataclass(frozen=True)
class DoRAPlan:
    """One planned DoRA order: a LoRA pair plus the DoRA choices (see the module docstring).

    Attributes:
        lora: the LoRA (forward, backward, layout) the op runs for the products of W, A, B.
        norm: ``"factored"`` or ``"merged"`` (needs a merged LoRA forward).
        scale: ``"output"`` or ``"weight"``.
        dm: ``"saved"`` (needs ``scale="output"``), ``"recompute"`` or ``"gradient"``.
        flops, bytes: predicted forward + backward products and traffic, None if hand-made.
        saved_bytes: predicted bytes saved for backward (x, plus U with ``dm="saved"``).
        criterion: what chose it (``"flops"``, ``"manual"``).
        reason: one line on why.
    """

    lora: Plan
    norm: str = "factored"
    scale: str = "output"
    dm: str = "recompute"
    flops: int | None = None
    bytes: int | None = None
    saved_bytes: int | None = None
    criterion: str = "manual"
    reason: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "lora", as_plan(self.lora))
        for name, known in (("norm", NORM_ORDERS), ("scale", SCALE_ORDERS), ("dm", DM_ORDERS)):
            if getattr(self, name) not in known:
                raise ValueError(
                    f"unknown DoRA {name} order {getattr(self, name)!r}; known: {', '.join(known)}"
                )
        if self.norm == "merged" and not self.lora.forward_variant.merged:
            raise ValueError(
                f"norm='merged' takes the norm from the merged weight a merged forward builds, "
                f"but the LoRA forward is {self.lora.forward!r}; use forward 'merged' or "
                "'merged_t', or norm='factored'"
            )
        if self.dm == "saved" and self.scale != "output":
            raise ValueError(
                "dm='saved' saves the unscaled output U, which only scale='output' forms; use "
                "scale='output', or dm='recompute'/'gradient'"
            )

    def check_dropout(self, dropout: bool) -> None:
        """Raise if this order is not exact with dropout active (see the module docstring)."""
        if not dropout:
            return
        bad = [
            f"{name}={getattr(self, name)!r}"
            for name, allowed in (("norm", "factored"), ("scale", "weight"))
            if getattr(self, name) != allowed
        ]
        if self.dm == "saved":
            bad.append("dm='saved'")
        if bad:
            raise ValueError(
                f"DoRA order {', '.join(bad)} is not available with dropout in training (PEFT "
                "computes the base output apart then); use norm='factored', scale='weight', "
                "dm='recompute' or 'gradient', or plan=None"
            )

    def to_dict(self) -> dict:
        return {
            "lora": self.lora.to_dict(),
            "norm": self.norm,
            "scale": self.scale,
            "dm": self.dm,
            "flops": self.flops,
            "bytes": self.bytes,
            "saved_bytes": self.saved_bytes,
            "criterion": self.criterion,
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, d: dict) -> DoRAPlan:
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        fields["lora"] = Plan.from_dict(d["lora"]) if isinstance(d["lora"], dict) else d["lora"]
        return cls(**fields)


def as_dora_plan(plan: DoRAPlan, *, dropout: bool = False) -> DoRAPlan:
    """``plan`` checked to be exact with ``dropout`` (a TypeError for anything not a DoRAPlan)."""
    if not isinstance(plan, DoRAPlan):
        raise TypeError(f"expected a runlora.ops.DoRAPlan, got {plan!r}")
    plan.check_dropout(dropout)
    return plan


# --- cost model -----------------------------------------------------------------------------


def _pass(label: str, m: int, n: int, reads: int = 1) -> Product:
    return Product(label, m, n, 0, reads=reads)


def _dequantize(p: Problem) -> tuple[Product, ...]:
    return (_pass("dequantize W", p.out_features, p.in_features),) if p.quantized else ()


def dora_forward_cost(plan: DoRAPlan, p: Problem) -> Cost:
    """Forward products of ``plan`` on ``p`` (``p.dropout``: dropout active in training)."""
    n, i, o, r = p.n, p.in_features, p.out_features, p.r
    inner = replace(p, dropout=False)  # the LoRA pair always sees one input
    cost = plan.lora.forward_variant.cost(inner)
    prods: list[Product] = []
    peak = 0
    if plan.norm == "factored":
        prods += [
            Product("W Aᵀ (norm)", o, r, i),
            Product("A Aᵀ (norm)", r, r, i),
            Product("B (A Aᵀ) (norm)", o, r, r),
            _pass("norm rows", o, r, reads=3),
        ]
    else:
        prods.append(_pass("‖W'‖ rows", o, i))
    if p.dropout:
        prods += [
            _pass("dropout mask", n, i),
            Product("X Wᵀ", n, o, i),
            _pass("h ⊙ W", o, i),
            _pass("Y += L (h ⊙ W)ᵀ + ...", n, o, reads=2),
        ]
        peak = o * i + n * o
    elif plan.scale == "weight":
        prods.append(_pass("g ⊙ W", o, i))
        peak = o * i
    else:
        prods.append(_pass("Y = g ⊙ U + bias", n, o))
    return Cost(cost.products + tuple(prods), max(cost.peak_elements, peak))


def dora_backward_cost(plan: DoRAPlan, p: Problem, magnitude_grad: bool = True) -> Cost:
    """Backward products of ``plan`` on ``p``; ``magnitude_grad``: dm is computed."""
    n, i, o, r = p.n, p.in_features, p.out_features, p.r
    inner = replace(p, dropout=False)
    cost = plan.lora.backward_variant.cost(inner)
    prods: list[Product] = []
    peak = 0
    if p.dropout and (p.needs_input_grad or p.needs_lora_grad or magnitude_grad):
        prods += [_pass("dropout mask", n, i), _pass("L = X ⊙ keep", n, i)]
    if p.needs_input_grad:
        prods.append(_pass("h ⊙ W" if p.dropout else "g ⊙ W", o, i))
        peak = o * i
        if p.dropout:
            prods += [Product("dX = dY W", n, i, o), _pass("dX += keep ⊙ dL", n, i, reads=2)]
    if p.needs_lora_grad:
        prods.append(_pass("dB = g ⊙ dB°", o, r))
    if magnitude_grad:
        if plan.dm == "saved":
            prods.append(_pass("Σ dY ⊙ U", n, o, reads=2))
        else:
            if p.quantized and not p.needs_input_grad:
                prods += _dequantize(p)
            if plan.dm == "recompute":
                prods += [Product("L Wᵀ (dm)", n, o, i), _pass("Σ dY ⊙ L Wᵀ", n, o, reads=2)]
                peak = max(peak, n * o)
            else:
                prods += [Product("G = dYᵀ L (dm)", o, i, n), _pass("Σ G ⊙ W", o, i, reads=2)]
                peak = max(peak, 2 * o * i if p.needs_input_grad else o * i)
            if not p.needs_lora_grad:
                prods += [Product("L Aᵀ (dm)", n, r, i), Product("dYᵀ (L Aᵀ) (dm)", o, r, n)]
            prods.append(_pass("Σ dB° ⊙ B", o, r, reads=2))
    return Cost(cost.products + tuple(prods), max(cost.peak_elements, peak))


def dora_cost(plan: DoRAPlan, p: Problem, magnitude_grad: bool = True) -> Cost:
    """Forward + backward products of ``plan`` on ``p``."""
    return dora_forward_cost(plan, p) + dora_backward_cost(plan, p, magnitude_grad)


def saved_elements(
    plan: DoRAPlan, p: Problem, magnitude_grad: bool = True, keep_xa: bool = False
) -> int:
    """Elements the op saves for backward, parameters not counted: x, n ``(out,)``, and U
    ``(N, out)`` with ``dm="saved"``, X Aᵀ ``(N, r)`` with ``keep_xa``."""
    saved = p.n * p.in_features + p.out_features
    if magnitude_grad and plan.dm == "saved":
        saved += p.n * p.out_features
    if keep_xa:
        saved += p.n * p.r
    return saved


# --- choosing the DoRA orders for a LoRA pair ------------------------------------------------


def dora_orders(lora: Plan, dropout: bool = False, save_output: bool = True) -> list[DoRAPlan]:
    """Every DoRA order exact for ``lora`` with ``dropout``; ``save_output=False`` leaves out
    ``dm="saved"``. Listed cheapest-in-memory first (the tie-break order)."""
    norms = ("merged", "factored") if lora.forward_variant.merged and not dropout else ("factored",)
    scales = ("weight",) if dropout else ("weight", "output")
    dms = ("gradient", "recompute") + (("saved",) if save_output and not dropout else ())
    return [
        DoRAPlan(lora, norm, scale, dm)
        for norm in norms
        for scale in scales
        for dm in dms
        if not (dm == "saved" and scale != "output")
    ]


_chosen: dict[tuple, DoRAPlan] = {}
_CHOSEN_MAX = 4096


def choose_dora_plan(
    lora: Plan,
    p: Problem,
    itemsize: int = 4,
    magnitude_grad: bool = True,
    save_output: bool = True,
) -> DoRAPlan:
    """The DoRA orders for LoRA pair ``lora`` on ``p``: fewest FLOPs, then fewest bytes moved,
    then fewest saved, then the lowest peak (``p.dropout``: dropout active in training).
    Memoised per argument set.

    By that rule ``dm="saved"``, which needs no extra product, wins whenever it is allowed
    (``save_output``); without it ``gradient`` beats ``recompute`` when N > in (its temporary
    is ``(out, in)`` rather than ``(N, out)``). g goes into the weight's rows when in < N (the
    ``(out, in)`` pass is the smaller), else onto the output; a merged forward's merged weight
    gives the norm.
    """
    key = (lora, p, itemsize, magnitude_grad, save_output)
    plan = _chosen.get(key)
    if plan is None:
        if len(_chosen) >= _CHOSEN_MAX:
            _chosen.clear()
        plan = _chosen[key] = _cheapest(lora, p, itemsize, magnitude_grad, save_output)
    return plan


def _cheapest(lora, p, itemsize, magnitude_grad, save_output) -> DoRAPlan:
    best = None
    for cand in dora_orders(lora, p.dropout, save_output):
        cost = dora_cost(cand, p, magnitude_grad)
        saved = saved_elements(cand, p, magnitude_grad)
        key = (cost.flops, cost.bytes(itemsize), saved, cost.peak_elements)
        if best is None or key < best[0]:
            best = (key, cand, cost, saved)
    _, cand, cost, saved = best
    return replace(
        cand,
        flops=cost.flops,
        bytes=cost.bytes(itemsize),
        saved_bytes=saved * itemsize,
        criterion="flops",
        reason=(
            f"for LoRA pair {lora.forward}/{lora.backward}: fewest FLOPs ({cost.flops:.3g}), then "
            f"fewest bytes{'' if save_output else '; output saving off'}"
        ),
    )
