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

The base layer is read in one place, ``RunLoRALinear._base_weight_args``: an ``nn.Linear``, or
GPT-2's ``Conv1D`` (weight stored ``(in, out)``, used through a transposed view). Quantized base
layers plug in there through ``register_base_kind``.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .function import lora_linear
from .plan_lookup import lookup_plan, token_bucket
from .planner import CRITERIA, Plan, as_plan
from .quant import base_handler as _quantized_handler

__all__ = [
    "RunLoRALinear",
    "run_adapter",
    "base_args_fn",
    "register_base_kind",
    "is_supported_base",
]

#: A base-layer kind: ``matches(layer) -> bool`` and ``args(layer, fan_in_fan_out) -> (weight
#: (out, in) or None, bias or None, quant provider or None)``. ``args`` runs on every forward and
#: must be traceable by Dynamo; ``matches`` runs once, when a layer is wrapped.
BaseKind = tuple[Callable[[nn.Module], bool], Callable[[nn.Module, bool], tuple]]
_BASE_KINDS: list[BaseKind] = []


def register_base_kind(matches: Callable[[nn.Module], bool], args: Callable) -> None:
    """Teach runlora a new kind of base layer (``runlora.quant`` registers bitsandbytes layers).

    Kinds registered later are tried first.
    """
    _BASE_KINDS.insert(0, (matches, args))


def _is_conv1d(layer: nn.Module) -> bool:
    # Conv1D exists only if transformers was imported, and then sys.modules has it.
    module = sys.modules.get("transformers.pytorch_utils")
    cls = getattr(module, "Conv1D", None)
    return cls is not None and isinstance(layer, cls)


def _dense_args(layer: nn.Module, fan_in_fan_out: bool) -> tuple:
    weight = layer.weight.t() if fan_in_fan_out else layer.weight  # (out, in), a view
    return weight, layer.bias, None


register_base_kind(lambda m: isinstance(m, nn.Linear) or _is_conv1d(m), _dense_args)
# bitsandbytes Linear4bit / Linear8bitLt (tried first: they subclass nn.Linear).
register_base_kind(lambda m: _quantized_handler(m) is not None, _quantized_handler)


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
        "are supported (quantized layers through runlora.quant); leave it out of target_modules"
    )


def is_supported_base(layer: nn.Module) -> bool:
    """True if ``layer`` can be wrapped by ``RunLoRALinear``."""
    return any(matches(layer) for matches, _ in _BASE_KINDS)


def _dropout_p(module: nn.Module) -> float:
    return float(module.p) if isinstance(module, nn.Dropout) else 0.0


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
) -> tuple[Tensor, Plan]:
    """``base_layer(x) + scaling · B A dropout(x)`` through the op, planned for ``x``'s shape.

    Args:
        x: shape ``(..., in)``. lora_a: ``(r, in)``. lora_b: ``(out, r)``.
        base_args: ``(weight, bias, quant)`` of the base layer (see ``base_args_fn``).
        plan: a fixed plan, or None for the plan of ``x``'s token count (bucketed, memoised).

    Returns:
        (y of shape ``(..., out)``, the plan used).
    """
    weight, bias, quant = base_args
    # Adapters kept in another dtype than the activations (PEFT keeps fp32 adapters on a bf16
    # base) run in the activations' dtype; the casts are differentiable, so gradients reach the
    # parameters in their own dtype.
    if lora_a.dtype != x.dtype and x.is_floating_point():
        lora_a, lora_b = lora_a.to(x.dtype), lora_b.to(x.dtype)
    if bias is not None and bias.dtype != x.dtype and quant is not None:
        bias = bias.to(x.dtype)
    p = dropout if training else 0.0
    if plan is None:
        out_f, in_f = lora_b.shape[0], lora_a.shape[1]
        plan = lookup_plan(
            x.numel() // max(1, x.shape[-1]),
            in_f,
            out_f,
            lora_a.shape[0],
            criterion=criterion,
            needs_input_grad=x.requires_grad and torch.is_grad_enabled(),
            bias=bias is not None,
            dropout=p,
            dtype=x.dtype,
            device=x.device,
            quantized=quant is not None,
        )
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


class RunLoRALinear(nn.Module):
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
        criterion: how plans are chosen (a key of ``runlora.planner.CRITERIA``).

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
        if criterion not in CRITERIA:
            raise ValueError(f"unknown criterion {criterion!r}; known: {', '.join(CRITERIA)}")
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
        weight, _, quant = self._base_weight_args()
        self.out_features, self.in_features = _out_in(
            base_layer, weight, quant, self.fan_in_fan_out
        )
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapter = adapter_name
        self.criterion = criterion
        self.plan: Plan | None = None
        self.disable_adapters = False
        self.merged_adapters: list[str] = []
        self._last_plan: tuple[int, Plan] | None = None
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
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        weight, _, quant = self._base_weight_args()
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

    def _base_weight_args(self):
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

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """``(..., in_features)`` -> ``(..., out_features)``."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged or self.active_adapter not in self.lora_A:
            return self.base_layer(x, *args, **kwargs)
        name = self.active_adapter
        y, plan = run_adapter(
            x,
            self._base_weight_args(),
            self.lora_A[name].weight,
            self.lora_B[name].weight,
            scaling=self.scaling[name],
            dropout=_dropout_p(self.lora_dropout[name]),
            training=self.training,
            criterion=self.criterion,
            plan=None if self.plan is None else as_plan(self.plan),
        )
        if not torch.compiler.is_compiling():
            self._last_plan = (x.numel() // max(1, x.shape[-1]), plan)  # (tokens, plan)
        return y

    def delta_weight(self, adapter_name: str | None = None) -> Tensor:
        """s · B A, shaped like the stored base weight (``(out, in)``, ``(in, out)`` for Conv1D)."""
        name = adapter_name or self.active_adapter
        delta = self.scaling[name] * (self.lora_B[name].weight @ self.lora_A[name].weight)
        return delta.t() if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self) -> None:
        """W += s·B A in place (the base tensor keeps its storage). A second call does nothing."""
        if self.merged:
            return
        if self._base_weight_args()[2] is not None:
            raise NotImplementedError("merging into a quantized base weight is not supported")
        self.base_layer.weight.add_(self.delta_weight().to(self.base_layer.weight.dtype))
        self.merged_adapters.append(self.active_adapter)

    @torch.no_grad()
    def unmerge(self) -> None:
        """W -= s·B A: restores W up to float rounding (one add and one subtract)."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            self.base_layer.weight.sub_(self.delta_weight(name).to(self.base_layer.weight.dtype))

    def extra_repr(self) -> str:
        r = self.r.get(self.active_adapter)
        if self.plan is not None:
            plan = f"{as_plan(self.plan).forward}/{as_plan(self.plan).backward} (fixed)"
        elif self._last_plan is not None:
            n, p = self._last_plan
            n = token_bucket(n)
            plan = f"{p.forward}/{p.backward} ({p.criterion}, N≤{n})"
        else:
            plan = f"by {self.criterion} at first call"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={r}, "
            f"plan={plan}{', merged' if self.merged else ''}"
        )
