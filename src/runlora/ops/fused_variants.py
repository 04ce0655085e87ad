"""What the fused multi-projection LoRA op stacks, and what it costs.

K adapters that read one input x ``(N, in)`` (q/k/v, gate/up): projection k has its frozen
W_k ``(out_k, in)``, A_k ``(r_k, in)``, B_k ``(out_k, r_k)``, scaling s_k, dropout p_k and its own
``Plan``. The skinny products on the shared x are stacked over the projections that may share
it (dropout 0, so that their LoRA input is x itself):

    forward      X [A_1; ...; A_K]ᵀ        one (N, Σr) product for the split forward orders
    backward     [s_1 Z_1 ... s_K Z_K]ᵀ X   dA for the ``da_from="Z"`` orders, one product
                 X [A_1; ...; A_K]ᵀ        the L Aᵀ recompute for the ``db_from="LA"`` orders
                 [s_k Z_k] [A_1; ...]      the low-rank part of dX for the split dX orders

Everything else stays per projection: the base products (each W_k is its own frozen tensor,
never concatenated), Z_k = dY_k B_k, G_k = dY_kᵀ X, the merged forward or dX where the plan
chooses it, and every projection with dropout > 0, which draws its own mask (PEFT draws one
per adapter) and runs the single op's orders alone on its masked input.

``forward_schedule`` / ``backward_schedule`` say which projection goes where; the op and the
cost model both read them, so the model counts exactly what the op runs. ``fused_cost`` and
``unfused_cost`` are ``runlora.ops.variants.Cost`` s of forward + backward, for a planner to
compare the fused op with K separate ``lora_linear`` calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .plan import Plan
from .variants import Cost, Problem, Product

__all__ = [
    "FusedProblem",
    "ForwardSchedule",
    "BackwardSchedule",
    "forward_schedule",
    "backward_schedule",
    "fused_forward_cost",
    "fused_backward_cost",
    "fused_cost",
    "unfused_cost",
]


@dataclass(frozen=True)
class FusedProblem:
    """The K projections of one fused call, one ``Problem`` each, all with the same N, in
    and ``needs_input_grad`` (they read the same x)."""

    parts: tuple[Problem, ...]

    def __post_init__(self) -> None:
        parts = tuple(self.parts)
        object.__setattr__(self, "parts", parts)
        if not parts:
            raise ValueError("a FusedProblem needs at least one projection")
        first = parts[0]
        for k, p in enumerate(parts):
            if (p.n, p.in_features, p.needs_input_grad) != (
                first.n,
                first.in_features,
                first.needs_input_grad,
            ):
                raise ValueError(
                    f"projection {k} has (n, in_features, needs_input_grad) = "
                    f"({p.n}, {p.in_features}, {p.needs_input_grad}), projection 0 has "
                    f"({first.n}, {first.in_features}, {first.needs_input_grad}): fused "
                    "projections read one x"
                )
            if p.quantized:
                raise ValueError(f"projection {k} is quantized; the fused op takes plain weights")

    @property
    def n(self) -> int:
        return self.parts[0].n

    @property
    def in_features(self) -> int:
        return self.parts[0].in_features

    @property
    def needs_input_grad(self) -> bool:
        return self.parts[0].needs_input_grad


@dataclass(frozen=True)
class ForwardSchedule:
    """``stack``: projections whose X A_kᵀ come from one stacked product (dropout 0, split
    forward order). ``alone``: the others (merged forward, or dropout), each by its own order."""

    stack: tuple[int, ...]
    alone: tuple[int, ...]


def forward_schedule(plans: Sequence[Plan], dropout: Sequence[bool]) -> ForwardSchedule:
    stack = tuple(
        k for k, plan in enumerate(plans) if not dropout[k] and not plan.forward_variant.merged
    )
    return ForwardSchedule(stack, tuple(k for k in range(len(plans)) if k not in stack))


@dataclass(frozen=True)
class BackwardSchedule:
    """Which projection's backward products run where (indices in projection order).

    Attributes:
        alone: projections with dropout, each through ``run_backward`` on its own masked input.
        z_rows: the projections whose s_k·Z_kᵀ rows make up the stacked Zᵀ ``(Σr, N)``, ordered
            so that ``da_stack`` is a prefix of it and ``dx_stack`` a suffix.
        da_stack: dA from one [s_k Z_k]ᵀ X product (``da_from="Z"``).
        dx_stack: the low-rank part of dX from one [s_k Z_k] [A_k] product (split dX).
        la_stack: dB's X A_kᵀ from one recomputed X [A_k]ᵀ product (``db_from="LA"``).
        g_parts: projections that form G_k = dY_kᵀ X (``da_from`` or ``db_from`` is ``"G"``).
        dx_parts: projections that add dY_k W_k (or dY_k (W_k + s_k B_k A_k)) to dX.
    """

    alone: tuple[int, ...]
    z_rows: tuple[int, ...]
    da_stack: tuple[int, ...]
    dx_stack: tuple[int, ...]
    la_stack: tuple[int, ...]
    g_parts: tuple[int, ...]
    dx_parts: tuple[int, ...]


def backward_schedule(
    plans: Sequence[Plan],
    dropout: Sequence[bool],
    needs_lora: Sequence[bool],
    needs_x: bool,
    active: Sequence[bool] | None = None,
) -> BackwardSchedule:
    """The schedule for one backward. ``active[k]`` is False when output k got no gradient
    (the projection then does nothing); None means all are active."""
    k_all = range(len(plans))
    live = [(active is None or active[k]) and (needs_lora[k] or needs_x) for k in k_all]
    alone = tuple(k for k in k_all if live[k] and dropout[k])
    shared = [k for k in k_all if live[k] and not dropout[k]]
    bwd = {k: plans[k].backward_variant for k in shared}
    da = [k for k in shared if needs_lora[k] and bwd[k].da_from == "Z"]
    dx = [k for k in shared if needs_x and bwd[k].dx == "split"]
    z_rows = (
        tuple(k for k in da if k not in dx)
        + tuple(k for k in da if k in dx)
        + tuple(k for k in dx if k not in da)
    )
    return BackwardSchedule(
        alone=alone,
        z_rows=z_rows,
        da_stack=tuple(k for k in z_rows if k in da),
        dx_stack=tuple(k for k in z_rows if k in dx),
        la_stack=tuple(k for k in shared if needs_lora[k] and bwd[k].db_from == "LA"),
        g_parts=tuple(
            k for k in shared if needs_lora[k] and "G" in (bwd[k].da_from, bwd[k].db_from)
        ),
        dx_parts=tuple(k for k in shared if needs_x),
    )


def _pass(label: str, m: int, n: int, reads: int = 1) -> Product:
    return Product(label, m, n, 0, reads)


def _stacked_a(label: str, parts: Sequence[Problem], ks: Sequence[int]) -> tuple[Product, ...]:
    # One A_k is used as it is; two or more are copied into one (Σr, in) tensor.
    if len(ks) < 2:
        return ()
    return (_pass(label, sum(parts[k].r for k in ks), parts[ks[0]].in_features),)


def _check(problem: FusedProblem, plans: Sequence[Plan]) -> None:
    if len(plans) != len(problem.parts):
        raise ValueError(f"{len(plans)} plans for {len(problem.parts)} projections")


def fused_forward_cost(problem: FusedProblem, plans: Sequence[Plan]) -> Cost:
    """The fused forward's products: the stacked X [A_k]ᵀ once at its combined width."""
    _check(problem, plans)
    parts, n, i = problem.parts, problem.n, problem.in_features
    sched = forward_schedule(plans, [p.dropout for p in parts])
    prods: list[Product] = list(_stacked_a("stack A", parts, sched.stack))
    peak = 0
    if sched.stack:
        width = sum(parts[k].r for k in sched.stack)
        prods.append(Product("X [A_k]ᵀ", n, width, i))
        peak = n * width
        for k in sched.stack:
            o, r = parts[k].out_features, parts[k].r
            prods += (Product("X W_kᵀ", n, o, i), Product("(X A_kᵀ) B_kᵀ", n, o, r))
    for k in sched.alone:
        cost = plans[k].forward_variant.cost(parts[k])
        prods += cost.products
        peak = max(peak, cost.peak_elements)
    return Cost(tuple(prods), peak_elements=peak)


def fused_backward_cost(problem: FusedProblem, plans: Sequence[Plan]) -> Cost:
    """The fused backward's products: the stacked dA, L Aᵀ and low-rank dX products once each.
    ``peak_elements`` is the largest set of temporaries alive together (the stacked Zᵀ and
    X [A_k]ᵀ with one G_k or merged weight, or a dropout projection's own), not counting dX."""
    _check(problem, plans)
    parts, n, i = problem.parts, problem.n, problem.in_features
    sched = backward_schedule(
        plans,
        [p.dropout for p in parts],
        [p.needs_lora_grad for p in parts],
        problem.needs_input_grad,
    )
    prods: list[Product] = []
    peak = 0
    dx_started = False
    for k in sched.alone:
        cost = plans[k].backward_variant.cost(parts[k])
        prods += cost.products
        peak = max(peak, cost.peak_elements + (n * i if dx_started else 0))
        if problem.needs_input_grad:
            if dx_started:
                prods.append(_pass("dX += dX_k", n, i, reads=2))
            dx_started = True
    z_width = sum(parts[k].r for k in sched.z_rows)
    for k in sched.z_rows:
        p = parts[k]
        prods.append(Product("s·Z_k = s·dY_k B_k", n, p.r, p.out_features))
    la_width = sum(parts[k].r for k in sched.la_stack)
    if sched.la_stack:
        prods += _stacked_a("stack A", parts, sched.la_stack)
        prods.append(Product("X [A_k]ᵀ", n, la_width, i))
    for k in sched.g_parts:
        p = parts[k]
        prods.append(Product("G_k = dY_kᵀ X", p.out_features, i, n))
        peak = max(peak, n * (z_width + la_width) + p.out_features * i)
    if sched.da_stack:
        prods.append(Product("dA = [s·Z_k]ᵀ X", sum(parts[k].r for k in sched.da_stack), i, n))
    for k in sched.g_parts:
        p, bwd = parts[k], plans[k].backward_variant
        if bwd.da_from == "G":
            prods.append(Product("dA_k = Bᵀ G_k", p.r, i, p.out_features))
        if bwd.db_from == "G":
            prods.append(Product("dB_k = G_k Aᵀ", p.out_features, p.r, i))
    for k in sched.la_stack:
        p = parts[k]
        prods.append(Product("dB_k = dY_kᵀ (X A_kᵀ)", p.out_features, p.r, n))
    for k in sched.dx_parts:
        p = parts[k]
        if plans[k].backward_variant.merged:
            prods.append(Product("W_k + s·B_k A_k", p.out_features, i, p.r))
            peak = max(peak, n * z_width + p.out_features * i)
        prods.append(Product("dX += dY_k W_k", n, i, p.out_features))
    if sched.dx_stack:
        if sched.dx_stack != sched.la_stack:
            prods += _stacked_a("stack A", parts, sched.dx_stack)
        width = sum(parts[k].r for k in sched.dx_stack)
        prods.append(Product("dX += [s·Z_k] [A_k]", n, i, width))
    peak = max(peak, n * (z_width + la_width))
    return Cost(tuple(prods), peak_elements=peak)


def fused_cost(problem: FusedProblem, plans: Sequence[Plan]) -> Cost:
    """Forward + backward of the fused op on ``problem`` with projection k run by ``plans[k]``."""
    return fused_forward_cost(problem, plans) + fused_backward_cost(problem, plans)


def unfused_cost(problem: FusedProblem, plans: Sequence[Plan]) -> Cost:
    """Forward + backward of K separate ``lora_linear`` calls with the same plans, and the K - 1
    passes in which autograd sums their dX."""
    _check(problem, plans)
    total = Cost(())
    for p, plan in zip(problem.parts, plans, strict=True):
        total = total + plan.forward_variant.cost(p) + plan.backward_variant.cost(p)
    if problem.needs_input_grad and len(problem.parts) > 1:
        n, i = problem.n, problem.in_features
        sums = (_pass("dX sum (autograd)", n, i, reads=2),) * (len(problem.parts) - 1)
        total = total + Cost(sums)
    return total
