"""The fused multi-projection LoRA op: K adapters that read one input x (q/k/v, gate/up) as one
autograd Function, exact to K ``lora_linear`` calls.

    Y_k = X W_kᵀ + s_k·(dropout_k(X) A_kᵀ) B_kᵀ (+ bias_k),   k = 1..K

Each projection keeps its own ``Plan`` (merged or split forward, its backward order); the
skinny products on the shared x are stacked over the projections that may share it, so x is
read once per stacked product instead of K times (which products, and their cost, are in
``runlora.ops.fused_variants``). The base products stay per projection on each W_k as it is:
no W is concatenated or copied.

Dropout. PEFT draws one mask per adapter, so a projection with dropout > 0 does not share the
masked input: it draws its own seed (in projection order, from torch's default generator, as K
``lora_linear`` calls in that order would) and runs the single op's orders alone
(``run_forward`` / ``run_backward``) on its own regenerated mask.

What it keeps for backward: x once (as given), the parameters, and one int seed per projection
with dropout. Never an ``(N, out)`` tensor, an X Aᵀ, a mask or a dropped copy of x.

Gradients. dX is one ``(N, in)`` buffer that every projection's terms are added into; the
stacked dA ``(Σr, in)`` is returned as row views, one per A_k. The fused backward runs the
LoRA gradients before dX, whatever a plan's ``dx_first`` says (a G_k is freed before dX
starts). The stacked Z rows are always formed as s_k·B_kᵀ dY_kᵀ (the ``"tuned"`` layout);
the per-projection products (dB, G) follow each plan's layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from . import function
from .fused_variants import backward_schedule, forward_schedule
from .plan import Plan, as_plan
from .products import addmm_into, db_from_la, la_product, merge_weight
from .remake import remake_of
from .variants import Problem

__all__ = ["fused_lora_linear"]


@dataclass(frozen=True)
class _Spec:
    """The non-tensor arguments of one fused call (dropouts already 0 outside training)."""

    plans: tuple[Plan, ...]
    scalings: tuple[float, ...]
    dropouts: tuple[float, ...]

    @property
    def dropped(self) -> tuple[bool, ...]:
        return tuple(p > 0.0 for p in self.dropouts)


def _stack_rows(ts: Sequence[Tensor]) -> Tensor:
    """[t_1; ...; t_K] along dim 0; a single tensor as it is (no copy)."""
    return ts[0] if len(ts) == 1 else torch.cat(list(ts), 0)


def _split_forward(name: str, x2d, w, b, bias, s: float, la: Tensor) -> Tensor:
    """Y ``(N, out)`` of a split forward order from a given X Aᵀ ``(N, r)`` (may be a strided
    column slice of the stacked product); ``run_forward``'s split branch without the L Aᵀ."""
    if name == "sequential":
        y = torch.nn.functional.linear(x2d, w, bias)
        return addmm_into(y, la, b.t(), alpha=s)
    y = la @ b.t()  # lowrank_first
    addmm_into(y, x2d, w.t(), beta=s)
    if bias is not None:
        y.add_(bias)
    return y


def _forward(spec: _Spec, x, weights, lora_as, lora_bs, biases):
    """The outputs ``(..., out_k)`` and the dropout seeds (None where p_k = 0)."""
    x2d = x.reshape(-1, x.shape[-1])
    sched = forward_schedule(spec.plans, spec.dropped)
    ys: list[Tensor | None] = [None] * len(weights)
    seeds: list[int | None] = [None] * len(weights)
    if sched.stack:
        la_all = la_product(x2d, _stack_rows([lora_as[k] for k in sched.stack]))  # (N, Σr)
        off = 0
        for k in sched.stack:
            r = lora_as[k].shape[0]
            ys[k] = _split_forward(
                spec.plans[k].forward,
                x2d,
                weights[k],
                lora_bs[k],
                biases[k],
                spec.scalings[k],
                la_all[:, off : off + r],
            )
            off += r
        del la_all
    for k in sched.alone:
        s, p, lx = spec.scalings[k], spec.dropouts[k], x2d
        if p > 0.0:
            seeds[k] = function._new_seed()
            lx = function._draw_mask(x2d, p, seeds[k]).apply(x2d)
            s = s / (1.0 - p)
        ys[k], _ = function.run_forward(
            spec.plans[k].forward_variant, x2d, weights[k], lora_as[k], lora_bs[k], biases[k], s, lx
        )
        del lx
    if x.dim() != 2:
        ys = [y.reshape(*x.shape[:-1], y.shape[-1]) for y in ys]
    return tuple(ys), tuple(seeds)


class _FusedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec: _Spec, remake, x, *params):
        kk = len(spec.plans)
        weights, lora_as, lora_bs, biases = (params[i * kk : (i + 1) * kk] for i in range(4))
        ys, seeds = _forward(spec, x, weights, lora_as, lora_bs, biases)
        kept = (x,) if remake is None else remake.tensors  # x formed again in backward
        ctx.save_for_backward(*weights, *lora_as, *lora_bs, *kept)
        ctx.remake = None if remake is None else remake.claim()  # its Recipe
        ctx.x_shape = x.shape
        # As K separate ops: an output depends on x and its own adapter only.
        ctx.mark_non_differentiable(
            *(ys[k] for k in range(kk) if not _requires_grad(x, lora_as[k], lora_bs[k], biases[k]))
        )
        ctx.spec, ctx.seeds = spec, seeds
        ctx.set_materialize_grads(False)
        return ys

    @staticmethod
    def backward(ctx, *grad_outs):
        spec, seeds = ctx.spec, ctx.seeds
        kk = len(spec.plans)
        saved = ctx.saved_tensors
        weights, lora_as, lora_bs = (saved[i * kk : (i + 1) * kk] for i in range(3))
        kept = saved[3 * kk :]
        x = kept[0] if ctx.remake is None else function._remade(ctx.remake, kept, ctx.x_shape)
        needs = ctx.needs_input_grad
        need_x = needs[2]
        need_a, need_b, need_bias = (needs[3 + i * kk : 3 + (i + 1) * kk] for i in (1, 2, 3))
        needs_lora = [need_a[k] or need_b[k] for k in range(kk)]
        x2d = x.reshape(-1, x.shape[-1])
        dys = [None if g is None else g.reshape(-1, g.shape[-1]) for g in grad_outs]
        sched = backward_schedule(
            spec.plans, spec.dropped, needs_lora, need_x, [g is not None for g in dys]
        )
        da: list[Tensor | None] = [None] * kk
        db: list[Tensor | None] = [None] * kk
        dx: Tensor | None = None

        # Projections with dropout: the single op's backward on their own regenerated masks.
        for k in sched.alone:
            p = spec.dropouts[k]
            mask = function._draw_mask(x2d, p, seeds[k])
            lx = mask.apply(x2d) if needs_lora[k] else None
            dx_k, da[k], db[k] = function.run_backward(
                spec.plans[k].backward_variant,
                spec.plans[k].layout,
                dys[k],
                lambda w=weights[k]: w,
                lora_as[k],
                lora_bs[k],
                lx,
                s=spec.scalings[k] / (1.0 - p),
                mask=mask,
                need_x=need_x,
                need_lora=needs_lora[k],
            )
            del lx, mask
            if dx_k is not None:
                dx = dx_k if dx is None else dx.add_(dx_k)
            del dx_k

        # The others share x: Zᵀ = [s_k B_kᵀ dY_kᵀ] (Σr, N), dA's rows first, dX's rows last.
        ranks = [a.shape[0] for a in lora_as]
        rows = {}
        zt = None
        if sched.z_rows:
            zt = x2d.new_empty(sum(ranks[k] for k in sched.z_rows), x2d.shape[0])
            off = 0
            for k in sched.z_rows:
                rows[k] = zt[off : off + ranks[k]]
                torch.addmm(
                    rows[k], lora_bs[k].t(), dys[k].t(), beta=0, alpha=spec.scalings[k], out=rows[k]
                )
                off += ranks[k]
        stacked_a: dict[tuple[int, ...], Tensor] = {}

        def stack_a(ks: tuple[int, ...]) -> Tensor:
            if ks not in stacked_a:
                stacked_a[ks] = _stack_rows([lora_as[k] for k in ks])
            return stacked_a[ks]

        if sched.la_stack:
            la_all = la_product(x2d, stack_a(sched.la_stack))  # (N, Σr)
            off = 0
            for k in sched.la_stack:
                la = la_all[:, off : off + ranks[k]]
                db[k] = db_from_la(dys[k], la, spec.plans[k].layout).mul_(spec.scalings[k])
                off += ranks[k]
            del la_all
        for k in sched.g_parts:
            bwd, s = spec.plans[k].backward_variant, spec.scalings[k]
            g = dys[k].t() @ x2d  # (out_k, in)
            if bwd.da_from == "G":
                da[k] = (lora_bs[k].t() @ g).mul_(s)
            if bwd.db_from == "G":
                db[k] = (g @ lora_as[k].t()).mul_(s)
            del g
        if sched.da_stack:
            width = sum(ranks[k] for k in sched.da_stack)
            da_all = zt[:width] @ x2d  # (Σr, in), already scaled
            off = 0
            for k in sched.da_stack:
                da[k] = da_all[off : off + ranks[k]]
                off += ranks[k]

        for k in sched.dx_parts:
            w = weights[k]
            if spec.plans[k].backward_variant.merged:
                w = merge_weight(w, lora_as[k], lora_bs[k], spec.scalings[k])
            dx = dys[k] @ w if dx is None else addmm_into(dx, dys[k], w)
            del w
        if sched.dx_stack:
            width = sum(ranks[k] for k in sched.dx_stack)
            z = zt[zt.shape[0] - width :].t()  # (N, Σr)
            a_all = stack_a(sched.dx_stack)
            dx = z @ a_all if dx is None else addmm_into(dx, z, a_all)
        del zt, rows
        stacked_a.clear()

        if dx is not None:
            dx = dx.reshape(x.shape)
        dbias = [dys[k].sum(0) if need_bias[k] and dys[k] is not None else None for k in range(kk)]
        return (
            None,
            None,
            dx if need_x else None,
            *([None] * kk),
            *(da[k] if need_a[k] else None for k in range(kk)),
            *(db[k] if need_b[k] else None for k in range(kk)),
            *dbias,
        )


def _check_lengths(weights, lora_as, lora_bs, biases, scalings, dropouts, plans) -> int:
    seqs = {
        "weights": weights,
        "lora_As": lora_as,
        "lora_Bs": lora_bs,
        "biases": biases,
        "scalings": scalings,
        "dropouts": dropouts,
    }
    if plans is not None:
        seqs["plans"] = plans
    for name, seq in seqs.items():
        if isinstance(seq, (Tensor, str)) or not isinstance(seq, Sequence):
            raise TypeError(
                f"{name} must be a list or tuple with one entry per projection, got "
                f"{type(seq).__name__}"
            )
    lengths = {name: len(seq) for name, seq in seqs.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(
            "weights, lora_As, lora_Bs, biases, scalings, dropouts (and plans) need one entry "
            "per projection each, got lengths "
            + ", ".join(f"{k}={v}" for k, v in lengths.items())
            + " (pass None in biases for a projection without bias)"
        )
    if lengths["weights"] == 0:
        raise ValueError("fused_lora_linear needs at least one projection, got none")
    return lengths["weights"]


def _requires_grad(*tensors: Tensor | None) -> bool:
    return any(t is not None and t.requires_grad for t in tensors)


def _needs_graph(*tensors: Tensor | None) -> bool:
    """True if autograd would record the op: grad mode on and some input requiring grad."""
    return torch.is_grad_enabled() and _requires_grad(*tensors)


def fused_lora_linear(
    x: Tensor,
    weights: Sequence[Tensor],
    lora_As: Sequence[Tensor],
    lora_Bs: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    *,
    scalings: Sequence[float],
    dropouts: Sequence[float],
    training: bool = True,
    plans: Sequence[Plan | tuple[str, str] | None] | None = None,
) -> tuple[Tensor, ...]:
    """``lora_linear(x, weights[k], lora_As[k], lora_Bs[k], biases[k], scaling=scalings[k],
    dropout=dropouts[k], plan=plans[k])`` for every k, as one op that reads x once per stacked
    product (see the module docstring). Outputs and every gradient are those of the K calls;
    x's gradient is the sum over the projections.

    Args:
        x: the shared input, shape ``(..., in)``; any number of leading dims, contiguous or not.
        weights: K frozen base weights, ``(out_k, in)`` each, used as they are (never copied).
        lora_As: K tensors ``(r_k, in)``; ranks may differ (``rank_pattern``).
        lora_Bs: K tensors ``(out_k, r_k)``.
        biases: K optional biases ``(out_k,)`` (None for none); may be trainable.
        scalings: K LoRA scalings s_k.
        dropouts: K dropout probabilities on each adapter's own LoRA input, each with its own
            mask (PEFT's semantics), applied only when ``training``.
        training: as in ``F.dropout``.
        plans: None, or K entries each a ``runlora.Plan``, a ``(forward, backward)`` pair or None
            (None plans that projection as ``lora_linear(plan=None)`` would).

    Returns:
        A tuple of K tensors, ``(..., out_k)`` each.
    """
    kk = _check_lengths(weights, lora_As, lora_Bs, biases, scalings, dropouts, plans)
    cast_to = function._autocast_dtype(x)
    if cast_to is not None:
        x = function._autocast_cast(x, cast_to)
        weights, lora_As, lora_Bs, biases = (
            [function._autocast_cast(t, cast_to) for t in seq]
            for seq in (weights, lora_As, lora_Bs, biases)
        )
    for k in range(kk):
        try:
            function.check_args(
                x, weights[k], lora_As[k], lora_Bs[k], biases[k], scalings[k], dropouts[k]
            )
        except (TypeError, ValueError) as err:
            raise type(err)(f"projection {k}: {err}") from None
    drop = tuple(float(p) if training else 0.0 for p in dropouts)
    needs_x = x.requires_grad and torch.is_grad_enabled()
    n = max(1, x.numel() // x.shape[-1])
    resolved = []
    for k in range(kk):
        plan = None if plans is None else plans[k]
        if plan is None:
            if function._plan_resolver is None:
                raise RuntimeError("no plan resolver installed: pass plans=, or import runlora")
            out_f, in_f = weights[k].shape
            problem = Problem(
                n,
                in_f,
                out_f,
                lora_As[k].shape[0],
                needs_input_grad=needs_x,
                bias=biases[k] is not None,
                dropout=drop[k] > 0.0,
            )
            plan = function._plan_resolver(problem, x.dtype, x.device)
        else:
            try:
                plan = as_plan(plan, dropout=drop[k] > 0.0)
            except (TypeError, ValueError) as err:
                raise type(err)(f"projection {k}: {err}") from None
        resolved.append(plan)
    spec = _Spec(tuple(resolved), tuple(float(s) for s in scalings), drop)
    params = (*weights, *lora_As, *lora_Bs, *biases)
    with torch.autocast(x.device.type, enabled=False) if cast_to is not None else nullcontext():
        if not _needs_graph(x, *params):  # inference: no autograd node at all
            return _forward(spec, x, weights, lora_As, lora_Bs, biases)[0]
        return _FusedFunction.apply(spec, remake_of(x), x, *params)
