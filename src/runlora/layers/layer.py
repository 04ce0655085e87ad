"""``RunLoRALinear``: an existing linear layer plus a LoRA adapter, run by ``runlora.lora_linear``.

::

    x ──► base_layer (W frozen, never copied) ──────────────┐
      │                                                     (+) ──► y
      └─► dropout ──► A (r, in) ──► B (out, r) ──► × s ─────┘

The module mirrors PEFT's ``lora.Linear`` attribute for attribute (``base_layer``, ``lora_A``,
``lora_B``, ``lora_dropout``, ``r``, ``lora_alpha``, ``scaling``), with ``lora_A``/``lora_B`` as
``ModuleDict``\\ s of ``nn.Linear`` keyed by adapter name: state-dict keys are then PEFT's
(``<path>.lora_A.default.weight``), a PEFT model's adapter modules can be adopted as they are,
and a second adapter has a place to go. Only the weights of those ``nn.Linear``\\ s are used; the
forward is one call of the planned op.

The base layer is read in one place, ``RunLoRALinear.base_weight_args``: an ``nn.Linear``, or
GPT-2's ``Conv1D`` (weight stored ``(in, out)``, used through a transposed view). Other base
layers plug in there through ``register_base_kind`` (``runlora.layers`` registers the quantized
bitsandbytes ones of ``runlora.layers.quant``).
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..ops.checks import dropout_probability, positive_int
from ..ops.dora import dora_linear
from ..ops.function import lora_linear
from ..ops.plan import Plan, as_plan
from ..ops.remake import remake_of
from ..planning.criteria import known_criterion
from ..planning.lookup import lookup_plan, token_bucket
from . import groups
from .routing import Routing, mixed_batch_forward

__all__ = [
    "RunLoRALinear",
    "run_adapter",
    "adapter_plan",
    "in_activation_dtype",
    "base_args_fn",
    "register_base_kind",
    "is_supported_base",
    "dropout_p",
    "full_shape",
    "LoRAEngine",
]

#: A base-layer kind: ``matches(layer) -> bool`` and ``args(layer, fan_in_fan_out) -> (weight
#: (out, in) or None, bias or None, quant provider or None)``. ``args`` runs on every forward and
#: must be traceable by Dynamo; ``matches`` runs once, when a layer is wrapped.
BaseKind = tuple[Callable[[nn.Module], bool], Callable[[nn.Module, bool], tuple]]


def _is_conv1d(layer: nn.Module) -> bool:
    # Conv1D exists only if transformers was imported, and then sys.modules has it.
    module = sys.modules.get("transformers.pytorch_utils")
    cls = getattr(module, "Conv1D", None)
    return cls is not None and isinstance(layer, cls)


def _is_dense(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Linear) or _is_conv1d(layer)


def _dense_args(layer: nn.Module, fan_in_fan_out: bool) -> tuple:
    weight = layer.weight.t() if fan_in_fan_out else layer.weight  # (out, in), a view
    return weight, layer.bias, None


#: The kinds ``base_args_fn`` tries, first match wins; the dense one is built in.
_BASE_KINDS: list[BaseKind] = [(_is_dense, _dense_args)]


def register_base_kind(matches: Callable[[nn.Module], bool], args: Callable) -> None:
    """Teach runlora a new kind of base layer (see ``BaseKind``); ``runlora.layers`` registers
    the bitsandbytes layers of ``runlora.layers.quant`` this way.

    Kinds registered later are tried first (a kind for an ``nn.Linear`` subclass, such as
    bitsandbytes' layers, then wins over the dense one).
    """
    _BASE_KINDS.insert(0, (matches, args))


def full_shape(param: Tensor) -> torch.Size:
    """``param.shape``, or its whole shape when DeepSpeed ZeRO-3 has partitioned it (the
    parameter is then empty and carries the full shape as ``ds_shape``)."""
    ds_shape = getattr(param, "ds_shape", None)
    return param.shape if ds_shape is None else torch.Size(ds_shape)


def _out_in(layer: nn.Module, weight, quant, fan_in_fan_out: bool) -> tuple[int, int]:
    """``(out, in)`` of the base weight (as the base kind's handler returns it), also when
    DeepSpeed ZeRO-3 has partitioned the stored weight (then its full shape is ``ds_shape``)."""
    if quant is not None:
        return tuple(quant.shape)
    stored = getattr(layer, "weight", None)
    if getattr(stored, "ds_shape", None) is not None:
        out_f, in_f = full_shape(stored)
        return (in_f, out_f) if fan_in_fan_out else (out_f, in_f)
    return tuple(weight.shape)


def base_args_fn(layer: nn.Module) -> Callable[[nn.Module, bool], tuple]:
    """The function that reads ``(weight, bias, quant)`` off ``layer`` for the op.

    It returns: weight ``(out, in)`` (a view of the layer's own tensor, never a copy), or None
    when ``quant`` stands for it; bias ``(out,)`` or None; quant: a provider for
    ``lora_linear(quant=...)`` or None.

    Raises:
        TypeError: for a layer runlora does not handle, naming its type.
    """
    for matches, args in _BASE_KINDS:
        if matches(layer):
            return args
    raise TypeError(
        f"runlora cannot wrap a {type(layer).__name__}: only nn.Linear and transformers' Conv1D "
        "are supported (bitsandbytes layers through runlora.layers.quant); leave it out of "
        "target_modules"
    )


def is_supported_base(layer: nn.Module) -> bool:
    """True if ``layer`` can be wrapped by ``RunLoRALinear``."""
    return any(matches(layer) for matches, _ in _BASE_KINDS)


def dropout_p(module: nn.Module) -> float:
    """The dropout probability of an adapter's ``lora_dropout`` module (0 for ``nn.Identity``)."""
    return float(module.p) if isinstance(module, nn.Dropout) else 0.0


def in_activation_dtype(x: Tensor, lora_a: Tensor, lora_b: Tensor) -> tuple[Tensor, Tensor]:
    """A ``(r, in)`` and B ``(out, r)`` in ``x``'s dtype: adapters kept in another dtype than
    the activations (PEFT keeps fp32 adapters on a bf16 base) run in the activations' dtype;
    the casts are differentiable, so gradients reach the parameters in their own dtype."""
    if lora_a.dtype != x.dtype and x.is_floating_point():
        return lora_a.to(x.dtype), lora_b.to(x.dtype)
    return lora_a, lora_b


def adapter_plan(
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    *,
    criterion: str,
    bias: bool,
    dropout: float,
    quantized: bool = False,
) -> Plan:
    """The plan of one adapter (A ``(r, in)``, B ``(out, r)``) for ``x`` ``(..., in)``: its
    token count bucketed, memoised (``runlora.planning.lookup``); ``dropout`` as it applies to
    this call (0 outside training)."""
    return lookup_plan(
        x.numel() // max(1, x.shape[-1]),
        lora_a.shape[1],
        lora_b.shape[0],
        lora_a.shape[0],
        criterion=criterion,
        needs_input_grad=x.requires_grad and torch.is_grad_enabled(),
        bias=bias,
        dropout=dropout,
        dtype=x.dtype,
        device=x.device,
        quantized=quantized,
    )


def run_adapter(
    x: Tensor,
    base_args: tuple,
    lora_a: Tensor,
    lora_b: Tensor,
    *,
    scaling: float,
    dropout: float,
    training: bool,
    criterion: str = "flops",
    plan: Plan | None = None,
    magnitude: Tensor | None = None,
    save_output: bool = True,
) -> tuple[Tensor, Plan]:
    """``base_layer(x) + scaling · B A dropout(x)`` through the op, planned for ``x``'s shape;
    with ``magnitude``, the DoRA layer of PEFT (``runlora.ops.dora.dora_linear``) instead.

    Args:
        x: shape ``(..., in)``. lora_a: ``(r, in)``. lora_b: ``(out, r)``.
        base_args: ``(weight, bias, quant)`` of the base layer (see ``base_args_fn``).
        plan: a fixed plan, or None for the plan of ``x``'s token count (bucketed, memoised).
            For DoRA, the LoRA pair its products run in (the DoRA orders are then chosen by
            ``runlora.ops.dora_variants.choose_dora_plan``).
        magnitude: DoRA's m ``(out,)``, or None for plain LoRA.
        save_output: DoRA only: let dm's order keep the unscaled output ``(N, out)`` for
            backward (fastest) instead of recomputing ``x Wᵀ`` there (LoRA's saved bytes).

    Returns:
        (y of shape ``(..., out)``, the plan used).
    """
    weight, bias, quant = base_args
    lora_a, lora_b = in_activation_dtype(x, lora_a, lora_b)
    if magnitude is not None and magnitude.dtype != x.dtype and x.is_floating_point():
        magnitude = magnitude.to(x.dtype)
    if bias is not None and bias.dtype != x.dtype and quant is not None:
        bias = bias.to(x.dtype)
    p = dropout if training else 0.0
    if plan is None:
        plan = adapter_plan(
            x,
            lora_a,
            lora_b,
            criterion=criterion,
            bias=bias is not None,
            dropout=p if magnitude is None else 0.0,  # DoRA's orders handle its dropout
            quantized=quant is not None,
        )
    if magnitude is not None:
        y = dora_linear(
            x,
            weight,
            lora_a,
            lora_b,
            magnitude,
            bias,
            scaling=scaling,
            dropout=p,
            training=training,
            plan=plan,
            save_output=save_output,
            quant=quant,
        )
        return y, plan
    y = lora_linear(
        x,
        weight,
        lora_a,
        lora_b,
        bias,
        scaling=scaling,
        dropout=p,
        training=training,
        plan=plan,
        quant=quant,
    )
    return y, plan


class LoRAEngine:
    """How a LoRA layer runs its adapters through the op: the part shared by ``RunLoRALinear``
    and the PEFT LoRA layers that runlora accelerates (``runlora.integrations.peft``).

    A host class provides PEFT's attributes ``lora_A``/``lora_B`` (ModuleDicts of ``nn.Linear``:
    A ``(r, in)``, B ``(out, r)``), ``lora_dropout``, ``scaling``, ``r``, ``merged``,
    ``active_adapters``, ``base_layer``, and ``base_weight_args()`` (``(weight (out, in) or None,
    bias, quant)``, see ``base_args_fn``). ``criterion`` names how plans are made; ``plan`` fixes
    one plan for every call.
    """

    criterion: str = "flops"
    plan: Plan | None = None
    #: DoRA adapters: keep the unscaled output ``(N, out)`` for dm's gradient (no extra product
    #: in backward), or False: recompute ``x Wᵀ`` there and save only what LoRA saves.
    dora_save_output: bool = True
    _last_plan: tuple[int, Plan] | None = None  # (tokens, plan) of the last call

    def base_weight_args(self) -> tuple:
        """``(weight (out, in) view or None, bias (out,) or None, quant provider or None)`` of
        the base layer, as the op takes them (see ``base_args_fn``); the host provides it."""
        raise NotImplementedError

    def live_adapters(self) -> list[str]:
        """The active adapters this layer holds, in order (a model's adapters need not all
        target this layer)."""
        return [n for n in self.active_adapters if n in self.lora_A]

    def call_op(self, x: Tensor, name: str | None, stacked=None) -> tuple[Tensor, Plan]:
        """One op call: the base layer plus adapter ``name``'s term (its scaling and dropout),
        or, with ``name=None``, plus the term of ``stacked = (A (R, in), B (out, R))`` as it is
        (scalings folded into B, no dropout). ``(..., in)`` -> ``(..., out)``, and the plan."""
        magnitude = None
        if stacked is None:
            lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
            scaling, dropout = self.scaling[name], dropout_p(self.lora_dropout[name])
            magnitude = self.dora_magnitude(name)
        else:
            (lora_a, lora_b), scaling, dropout = stacked, 1.0, 0.0
        y, plan = run_adapter(
            x,
            self.base_weight_args(),
            lora_a,
            lora_b,
            scaling=scaling,
            dropout=dropout,
            training=self.training,
            criterion=self.criterion,
            plan=None if self.plan is None else as_plan(self.plan),
            magnitude=magnitude,
            save_output=self.dora_save_output,
        )
        self.note_plan(x, plan)
        return y, plan

    @property
    def fuse(self) -> bool:
        """Run this layer and the layers called right after it with the very same input as one
        ``fused_lora_linear`` call (``runlora.layers.groups``), where the host supports it and
        the planner finds that it pays (``runlora.planning.fusion``)."""
        return self.__dict__.get("_runlora_fuse", False)

    @fuse.setter
    def fuse(self, value: bool) -> None:
        self.__dict__["_runlora_fuse"] = bool(value)
        if value:
            groups.enable()

    def __setstate__(self, state: dict) -> None:  # unpickled in a fresh process, or deep-copied
        super().__setstate__(state)
        if state.get("_runlora_fuse"):
            groups.enable()

    def plain_adapter(self) -> str | None:
        """The name of the layer's one active adapter when a plain call (no extra arguments)
        runs it alone through the op, else None; a host that joins shared-input groups
        (``runlora.layers.groups``) provides it."""
        return None

    def note_plan(self, x: Tensor, plan: Plan) -> None:
        """Remember the plan of the last eager call (``plan_summary``, ``runlora.describe``)."""
        if not torch.compiler.is_compiling():
            self.__dict__["_last_plan"] = (x.numel() // max(1, x.shape[-1]), plan)
            if x.requires_grad and torch.is_grad_enabled():
                self.__dict__["_runlora_input_remade"] = remake_of(x) is not None

    def fused_args(self, x: Tensor, name: str) -> tuple:
        """What ``fused_lora_linear`` takes for plain adapter ``name`` on input ``x``:
        ``(weight (out, in), bias or None, A (r, in), B (out, r), scaling, dropout, plan)``,
        A and B in ``x``'s dtype, dropout 0 outside training, the plan as ``call_op`` would
        look it up. The base must not be quantized (``base_weight_args()[2] is None``)."""
        weight, bias, _ = self.base_weight_args()
        lora_a, lora_b = in_activation_dtype(x, self.lora_A[name].weight, self.lora_B[name].weight)
        p = dropout_p(self.lora_dropout[name]) if self.training else 0.0
        plan = self.plan
        if plan is None:
            plan = adapter_plan(
                x, lora_a, lora_b, criterion=self.criterion, bias=bias is not None, dropout=p
            )
        else:
            plan = as_plan(plan)
        return weight, bias, lora_a, lora_b, self.scaling[name], p, plan

    def planned_dropout(self, name: str) -> float:
        """The dropout probability the LoRA pair of adapter ``name`` is planned with in training:
        its own, or 0 for DoRA, whose orders handle the dropout themselves (``run_adapter``)."""
        if self.dora_magnitude(name) is not None:
            return 0.0
        return dropout_p(self.lora_dropout[name])

    def dora_magnitude(self, name: str) -> Tensor | None:
        """DoRA's magnitude m ``(out,)`` of adapter ``name``, or None for a plain LoRA adapter
        (a host with DoRA adapters, PEFT's layer, overrides this)."""
        return None

    def op_adapters(self, names: list[str]) -> list[str]:
        """Which of the adapters ``names`` run inside the one op call, their ranks stacked:
        all of them, but for training with dropout, where each adapter draws its own mask (as
        PEFT does) and only the first runs in the op."""
        if len(names) > 1 and self.training:
            if any(dropout_p(self.lora_dropout[n]) for n in names):
                return names[:1]
        return names

    def run(self, x: Tensor, names: list[str]) -> tuple[Tensor, Plan]:
        """The base layer plus the LoRA terms of ``names`` (all present in the layer):
        ``(..., in)`` -> ``(..., out)``, and the plan the op ran."""
        inside = self.op_adapters(names)
        if len(inside) == 1:
            y, plan = self.call_op(x, inside[0])
        else:
            # sum_k s_k (X A_kᵀ) B_kᵀ = X [A_1; A_2; ...]ᵀ [s_1 B_1, s_2 B_2, ...]ᵀ: one op call
            # of rank sum(r_k), planned like any other shape
            lora_a = torch.cat([self.lora_A[n].weight for n in inside])
            lora_b = torch.cat([self.scaling[n] * self.lora_B[n].weight for n in inside], dim=1)
            y, plan = self.call_op(x, None, stacked=(lora_a, lora_b))
        for name in names[len(inside) :]:  # op by op, each with its own dropout mask
            lx = self.lora_dropout[name](x).to(self.lora_A[name].weight.dtype)
            term = self.lora_B[name](self.lora_A[name](lx)) * self.scaling[name]
            y = y + term.to(y.dtype)
        return y, plan

    def plan_summary(self) -> str:
        """The plan this layer runs, as ``print(model)`` and ``runlora.describe`` show it."""
        if self.plan is not None:
            p = as_plan(self.plan)
            return f"{p.forward}/{p.backward} (fixed)"
        if self._last_plan is not None:
            n, p = self._last_plan
            return f"{p.forward}/{p.backward} ({p.criterion}, N≤{token_bucket(n)})"
        return f"by {self.criterion} at first call"


class RunLoRALinear(LoRAEngine, nn.Module):
    """A linear layer with a LoRA adapter: ``y = base_layer(x) + s · B A dropout(x)``.

    Args:
        base_layer: an ``nn.Linear`` (weight ``(out, in)``) or transformers' ``Conv1D`` (weight
            ``(in, out)``); kept as it is, its weight is frozen, never copied.
        r: the adapter's rank.
        lora_alpha: s = lora_alpha / r (or / sqrt(r) with ``use_rslora``).
        lora_dropout: dropout probability on the adapter's input (PEFT's semantics).
        adapter_name: the key of this adapter in ``lora_A``/``lora_B`` (PEFT's ``"default"``).
        init_lora_weights: True (A Kaiming-uniform, B zeros: starts as the base layer),
            ``"gaussian"`` (A ~ N(0, 1/r²), B zeros) or False (both nn.Linear's random init).
        fan_in_fan_out: the base weight is stored ``(in, out)``; None: True for Conv1D only.
        criterion: how plans are chosen (a key of ``runlora.CRITERIA``).

    More adapters: ``update_layer`` adds one, ``set_adapter`` picks the active ones (several
    active adapters add up), ``delete_adapter`` removes one; ``forward(x, adapter_names=[...])``
    runs each example with its own adapter (``runlora.layers.routing``).

    Shapes: input ``(..., in_features)``, output ``(..., out_features)``.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        *,
        adapter_name: str = "default",
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        fan_in_fan_out: bool | None = None,
        criterion: str = "flops",
    ) -> None:
        super().__init__()
        known_criterion(criterion)
        conv1d = _is_conv1d(base_layer)
        if fan_in_fan_out is None:
            fan_in_fan_out = conv1d
        elif conv1d and not fan_in_fan_out:
            warnings.warn(
                "Conv1D stores its weight as (in, out); using fan_in_fan_out=True", stacklevel=2
            )
            fan_in_fan_out = True
        self.base_layer = base_layer
        self._base_args_fn = base_args_fn(base_layer)
        self.fan_in_fan_out = bool(fan_in_fan_out)
        weight, _, quant = self.base_weight_args()
        self.out_features, self.in_features = _out_in(
            base_layer, weight, quant, self.fan_in_fan_out
        )
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self._active_adapters: list[str] = [adapter_name]
        self.criterion = criterion
        self.plan: Plan | None = None
        self.disable_adapters = False
        self.merged_adapters: list[str] = []
        for p in base_layer.parameters(recurse=False):
            p.requires_grad_(False)
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights)

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
    ) -> None:
        """Create (or replace) the adapter ``adapter_name``: A ``(r, in)``, B ``(out, r)``."""
        positive_int("r", r)
        dropout_probability("lora_dropout", lora_dropout)
        weight, _, quant = self.base_weight_args()
        like = {
            "device": (weight if quant is None else quant).device,
            "dtype": (weight if quant is None else quant).dtype,
        }
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, **like)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False, **like)
        self.lora_dropout[adapter_name] = (
            nn.Dropout(lora_dropout) if lora_dropout else nn.Identity()
        )
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.reset_lora_parameters(adapter_name, init_lora_weights)
        if adapter_name not in self._active_adapters:  # a new adapter waits for set_adapter
            self.lora_A[adapter_name].requires_grad_(False)
            self.lora_B[adapter_name].requires_grad_(False)

    @torch.no_grad()
    def reset_lora_parameters(self, adapter_name: str, init_lora_weights: bool | str) -> None:
        """PEFT's initialisations (see the class docstring)."""
        if init_lora_weights is False:
            return
        a = self.lora_A[adapter_name].weight
        if init_lora_weights == "gaussian":
            nn.init.normal_(a, std=1.0 / self.r[adapter_name])
        elif init_lora_weights is True:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        else:
            raise ValueError(
                f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}"
            )
        nn.init.zeros_(self.lora_B[adapter_name].weight)

    def base_weight_args(self) -> tuple:
        """``(weight (out, in) view or None, bias, quant)``: the one place the base is read."""
        return self._base_args_fn(self.base_layer, self.fan_in_fan_out)

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    @property
    def weight(self) -> Tensor:
        """The base layer's weight, as stored (``(out, in)``, or ``(in, out)`` for Conv1D)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def active_adapters(self) -> list[str]:
        """The adapters the layer runs (their LoRA terms add up), in order."""
        return list(self._active_adapters)

    @property
    def active_adapter(self) -> str | list[str]:
        """The active adapter's name, or the list of them when several are active (PEFT's)."""
        names = self._active_adapters
        return names[0] if len(names) == 1 else list(names)

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """Make ``adapter_names`` the active adapters: trainable unless ``inference_mode``, every
        other adapter of the layer frozen (PEFT's ``set_adapter``). Names this layer lacks are
        kept (a model's adapters need not target the same layers) and skipped in forward."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for key in self.lora_A:
            trainable = key in names and not inference_mode
            self.lora_A[key].requires_grad_(trainable)
            self.lora_B[key].requires_grad_(trainable)
        self._active_adapters = names

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name``; if it was active, the other active ones stay, or the first
        remaining adapter becomes active."""
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged; unmerge it before deleting it")
        for table in (self.lora_A, self.lora_B, self.lora_dropout):
            if adapter_name in table:
                del table[adapter_name]
        for table in (self.r, self.lora_alpha, self.scaling):
            table.pop(adapter_name, None)
        if adapter_name in self._active_adapters:
            rest = [n for n in self._active_adapters if n != adapter_name]
            self._active_adapters = rest or list(self.lora_A)[:1]

    def forward(self, x: Tensor, *args, adapter_names=None, **kwargs) -> Tensor:
        """``(..., in_features)`` -> ``(..., out_features)``.

        ``adapter_names``: one adapter name per example (dim 0 of ``x``), in eval mode only.
        """
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return mixed_batch_forward(self, x, Routing(adapter_names), args, kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        names = self._active_adapters
        if len(names) == 1 and names[0] in self.lora_A:  # the common case, kept short
            y, plan = self.call_op(x, names[0])
        else:
            names = self.live_adapters()
            if not names:
                return self.base_layer(x, *args, **kwargs)
            y, plan = self.run(x, names)
        return y

    def delta_weight(self, adapter_name: str | None = None) -> Tensor:
        """s · B A, shaped like the stored base weight (``(out, in)``, ``(in, out)`` for Conv1D)."""
        name = adapter_name or self._active_adapters[0]
        delta = self.scaling[name] * (self.lora_B[name].weight @ self.lora_A[name].weight)
        return delta.t() if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None) -> None:
        """W += s·B A in place for each active adapter (or each of ``adapter_names``) not merged
        yet; the base tensor keeps its storage."""
        names = self.live_adapters() if adapter_names is None else list(adapter_names)
        names = [n for n in names if n not in self.merged_adapters]
        if not names:
            return
        if self.base_weight_args()[2] is not None:
            raise NotImplementedError("merging into a quantized base weight is not supported")
        for name in names:
            if name in self.lora_A:  # a model's adapters need not all target this layer
                delta = self.delta_weight(name).to(self.base_layer.weight.dtype)
                self.base_layer.weight.add_(delta)
                self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """W -= s·B A: restores W up to float rounding (one add and one subtract)."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            self.base_layer.weight.sub_(self.delta_weight(name).to(self.base_layer.weight.dtype))

    def extra_repr(self) -> str:
        names = self.live_adapters()
        r = self.r[names[0]] if len(names) == 1 else {n: self.r[n] for n in names}
        plan = self.plan_summary()
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={r}, "
            f"plan={plan}{', merged' if self.merged else ''}"
        )
