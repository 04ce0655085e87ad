"""The LoRA op as one autograd Function that runs a planned (forward, backward) pair.

What it keeps for backward: the input x (once, as given) or, where x is marked with a
``runlora.ops.remake.Remake``, the tensors x is formed again from (kept by autograd anyway), the
parameters, and with dropout one int seed. Never X Aᵀ (unless asked), never an ``(N, out)``
tensor, never a mask or a dropped copy of x: the dropout mask is regenerated in backward
from the seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import Tensor

from .dropout import DropMask, draw_mask
from .plan import Plan, as_plan
from .products import addmm_into, db_from_la, la_product, merge_weight, z_product
from .remake import Recipe, remake_of
from .variants import BackwardVariant, ForwardVariant, Problem

__all__ = [
    "lora_linear",
    "run_forward",
    "run_backward",
    "check_args",
    "set_plan_resolver",
    "PlanResolver",
]

WeightFn = Callable[[], Tensor]

#: ``resolver(problem, dtype, device) -> Plan``: what ``lora_linear(plan=None)`` runs.
PlanResolver = Callable[[Problem, torch.dtype, torch.device], Plan]
_plan_resolver: PlanResolver | None = None


def set_plan_resolver(resolver: PlanResolver | None) -> PlanResolver | None:
    """Set what plans a call of ``lora_linear(plan=None)``; returns the previous resolver.

    The op knows no planner: ``runlora/__init__.py`` installs ``runlora.planning``'s default
    (FLOPs, cached per shape) when the package is imported.
    """
    global _plan_resolver
    previous, _plan_resolver = _plan_resolver, resolver
    return previous


# --- dropout, regenerated from a seed ------------------------------------------------------


def _new_seed() -> int:
    # Drawn from torch's default CPU generator, so torch.manual_seed makes runs repeatable.
    return int(torch.randint(0, 2**62, (1,)).item())


def _draw_mask(x2d: Tensor, p: float, seed: int) -> DropMask:
    """The dropout mask for ``x2d`` drawn from ``seed`` (see ``runlora.dropout``). Forward and
    backward both call this, so a test can swap it to check that backward sees forward's mask."""
    return draw_mask(x2d, p, seed)


# --- forward and backward orders -----------------------------------------------------------


def run_forward(
    fwd: ForwardVariant,
    x2d: Tensor,
    w: Tensor,
    a: Tensor,
    b: Tensor,
    bias: Tensor | None,
    s: float,
    lx: Tensor,
    w_owned: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Y ``(N, out)`` by order ``fwd``; ``lx`` is the LoRA branch's input (x or dropout(x)).
    ``w_owned``: ``w`` is a fresh buffer the merged orders may overwrite.

    Returns (Y, X Aᵀ or None when the order does not form it).
    """
    if fwd.name == "merged":
        return torch.nn.functional.linear(x2d, merge_weight(w, a, b, s, w_owned), bias), None
    if fwd.name == "merged_t":
        if w_owned:
            wt = addmm_into(w.t(), a.t(), b.t(), alpha=s)  # (in, out), in w's buffer
        else:
            wt = torch.addmm(w.t(), a.t(), b.t(), alpha=s)  # (in, out)
        y = x2d @ wt if bias is None else torch.addmm(bias, x2d, wt)
        return y, None
    la = la_product(lx, a)  # (N, r)
    if fwd.name == "sequential":
        y = torch.nn.functional.linear(x2d, w, bias)
        return addmm_into(y, la, b.t(), alpha=s), la
    y = la @ b.t()  # lowrank_first: (N, out)
    addmm_into(y, x2d, w.t(), beta=s)
    if bias is not None:
        y.add_(bias)
    return y, la


def run_backward(
    bwd: BackwardVariant,
    layout: str,
    dy: Tensor,
    weight_fn: WeightFn,
    a: Tensor,
    b: Tensor,
    lx: Tensor | None,
    *,
    s: float = 1.0,
    mask: DropMask | None = None,
    la: Tensor | None = None,
    need_x: bool = True,
    need_lora: bool = True,
    w_owned: bool = False,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(dX ``(N, in)``, dA ``(r, in)``, dB ``(out, r)``) by order ``bwd``; None where not needed.

    ``dy`` is ``(N, out)``, ``weight_fn()`` the base weight ``(out, in)``, ``a`` ``(r, in)``, ``b``
    ``(out, r)``, and ``lx`` the LoRA input ``(N, in)`` (x, or x ⊙ keep with dropout; may be None
    without ``need_lora``). ``s`` is the LoRA branch's scaling (with dropout, s / (1 - p), so
    that s·lx = s_user·dropout(x)), ``mask`` the dropout's ``DropMask`` or None, ``la`` a saved
    L Aᵀ ``(N, r)`` or None (recomputed). ``need_x`` / ``need_lora``: compute dX / dA and dB.
    ``w_owned``: ``weight_fn`` returns a fresh buffer each call, which the merged orders may
    overwrite.
    """
    need_z = (need_lora and bwd.da_from == "Z") or (need_x and bwd.dx == "split")
    z = z_product(dy, b, layout) if need_z else None  # (N, r)

    def input_grad() -> Tensor:
        w = weight_fn()
        if bwd.dx == "merged":
            return dy @ merge_weight(w, a, b, s, w_owned)
        dx = dy @ w  # (N, in)
        if mask is None:
            return addmm_into(dx, z, a, alpha=s)
        return mask.add_masked_(dx, z @ a, s)  # dY W + s·(Z A) ⊙ keep

    dx = input_grad() if need_x and bwd.dx_first else None
    da = db = None
    if need_lora:
        g = dy.t() @ lx if "G" in (bwd.da_from, bwd.db_from) else None  # (out, in)
        if bwd.da_from == "Z":
            da = z.t() @ lx
        else:
            da = b.t() @ g
        if bwd.db_from == "LA":
            db = db_from_la(dy, la if la is not None else la_product(lx, a), layout)
        else:
            db = g @ a.t()
        del g
        da, db = da.mul_(s), db.mul_(s)
    if need_x and not bwd.dx_first:
        dx = input_grad()
    return dx, da, db


def _forward(x, weight, lora_a, lora_b, bias, scaling, dropout, plan, quant):
    """The planned forward: ``(y (..., out), X Aᵀ or None, the LoRA scaling used, mask seed)``."""
    x2d = x.reshape(-1, x.shape[-1])
    w = weight if quant is None else quant.dequantize(x.dtype)  # fresh (out, in) when quantized
    seed = None
    lx = x2d
    if dropout > 0.0:
        seed = _new_seed()
        lx = _draw_mask(x2d, dropout, seed).apply(x2d)
        scaling = scaling / (1.0 - dropout)  # the dropout's 1 / (1 - p), on rank-r terms
    y, la = run_forward(
        plan.forward_variant, x2d, w, lora_a, lora_b, bias, scaling, lx, quant is not None
    )
    if x.dim() != 2:
        y = y.reshape(*x.shape[:-1], y.shape[-1])
    return y, la, scaling, seed


class _LoRAFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x, weight, lora_a, lora_b, bias, scaling, dropout, plan, keep_la, quant, remake
    ):
        y, la, scaling, seed = _forward(
            x, weight, lora_a, lora_b, bias, scaling, dropout, plan, quant
        )
        ctx.remake = None if remake is None else remake.claim()  # its Recipe
        if remake is None:
            ctx.save_for_backward(weight, lora_a, lora_b, la if keep_la else None, x)
        else:  # x is formed again in backward from tensors autograd keeps anyway
            ctx.save_for_backward(weight, lora_a, lora_b, la if keep_la else None, *remake.tensors)
        ctx.x_shape = x.shape
        ctx.scaling, ctx.dropout, ctx.seed = scaling, dropout, seed
        ctx.bwd, ctx.layout, ctx.quant = plan.backward_variant, plan.layout, quant
        return y

    @staticmethod
    def backward(ctx, grad_out):
        weight, lora_a, lora_b, la, *kept = ctx.saved_tensors
        need_x, _, need_a, need_b, need_bias = ctx.needs_input_grad[:5]
        x = kept[0] if ctx.remake is None else _remade(ctx.remake, kept, ctx.x_shape)
        in_features = x.shape[-1]
        dy = grad_out.reshape(-1, grad_out.shape[-1])
        x2d = x.reshape(-1, in_features)
        mask = None
        lx = x2d
        if ctx.dropout > 0.0:
            mask = _draw_mask(x2d, ctx.dropout, ctx.seed)
            lx = mask.apply(x2d) if need_a or need_b else None  # dX needs the mask only
        quant = ctx.quant

        def weight_fn() -> Tensor:
            return weight if quant is None else quant.dequantize(x.dtype)

        dx, da, db = run_backward(
            ctx.bwd,
            ctx.layout,
            dy,
            weight_fn,
            lora_a,
            lora_b,
            lx,
            s=ctx.scaling,
            mask=mask,
            la=la,
            need_x=need_x,
            need_lora=need_a or need_b,
            w_owned=quant is not None,
        )
        dbias = dy.sum(0) if need_bias else None
        if dx is not None:
            dx = dx.reshape(x.shape)
        return dx, None, da if need_a else None, db if need_b else None, dbias, *([None] * 6)


def _remade(recipe: Recipe, kept: list[Tensor], shape: torch.Size) -> Tensor:
    """The op's input x ``shape``, formed again from the remake's saved tensors ``kept`` (or
    taken from another op's backward that formed it from the same tensors)."""
    x = recipe.take(*kept)
    if x.shape != shape:  # the producer broke its promise: fail loudly rather than be wrong
        raise RuntimeError(
            f"runlora: a recomputed LoRA input has shape {tuple(x.shape)}, the forward's had "
            f"{tuple(shape)} ({recipe!r})"
        )
    return x


def check_args(x, weight, lora_a, lora_b, bias, scaling, dropout) -> None:
    """``lora_linear``'s argument checks: a clear error for bad arguments, silent (and cheap)
    when all is well."""
    if _looks_valid(x, weight, lora_a, lora_b, bias, scaling, dropout):
        return
    _explain(x, weight, lora_a, lora_b, bias, scaling, dropout)


def _looks_valid(x, weight, lora_a, lora_b, bias, scaling, dropout) -> bool:
    """The hot path's test: every condition ``_explain`` checks, without building messages."""
    if not (
        isinstance(x, Tensor)
        and isinstance(weight, Tensor)
        and isinstance(lora_a, Tensor)
        and isinstance(lora_b, Tensor)
        and (bias is None or isinstance(bias, Tensor))
        and weight.dim() == 2
        and lora_a.dim() == 2
        and lora_b.dim() == 2
        and x.dim() >= 1
        and x.is_floating_point()
        and not weight.requires_grad
        and type(scaling) in (float, int)
        and math.isfinite(scaling)
        and type(dropout) in (float, int)
        and 0.0 <= dropout < 1.0
    ):
        return False
    out_f, in_f = weight.shape
    r, a_in = lora_a.shape
    dtype, device = x.dtype, x.device
    return (
        r >= 1
        and x.shape[-1] == in_f
        and a_in == in_f
        and lora_b.shape == (out_f, r)
        and weight.dtype == dtype
        and lora_a.dtype == dtype
        and lora_b.dtype == dtype
        and weight.device == device
        and lora_a.device == device
        and lora_b.device == device
        and (
            bias is None
            or (bias.shape == (out_f,) and bias.dtype == dtype and bias.device == device)
        )
    )


def _explain(x, weight, lora_a, lora_b, bias, scaling, dropout) -> None:
    tensors = {"x": x, "weight": weight, "lora_A": lora_a, "lora_B": lora_b}
    if bias is not None:
        tensors["bias"] = bias
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if weight.dim() != 2 or lora_a.dim() != 2 or lora_b.dim() != 2:
        raise ValueError(
            "weight, lora_A and lora_B must be 2-D: weight (out, in), lora_A (r, in), "
            f"lora_B (out, r); got {tuple(weight.shape)}, {tuple(lora_a.shape)}, "
            f"{tuple(lora_b.shape)}"
        )
    out_f, in_f = weight.shape
    r = lora_a.shape[0]
    if r < 1:
        raise ValueError("r must be a positive int, got 0 (lora_A has no rows)")
    if x.dim() < 1 or x.shape[-1] != in_f:
        raise ValueError(
            f"x must have shape (..., {in_f}) to match weight (out, in) = "
            f"({out_f}, {in_f}); got {tuple(x.shape)}"
        )
    if tuple(lora_a.shape) != (r, in_f):
        raise ValueError(
            f"lora_A must have shape (r, in) = ({r}, {in_f}), got {tuple(lora_a.shape)}"
        )
    if tuple(lora_b.shape) != (out_f, r):
        raise ValueError(
            f"lora_B must have shape (out, r) = ({out_f}, {r}) to match weight "
            f"{tuple(weight.shape)} and lora_A {tuple(lora_a.shape)}; got {tuple(lora_b.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (out_f,):
        raise ValueError(f"bias must have shape (out,) = ({out_f},), got {tuple(bias.shape)}")
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if not x.is_floating_point() or len(set(dtypes.values())) != 1:
        raise TypeError(
            "x, weight, lora_A, lora_B and bias must share one floating dtype, got "
            + ", ".join(f"{k}={v}" for k, v in dtypes.items())
            + "; cast them with .to(dtype) first"
        )
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(
            "x, weight, lora_A, lora_B and bias must be on one device, got "
            + ", ".join(f"{k}={v}" for k, v in devices.items())
        )
    if weight.requires_grad:
        raise ValueError(
            "weight requires grad, but runlora's op keeps the base weight frozen; call "
            "weight.requires_grad_(False) (the LoRA parameters are lora_A and lora_B)"
        )
    real = isinstance(scaling, (int, float)) and not isinstance(scaling, bool)
    if not real or not math.isfinite(scaling):
        raise ValueError(f"scaling must be a finite float, got {scaling!r}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")


def _autocast_dtype(x: object) -> torch.dtype | None:
    """The dtype autocast would run ``F.linear(x, ...)`` in, or None when it is off."""
    if not isinstance(x, Tensor):
        return None
    device_type = x.device.type
    if not torch.amp.is_autocast_available(device_type):
        return None
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _autocast_cast(t: object, dtype: torch.dtype) -> object:
    # Autocast casts nothing inside a custom Function, so cast its inputs here as it casts
    # F.linear's: floating tensors other than fp64 go to the autocast dtype.
    if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64:
        return t.to(dtype)
    return t


def lora_linear(
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    bias: Tensor | None = None,
    *,
    scaling: float = 1.0,
    dropout: float = 0.0,
    training: bool = True,
    plan: Plan | tuple[str, str] | None = None,
    keep_xa: bool = False,
    quant=None,
) -> Tensor:
    """``F.linear(x, weight, bias) + scaling * F.linear(F.linear(dropout(x), lora_A), lora_B)``.

    One autograd op that runs the planned computation order, exact to plain autograd. Under
    ``torch.autocast`` it runs in the autocast dtype, as ``F.linear`` would: floating inputs
    other than fp64 are cast to it, and the gradients flow back to them in their own dtype.

    Args:
        x: input, shape ``(..., in)``; any number of leading dims, contiguous or not.
        weight: frozen base weight, shape ``(out, in)``; used as it is (never copied). Must not
            require grad.
        lora_A: shape ``(r, in)``.
        lora_B: shape ``(out, r)``.
        bias: optional, shape ``(out,)``; may be trainable.
        scaling: s in ``Y = X Wᵀ + s·(X Aᵀ) Bᵀ`` (``lora_alpha / r``, or ``/ sqrt(r)`` for rsLoRA).
        dropout: probability on the LoRA branch's input only (PEFT's semantics, kept inputs scaled
            by ``1 / (1 - p)``), applied only when ``training``. The mask is regenerated in
            backward from a seed, never stored.
        training: as in ``F.dropout``.
        plan: a ``runlora.Plan``, a ``(forward_name, backward_name)`` tuple, or None to plan this
            shape by FLOPs (cached per shape).
        keep_xa: save the ``(N, r)`` X Aᵀ from forward instead of recomputing it in backward.
        quant: internal; a quantized base weight provider (see ``runlora.layers.quant``).

    Returns:
        Tensor of shape ``(..., out)``.
    """
    cast_to = _autocast_dtype(x)
    if cast_to is not None:
        x, weight, lora_A, lora_B, bias = (
            _autocast_cast(t, cast_to) for t in (x, weight, lora_A, lora_B, bias)
        )
    if quant is None:
        check_args(x, weight, lora_A, lora_B, bias, scaling, dropout)
    else:
        quant.check(x, lora_A, lora_B, bias)
    p = float(dropout) if training else 0.0
    needs_x = x.requires_grad and torch.is_grad_enabled()
    n = max(1, x.numel() // x.shape[-1])
    out_f, in_f = weight.shape if quant is None else quant.shape
    if plan is None:
        if _plan_resolver is None:
            raise RuntimeError("no plan resolver installed: pass plan=, or import runlora")
        problem = Problem(
            n,
            in_f,
            out_f,
            lora_A.shape[0],
            needs_input_grad=needs_x,
            bias=bias is not None,
            bias_grad=False,
            dropout=p > 0.0,
            quantized=quant is not None,
        )
        plan = _plan_resolver(problem, x.dtype, x.device)
    else:
        plan = as_plan(plan, dropout=p > 0.0)
    # Autocast would otherwise cast some products inside the Function and not others.
    with torch.autocast(x.device.type, enabled=False) if cast_to is not None else nullcontext():
        if not _needs_graph(x, lora_A, lora_B, bias):  # inference: no autograd node at all
            return _forward(x, weight, lora_A, lora_B, bias, float(scaling), p, plan, quant)[0]
        return _LoRAFunction.apply(
            x, weight, lora_A, lora_B, bias, float(scaling), p, plan, keep_xa, quant, remake_of(x)
        )


def _needs_graph(x: Tensor, lora_a: Tensor, lora_b: Tensor, bias: Tensor | None) -> bool:
    """True if autograd would record the op: grad mode on and some input requiring grad."""
    if not torch.is_grad_enabled():
        return False
    return (
        x.requires_grad
        or lora_a.requires_grad
        or lora_b.requires_grad
        or (bias is not None and bias.requires_grad)
    )
