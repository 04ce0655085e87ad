"""DoRA as one autograd Function: PEFT's ``use_dora=True`` layer math, in planned orders.

::

    x ──► W (frozen) ─────────────┐
      │                          (+) ──► × g = m / ‖W + s·B A‖ (per output row) ──► (+ bias) ──► y
      └─► A (r, in) ──► B ──► × s ┘

The orders and their costs are in ``runlora.ops.dora_variants``. The products of W, A and B run
through LoRA's own orders (``runlora.ops.function.run_forward`` / ``run_backward``) with g folded
into the rows of W and B where needed: the backward of ``y = g ⊙ U + bias`` is LoRA's backward on
(dY, g ⊙ W, g ⊙ B), whose dB° = s·dYᵀ (X Aᵀ) is then scaled by g, and whose unscaled dB° gives
dm's rank-r term for free. No division by g or m anywhere, so m = 0 is exact.

What it keeps for backward: x (as given), the parameters, the row norms n ``(out,)``, with
dropout one int seed (the mask is regenerated, see ``runlora.ops.dropout``), and U ``(N, out)``
only when the order is ``dm="saved"``.

Precision. n is accumulated in fp32 for bf16/fp16 inputs (in the inputs' dtype otherwise) and
never rounded to the inputs' dtype; ``g ⊙ W`` and ``g ⊙ U`` are computed in fp32 and rounded once.
PEFT computes W + s·B A in the weight's dtype (each element rounded), takes its norm and rounds
the norm and g to that dtype, so in bf16 its n is off the exact norm (of the bf16 inputs) by up to
about 2⁻⁸ relative, where this op's is off by about 2⁻⁹·|2s·rowsum(B ⊙ W Aᵀ)| / n² (W Aᵀ is the
one product rounded to bf16). Measured at in = 512, r = 8 and 64: PEFT 3.6–3.9e-3, this op
3e-5–1.6e-4. So the op is closer to the exact value, and within bf16's precision of PEFT. In
fp32/fp64 the two agree to rounding. Both lose accuracy alike when a row of s·B A nearly cancels
the row of W (n ≪ ‖W_j‖): the error of n² is relative to ‖W_j‖² + |s·B A|² terms, not to n².

The ‖W‖² cache. The ``factored`` norm needs ‖W_j‖² of the frozen weight; it is computed once
and kept beside the weight (weakly: it goes when the weight goes), keyed on the weight's storage
(a weak reference, so a freed and reused address never matches), offset, shape, strides, dtype
and torch's version counter. In-place edits (``weight.add_``, ``copy_``, ``load_state_dict``) bump
the counter, and ``weight.data = t`` (PEFT's merge/unmerge) swaps the storage, so both rebuild it.
An edit through ``weight.data`` in place (``weight.data += d``, as PEFT's plain-LoRA merge does)
bypasses the counter: call ``forget_weight_norms(weight)`` after one. Under ``torch.compile``
the cache is bypassed.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext

import torch
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.weak import WeakIdKeyDictionary

from . import function
from .dora_variants import DoRAPlan, as_dora_plan, choose_dora_plan
from .dropout import DropMask, draw_mask
from .plan import Plan, as_plan
from .products import addmm_into, db_from_la, la_product, merge_weight
from .remake import remake_of
from .variants import Problem

__all__ = ["dora_linear", "weight_norms", "forget_weight_norms"]

#: How many (view, dtype) entries one weight's cache keeps (a fused weight has a few slices).
_ENTRIES_PER_WEIGHT = 8
_squared_norms: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _owner(t: Tensor) -> Tensor:
    return t._base if t._base is not None else t


def _row_squares(w: Tensor, acc: torch.dtype) -> Tensor:
    """‖W_j‖² ``(out,)`` in ``acc``, computed (what the cache keeps)."""
    return torch.linalg.vector_norm(w, dim=1, dtype=acc).square_()


def _squared_row_norms(w: Tensor, acc: torch.dtype, source: Tensor | None) -> Tensor:
    """‖W_j‖² ``(out,)`` in ``acc``, cached per frozen weight. ``source`` stands for ``w`` in
    the key when ``w`` is a fresh dequantized copy (the quantized parameter), else None."""
    src = w if source is None else source
    if torch.compiler.is_compiling() or src.is_inference():
        return _row_squares(w, acc)
    storage = src.untyped_storage()
    meta = (src.storage_offset(), tuple(src.shape), src.stride(), src.dtype, w.dtype, acc)
    entries = _squared_norms.get(_owner(src))
    if entries is None:
        entries = _squared_norms[_owner(src)] = []
    for ref, entry_meta, version, value in entries:
        if (
            entry_meta == meta
            and version == src._version
            and not ref.expired()
            and ref.cdata == storage._cdata
        ):
            return value
    value = _row_squares(w, acc)
    if len(entries) >= _ENTRIES_PER_WEIGHT:
        entries.clear()
    entries.append((StorageWeakRef(storage), meta, src._version, value))
    return value


def forget_weight_norms(weight: Tensor | None = None) -> None:
    """Drop the cached ‖W‖² of ``weight`` (of every weight if None). Only needed after an edit
    that bypasses torch's version counter: ``weight.data += d``, ``weight.data.copy_(t)``."""
    if weight is None:
        _squared_norms.clear()
    else:
        _squared_norms.pop(_owner(weight), None)


def _factored_norms(w, a, b, s: float, source: Tensor | None) -> Tensor:
    """n = ‖W + s·B A‖ per row ``(out,)``: ‖W‖² + 2s·rowsum(B ⊙ W Aᵀ) + s²·rowsum(B AAᵀ ⊙ B)."""
    acc = _acc_dtype(w.dtype)
    wa = (w @ a.t()).to(acc)  # (out, r)
    a32, b32 = a.detach().to(acc), b.detach().to(acc)
    cross = (b32 * wa).sum(1)
    quad = ((b32 @ (a32 @ a32.t())) * b32).sum(1)  # (out,)
    w2 = _squared_row_norms(w, acc, source)
    n2 = w2 + (2.0 * s) * cross + (s * s) * quad
    # Where a row of W and of s·B A nearly cancel, the round-off of the terms (W Aᵀ comes out
    # in w's dtype) is as large as n² itself and can leave it at or below 0: the norm is known
    # there only to about eps·T, T² the terms' size. Floor it there instead of dividing by 0.
    eps = torch.finfo(w.dtype).eps
    t2 = w2 + (2.0 * abs(s)) * (b32.abs() * wa.abs()).sum(1) + (s * s) * quad
    return torch.maximum(n2, t2.mul_(eps * eps)).sqrt_()


def weight_norms(
    weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, *, source: Tensor | None = None
) -> Tensor:
    """‖W + s·B A‖ per output row, shape ``(out,)``, in fp32 for bf16/fp16 (else the weight's
    dtype), without forming B A: what the op divides the magnitude by (PEFT's ``weight_norm``).

    Args:
        weight: ``(out, in)``. lora_A: ``(r, in)``. lora_B: ``(out, r)``.
        source: for a dequantized copy of a quantized weight, the quantized parameter (the key
            of the ‖W‖² cache).
    """
    with torch.no_grad():
        return _factored_norms(weight, lora_A, lora_B, float(scaling), source)


def _scale_rows(w: Tensor, g: Tensor, owned: bool) -> Tensor:
    """g ⊙ w, rows of ``w`` ``(out, k)`` scaled by ``g`` ``(out,)``, rounded once to w's dtype;
    in place when ``owned`` (a fresh buffer), else fresh."""
    g2 = g[:, None]
    if owned:
        return w.mul_(g2)
    return torch.mul(w, g2, out=torch.empty_like(w, memory_format=torch.contiguous_format))


def _scale_output(u: Tensor, g: Tensor, bias: Tensor | None, keep_u: bool) -> Tensor:
    """y = g ⊙ U + bias ``(N, out)``, in U's buffer unless U is kept for backward."""
    out = torch.empty_like(u) if keep_u else u
    if bias is None:
        return torch.mul(u, g, out=out)
    return torch.addcmul(bias, u, g, out=out)


def _merged_forward(fwd: str, x2d, w, a, b, bias, s, m, scale, keep_u, w_owned):
    """The ``norm="merged"`` forward: W' = W + s·B A (or W'ᵀ for ``merged_t``), n from its rows,
    then g folded into W' (``scale="weight"``) or applied to U = x W'ᵀ. Returns (y, n, U)."""
    acc = _acc_dtype(w.dtype)
    if fwd == "merged":
        wm = merge_weight(w, a, b, s, w_owned)  # (out, in)
        n = torch.linalg.vector_norm(wm, dim=1, dtype=acc)
        g = m.to(acc) / n
        if scale == "weight":
            return torch.nn.functional.linear(x2d, wm.mul_(g[:, None]), bias), n, None
        u = torch.nn.functional.linear(x2d, wm)
    else:
        if w_owned:
            wt = addmm_into(w.t(), a.t(), b.t(), alpha=s)  # (in, out), in w's buffer
        else:
            wt = torch.addmm(w.t(), a.t(), b.t(), alpha=s)  # (in, out)
        n = torch.linalg.vector_norm(wt, dim=0, dtype=acc)
        g = m.to(acc) / n
        if scale == "weight":
            wt.mul_(g)
            return (x2d @ wt if bias is None else torch.addmm(bias, x2d, wt)), n, None
        u = x2d @ wt
    return _scale_output(u, g, bias, keep_u), n, u if keep_u else None


def _forward(x, weight, lora_a, lora_b, magnitude, bias, scaling, dropout, plan, keep_u, quant):
    """The planned forward: ``(y (..., out), n (out,), U or None, X Aᵀ or None, mask seed)``."""
    x2d = x.reshape(-1, x.shape[-1])
    owned = quant is not None
    w = weight if quant is None else quant.dequantize(x.dtype)  # fresh (out, in) when quantized
    source = None if quant is None else quant.weight
    fwd = plan.lora.forward_variant
    acc = _acc_dtype(x.dtype)
    seed = u = la = None
    if plan.norm == "merged":
        y, n, u = _merged_forward(
            fwd.name, x2d, w, lora_a, lora_b, bias, scaling, magnitude, plan.scale, keep_u, owned
        )
    else:
        n = _factored_norms(w, lora_a, lora_b, scaling, source)
        g = magnitude.to(acc) / n
        if dropout > 0.0:
            # PEFT: y = x Wᵀ + bias + (g - 1) ⊙ (x_d Wᵀ) + g ⊙ s·(x_d Aᵀ) Bᵀ, x_d = L / (1 - p);
            # the LoRA pair runs on L = x ⊙ keep with (h ⊙ W, g ⊙ B), h = (g - 1) / (1 - p).
            seed = function._new_seed()
            lx = _draw_mask(x2d, dropout, seed).apply(x2d)
            y = torch.nn.functional.linear(x2d, w, bias)  # before w is scaled in place
            w_h = _scale_rows(w, (g - 1.0) / (1.0 - dropout), owned)
            b_g = _scale_rows(lora_b, g, False)
            y_l, la = function.run_forward(
                fwd, lx, w_h, lora_a, b_g, None, scaling / (1.0 - dropout), lx, True
            )
            y = y.add_(y_l)
        elif plan.scale == "weight":
            w_g, b_g = _scale_rows(w, g, owned), _scale_rows(lora_b, g, False)
            y, la = function.run_forward(fwd, x2d, w_g, lora_a, b_g, bias, scaling, x2d, True)
        else:
            u, la = function.run_forward(fwd, x2d, w, lora_a, lora_b, None, scaling, x2d, owned)
            y = _scale_output(u, g, bias, keep_u)
            u = u if keep_u else None
    if x.dim() != 2:
        y = y.reshape(*x.shape[:-1], y.shape[-1])
    return y, n, u, la, seed


def _draw_mask(x2d: Tensor, p: float, seed: int) -> DropMask:
    """The dropout mask for ``x2d`` from ``seed``; forward and backward both call this (a test
    swaps it to check that backward sees forward's mask)."""
    return draw_mask(x2d, p, seed)


def _u_term(dm_order: str, dy: Tensor, lx: Tensor, w: Tensor, acc: torch.dtype) -> Tensor:
    """Σ_tokens dY ⊙ (L Wᵀ), ``(out,)`` in ``acc``: by recomputing L Wᵀ or through G = dYᵀ L."""
    if dm_order == "recompute":
        return torch.nn.functional.linear(lx, w).mul_(dy).sum(0, dtype=acc)  # (N, out) temp
    return (dy.t() @ lx).mul_(w).sum(1, dtype=acc)  # (out, in) temp


class _DoRAFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x,
        weight,
        lora_a,
        lora_b,
        magnitude,
        bias,
        scaling,
        dropout,
        plan,
        keep_xa,
        quant,
        remake,
    ):
        keep_u = plan.dm == "saved" and ctx.needs_input_grad[4]
        y, n, u, la, seed = _forward(
            x, weight, lora_a, lora_b, magnitude, bias, scaling, dropout, plan, keep_u, quant
        )
        kept = (x,) if remake is None else remake.tensors  # x formed again in backward
        ctx.save_for_backward(
            weight, lora_a, lora_b, magnitude, n, u, la if keep_xa else None, *kept
        )
        ctx.remake = None if remake is None else remake.claim()  # its Recipe
        ctx.x_shape = x.shape
        ctx.scaling, ctx.dropout, ctx.seed = scaling, dropout, seed
        ctx.plan, ctx.quant = plan, quant
        return y

    @staticmethod
    def backward(ctx, grad_out):
        weight, lora_a, lora_b, magnitude, n, u, la, *kept = ctx.saved_tensors
        x = kept[0] if ctx.remake is None else function._remade(ctx.remake, kept, ctx.x_shape)
        need_x, _, need_a, need_b, need_m, need_bias = ctx.needs_input_grad[:6]
        need_lora = need_a or need_b
        plan, quant, p, s = ctx.plan, ctx.quant, ctx.dropout, ctx.scaling
        dy = grad_out.reshape(-1, grad_out.shape[-1])
        x2d = x.reshape(-1, x.shape[-1])
        acc = n.dtype
        g = magnitude.to(acc) / n
        mask = None
        lx = x2d
        if p > 0.0:
            mask = _draw_mask(x2d, p, ctx.seed)
            lx = mask.apply(x2d) if need_lora or need_m else None
            s = s / (1.0 - p)  # the dropout's 1 / (1 - p), on the rank-r terms

        raw = [None]  # the base weight, dequantized at most once

        def base_weight() -> Tensor:
            if raw[0] is None:
                raw[0] = weight if quant is None else quant.dequantize(x.dtype)
            return raw[0]

        u_term = None
        if need_m and plan.dm != "saved":
            u_term = _u_term(plan.dm, dy, lx, base_weight(), acc)
        dx0 = dy @ base_weight() if p > 0.0 and need_x else None  # (N, in): the base's dX

        def weight_fn() -> Tensor:  # g ⊙ W (h ⊙ W with dropout), fresh: merged orders fold in
            row_scale = g if p == 0.0 else (g - 1.0) / (1.0 - p)
            return _scale_rows(base_weight(), row_scale, quant is not None)

        b_g = _scale_rows(lora_b.detach(), g, False)
        dx, da, db = function.run_backward(
            plan.lora.backward_variant,
            plan.lora.layout,
            dy,
            weight_fn,
            lora_a,
            b_g,
            lx,
            s=s,
            la=la,
            need_x=need_x,
            need_lora=need_lora,
            w_owned=True,
        )
        dm = None
        if need_m:
            if plan.dm == "saved":
                dm = (dy * u).sum(0, dtype=acc)
            else:
                # s·rowsum(dYᵀ (L Aᵀ) ⊙ B): dB° = s·dYᵀ (L Aᵀ) is the LoRA backward's dB before g.
                if db is None:
                    l_a = la if la is not None else la_product(lx, lora_a)
                    db_raw = db_from_la(dy, l_a, plan.lora.layout).mul_(s)
                else:
                    db_raw = db
                rank_term = (db_raw.to(acc) * lora_b.detach().to(acc)).sum(1)
                dm = (u_term / (1.0 - p) + rank_term) if p > 0.0 else u_term.add_(rank_term)
            dm = dm.div_(n).to(magnitude.dtype)
        if db is not None:
            db = db.mul_(g[:, None])
        if dx0 is not None:
            dx = dx0 if dx is None else mask.add_masked_(dx0, dx, 1.0)
        if dx is not None:
            dx = dx.reshape(x.shape)
        dbias = dy.sum(0) if need_bias else None
        return (
            dx,
            None,
            da if need_a else None,
            db if need_b else None,
            dm,
            dbias,
            *([None] * 6),
        )


def _check_magnitude(x: Tensor, magnitude: object, out_features: int) -> None:
    """Raise a clear error for a magnitude that does not fit; silent when it does."""
    if not isinstance(magnitude, Tensor):
        raise TypeError(f"magnitude must be a torch.Tensor, got {type(magnitude).__name__}")
    if tuple(magnitude.shape) != (out_features,):
        raise ValueError(
            f"magnitude must have shape (out,) = ({out_features},), one entry per output row "
            f"(PEFT's lora_magnitude_vector), got {tuple(magnitude.shape)}"
        )
    if magnitude.dtype != x.dtype:
        raise TypeError(
            f"magnitude is {magnitude.dtype} but x, weight, lora_A and lora_B are {x.dtype}; "
            "cast it with magnitude.to(x.dtype) first (the cast is differentiable)"
        )
    if magnitude.device != x.device:
        raise ValueError(
            f"magnitude is on {magnitude.device} but x is on {x.device}; move it to one device"
        )


def _needs_graph(*tensors: Tensor | None) -> bool:
    """True if autograd would record the op: grad mode on and some input requiring grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def dora_linear(
    x: Tensor,
    weight: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    bias: Tensor | None = None,
    *,
    scaling: float = 1.0,
    dropout: float = 0.0,
    training: bool = True,
    plan: DoRAPlan | Plan | tuple[str, str] | None = None,
    save_output: bool = True,
    keep_xa: bool = False,
    quant=None,
) -> Tensor:
    """PEFT's DoRA linear layer (``LoraConfig(use_dora=True)``) as one op, exact to PEFT 0.21.2.

    With n = ‖W + s·B A‖ per output row (detached, as in PEFT and DoRA §4.3) and g = m / n::

        y = g ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + bias                                   no dropout / eval
        y = x Wᵀ + bias + (g − 1) ⊙ (x_d Wᵀ) + g ⊙ s·(x_d Aᵀ) Bᵀ, x_d = dropout(x)   training

    computed in the planned order (see ``runlora.ops.dora_variants``), gradients exact to plain
    autograd of those formulas. Under ``torch.autocast`` it runs in the autocast dtype, as
    ``lora_linear`` does.

    Args:
        x: input, shape ``(..., in)``; any number of leading dims, contiguous or not.
        weight: frozen base weight ``(out, in)`` (for a ``fan_in_fan_out`` layer, the transposed
            view); None when ``quant`` stands for it. Must not require grad.
        lora_A: ``(r, in)``. lora_B: ``(out, r)``.
        magnitude: m, shape ``(out,)`` (PEFT's ``lora_magnitude_vector[name].weight``).
        bias: optional, ``(out,)``; may be trainable.
        scaling: s (``lora_alpha / r``, or ``/ sqrt(r)`` for rsLoRA).
        dropout: probability on the adapter's input (PEFT's ``lora_dropout``), applied only when
            ``training``; the mask is regenerated in backward from a seed.
        training: as in ``F.dropout``.
        plan: a ``DoRAPlan``; a LoRA ``Plan`` or ``(forward, backward)`` pair, whose DoRA orders
            are then chosen by ``choose_dora_plan``; or None: the pair from the same planner
            ``lora_linear(plan=None)`` uses (by FLOPs unless set otherwise), the DoRA orders by
            ``choose_dora_plan`` (fewest FLOPs, then bytes).
        save_output: let the chooser save U ``(N, out)`` for dm (``dm="saved"``, the default: dm
            then costs no extra product). False keeps the saved bytes at LoRA's and pays one
            more N·in·out product in backward instead (``"recompute"``/``"gradient"``). With
            dropout, U is never saved. Ignored when ``plan`` is a ``DoRAPlan``.
        keep_xa: save the ``(N, r)`` X Aᵀ from forward instead of recomputing it in backward.
        quant: internal; a quantized base weight provider (see ``runlora.layers.quant``).

    Returns:
        Tensor of shape ``(..., out)``.
    """
    cast_to = function._autocast_dtype(x)
    if cast_to is not None:
        x, weight, lora_A, lora_B, magnitude, bias = (
            function._autocast_cast(t, cast_to)
            for t in (x, weight, lora_A, lora_B, magnitude, bias)
        )
    if quant is None:
        function.check_args(x, weight, lora_A, lora_B, bias, scaling, dropout)
        out_f, in_f = weight.shape
    else:
        quant.check(x, lora_A, lora_B, bias)
        out_f, in_f = quant.shape
        stand_in = x.new_zeros(()).expand(out_f, in_f)  # W's shape, one element of memory
        function.check_args(x, stand_in, lora_A, lora_B, bias, scaling, dropout)
    _check_magnitude(x, magnitude, out_f)
    p = float(dropout) if training else 0.0
    grad = torch.is_grad_enabled()
    magnitude_grad = grad and magnitude.requires_grad
    fields = (
        max(1, x.numel() // in_f),
        in_f,
        out_f,
        lora_A.shape[0],
        grad and x.requires_grad,
        grad and (lora_A.requires_grad or lora_B.requires_grad),
        bias is not None,
        grad and bias is not None and bias.requires_grad,
        p > 0.0,
        quant is not None,
    )
    if isinstance(plan, DoRAPlan):
        plan = as_dora_plan(plan, dropout=p > 0.0)
    elif torch.compiler.is_compiling():  # the choice is a constant of the graph
        if plan is None:
            raise RuntimeError("under torch.compile, pass dora_linear a plan (a layer does)")
        lora = as_plan(plan)
        norm, scale, dm = _dora_choice(
            lora.forward, lora.backward, lora.layout, fields, x.dtype.itemsize,
            magnitude_grad, bool(save_output),
        )  # fmt: skip
        plan = DoRAPlan(lora, norm, scale, dm, criterion="flops")
    else:
        problem = _problem(fields)
        if plan is None:
            if function._plan_resolver is None:
                raise RuntimeError("no plan resolver installed: pass plan=, or import runlora")
            lora = function._plan_resolver(_lora_problem(problem), x.dtype, x.device)
        else:
            lora = as_plan(plan)  # every pair is exact here: with dropout it sees L only
        plan = choose_dora_plan(lora, problem, x.dtype.itemsize, magnitude_grad, bool(save_output))
    scaling = float(scaling)
    with torch.autocast(x.device.type, enabled=False) if cast_to is not None else nullcontext():
        if not _needs_graph(x, lora_A, lora_B, magnitude, bias):  # inference: no autograd node
            return _forward(
                x, weight, lora_A, lora_B, magnitude, bias, scaling, p, plan, False, quant
            )[0]
        return _DoRAFunction.apply(
            x,
            weight,
            lora_A,
            lora_B,
            magnitude,
            bias,
            scaling,
            p,
            plan,
            keep_xa,
            quant,
            remake_of(x),
        )


def _problem(fields: tuple) -> Problem:
    n, in_f, out_f, r, needs_x, needs_lora, bias, bias_grad, dropout, quantized = fields
    return Problem(
        n,
        in_f,
        out_f,
        r,
        needs_input_grad=needs_x,
        needs_lora_grad=needs_lora,
        bias=bias,
        bias_grad=bias_grad,
        dropout=dropout,
        quantized=quantized,
    )


@torch.compiler.assume_constant_result
def _dora_choice(fwd, bwd, layout, fields, itemsize, magnitude_grad, save_output):
    """``choose_dora_plan``'s (norm, scale, dm), run once per shape outside the traced graph."""
    chosen = choose_dora_plan(
        Plan(fwd, bwd, layout), _problem(fields), itemsize, magnitude_grad, save_output
    )
    return chosen.norm, chosen.scale, chosen.dm


def _lora_problem(problem: Problem) -> Problem:
    """``problem`` as the LoRA pair sees it: one input (x, or L = x ⊙ keep), no dropout, and
    planned as trainable (the planner plans every adapter so; a frozen one runs any plan)."""
    return dataclasses.replace(problem, dropout=False, needs_lora_grad=True)
