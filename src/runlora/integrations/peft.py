"""runlora as the engine of PEFT's LoRA layers: the model stays PEFT's own ``PeftModel``.

TRL, HF Trainer, accelerate and transformers branch on ``isinstance(model, peft.PeftModel)``
(adapter-only checkpoints, the reference model of DPO/GRPO as the model with adapters
disabled, ``enable_input_require_grads`` under gradient checkpointing). So runlora does not
wrap the model: it changes the class of each of PEFT's LoRA ``Linear`` layers (plain, and the
bitsandbytes 4/8-bit ones) to a subclass whose forward runs ``runlora.lora_linear``. Identity,
parameters (the same tensors), state-dict keys, adapter files and every other method of the
layer stay PEFT's; ``isinstance(layer, peft.tuners.lora.Linear)`` still holds.

Three ways in:

- ``get_runlora_model(model, config)``: ``peft.get_peft_model`` then ``from_peft``;
- ``from_peft(peft_model)``: an existing PEFT model, in place;
- ``patch_peft()``: every LoRA layer PEFT creates from then on (``get_peft_model``,
  ``PeftModel.from_pretrained``, ``SFTTrainer(peft_config=...)``, ``DPOTrainer``, ...), until
  ``unpatch_peft()`` or the end of its ``with`` block.

DoRA adapters (``use_dora=True``) run ``runlora.ops.dora.dora_linear``, PEFT's DoRA math in
planned orders. What the op does not run keeps PEFT's forward, per adapter: ``lora_bias``, other
LoRA variants, several active adapters with DoRA among them, Embedding/Conv LoRA layers and
base layers runlora has no kind for.
Layers that the model calls one after another with the same input (q/k/v, gate/up) run as one
fused op (``runlora.layers.groups``; ``from_peft(fuse=False)`` turns it off).
``describe(model)`` reports, for every LoRA layer, which engine runs it and why, and its group.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..config import LoraConfig as _RunLoRAConfig
from ..layers import groups, recompute
from ..layers.layer import LoRAEngine, RunLoRALinear, base_args_fn, is_supported_base
from ..layers.routing import BASE, Routing, mixed_batch_forward
from ..ops.dora import forget_weight_norms
from ..planning.criteria import known_criterion

__all__ = [
    "get_runlora_model",
    "from_peft",
    "from_pretrained",
    "patch_peft",
    "unpatch_peft",
    "describe",
    "LayerReport",
    "PatchHandle",
    "is_accelerated",
    "save_adapter_files",
]

_HF_EXTRA = "pip install 'runlora[hf]'"


def _peft():
    """``peft``, or an ImportError that says how to install it."""
    try:
        import peft
    except ImportError as err:
        raise ImportError(
            f"runlora's model-level API runs inside PEFT, which is not installed: {_HF_EXTRA} "
            "(the op runlora.lora_linear and runlora.RunLoRALinear work without it)"
        ) from err
    return peft


# --- the accelerated layer classes ---------------------------------------------------------


def _peft_linear_classes() -> tuple[type, ...]:
    """PEFT's LoRA Linear classes runlora accelerates: the plain one (``nn.Linear`` and
    ``Conv1D`` bases) and, when bitsandbytes is importable, the 4/8-bit ones."""
    from peft.tuners.lora import Linear

    classes = [Linear]
    if sys.modules.get("bitsandbytes") is not None:
        from peft.tuners.lora import bnb as peft_bnb

        classes += [
            getattr(peft_bnb, n) for n in ("Linear8bitLt", "Linear4bit") if hasattr(peft_bnb, n)
        ]
    return tuple(classes)


def _dora_variant_classes() -> tuple[type, ...]:
    """PEFT's DoRA variant of a Linear layer (runlora runs it with ``dora_linear``)."""
    try:
        from peft.tuners.lora.variants import DoraLinearVariant
    except ImportError:  # a PEFT without variants marks DoRA by use_dora alone
        return ()
    return (DoraLinearVariant,)


def _is_dora(layer: nn.Module, name: str) -> bool:
    return bool(getattr(layer, "use_dora", {}).get(name))


def _adapter_reason(layer: nn.Module, name: str) -> str | None:
    """Why adapter ``name`` of a PEFT layer runs PEFT's forward, or None if the op runs it."""
    if getattr(layer, "lora_bias", {}).get(name):
        return "lora_bias=True runs PEFT's forward"
    variant = getattr(layer, "lora_variant", {}).get(name)
    dora = _is_dora(layer, name)
    if variant is not None and not (dora and type(variant) in _dora_variant_classes()):
        return f"LoRA variant {type(variant).__name__} runs PEFT's forward"
    if dora and name not in getattr(layer, "lora_magnitude_vector", {}):
        return "DoRA without a magnitude vector runs PEFT's forward"
    return None


def _adapters_reason(layer: nn.Module, names: list[str]) -> str | None:
    """Why adapters ``names``, active together, run PEFT's forward, or None if the op runs them."""
    for name in names:
        reason = _adapter_reason(layer, name)
        if reason is not None:
            return f"adapter {name!r}: {reason}"
    if len(names) > 1 and any(_is_dora(layer, n) for n in names):
        # PEFT adds each DoRA term onto the output of the adapters before it
        return "several active adapters with DoRA among them run PEFT's forward"
    return None


class PeftEngine(LoRAEngine):
    """The forward runlora gives a PEFT LoRA ``Linear`` (mixed in before PEFT's class).

    ``(..., in_features)`` -> ``(..., out_features)``, with PEFT's semantics: disabled adapters,
    merged adapters, several active adapters (their terms add up), ``adapter_names=`` (one
    adapter per example, in eval mode). Adapters PEFT keeps in another dtype than the
    activations (fp32 adapters on a bf16 base) run in the activations' dtype; gradients reach
    them in their own.
    """

    _runlora_fallback: str | None = None  # why the last call ran PEFT's forward

    def _base_state(self) -> tuple:
        """``(child, base, reader, why PEFT's forward must run or None)``, found again only when
        the ``base_layer`` child is replaced (``get_base_layer`` walks nested wrappers)."""
        child = self._modules.get("base_layer")
        cached = self.__dict__.get("_runlora_base")
        if cached is None or cached[0] is not child:
            base = self.get_base_layer()
            hook = getattr(base, "_hf_hook", None)
            why = None
            if getattr(hook, "offload", False):
                # accelerate's device_map offload keeps the weight on "meta" and loads it in a
                # hook around the base layer's own forward, which the op does not call
                why = "the base weight is offloaded by accelerate (device_map): PEFT's forward"
            cached = self.__dict__["_runlora_base"] = (child, base, base_args_fn(base), why)
        return cached

    def base_weight_args(self) -> tuple:
        _, base, fn, _ = self._base_state()
        return fn(base, self.fan_in_fan_out)

    def _fallback_reason(self, names, args, kwargs) -> str | None:
        if args or any(v is not None for k, v in kwargs.items() if k != "adapter_names"):
            return "the call passed extra arguments to the base layer"
        offloaded = self._base_state()[3]
        if offloaded is not None and names:
            return offloaded
        return _adapters_reason(self, names)

    def dora_magnitude(self, name: str) -> Tensor | None:
        """PEFT's ``lora_magnitude_vector[name].weight`` ``(out,)`` for a DoRA adapter."""
        if not _is_dora(self, name):
            return None
        return self.lora_magnitude_vector[name].weight

    def merge(self, *args, **kwargs) -> None:
        super().merge(*args, **kwargs)
        self._forget_weight_norms()

    def unmerge(self, *args, **kwargs) -> None:
        super().unmerge(*args, **kwargs)
        self._forget_weight_norms()

    def _forget_weight_norms(self) -> None:
        # PEFT's plain-LoRA merge edits weight.data in place, which torch's version counter
        # does not see: drop the cached ‖W‖² DoRA keeps for this base weight
        weight = getattr(self.get_base_layer(), "weight", None)
        if isinstance(weight, Tensor):
            forget_weight_norms(weight)

    def plain_adapter(self) -> str | None:
        d = self.__dict__
        name = d.get("_active_adapter")
        if type(name) is list and len(name) == 1:  # PEFT's set_adapter stores a list
            name = name[0]
        if (
            isinstance(name, str)
            and not d.get("_disable_adapters")
            and not d.get("merged_adapters")
            and name in self._modules["lora_A"]
            and _adapter_reason(self, name) is None
            and self._base_state()[3] is None
        ):
            return name
        return None

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        # shared-input groups keep state between calls: only once some layer fuses, eagerly
        grouping = groups.ENABLED and not torch.compiler.is_compiling()
        if not args and not kwargs:  # the common case, kept short: one plain active adapter
            name = self.plain_adapter()
            if name is not None:
                if grouping:
                    if self.fuse:
                        return groups.grouped_call(self, x, name)
                    groups.interrupt()
                return self.call_op(x, name)[0]
        if grouping:
            groups.interrupt()
        adapter_names = kwargs.get("adapter_names")
        if self.disable_adapters or (self.merged and adapter_names is None):
            names: list[str] = []
        elif adapter_names is None:
            names = self.live_adapters()
        else:
            names = [n for n in dict.fromkeys(adapter_names) if n != BASE and n in self.lora_A]
        reason = self._fallback_reason(names, args, kwargs) if names or args or kwargs else None
        if reason is not None:
            self.__dict__["_runlora_fallback"] = reason
            return super().forward(x, *args, **kwargs)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x)
        if adapter_names is not None:
            self._check_forward_args(x, adapter_names=adapter_names)
            return self._mixed_batch_forward(x, adapter_names=adapter_names)
        if not names:  # merged, or no active adapter in this layer
            return self.base_layer(x)
        return self.run(x, names)[0]

    def _mixed_batch_forward(self, x: Tensor, *args, adapter_names, **kwargs) -> Tensor:
        """PEFT's mixed-batch path, run by ``runlora.layers.routing``: the base product once for
        the batch, each adapter's low-rank term added to its rows (grouped or stacked)."""
        used = {n for n in adapter_names if n != BASE and n in self.lora_A}
        if args or kwargs or any(_adapter_reason(self, n) or _is_dora(self, n) for n in used):
            return super()._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        return mixed_batch_forward(self, x, _routing(adapter_names), (), {})

    def __repr__(self) -> str:
        return "runlora." + super().__repr__()


_ROUTING = threading.local()


def _routing(adapter_names) -> Routing:
    """One ``Routing`` for all the layers of one call: PEFT hands every layer the same list,
    so its groups and masks are built once per call (and once per ``generate``)."""
    cached = getattr(_ROUTING, "last", None)
    if (
        cached is not None
        and cached[0] is adapter_names
        and cached[1].names == tuple(adapter_names)
    ):
        return cached[1]
    routing = Routing(adapter_names)
    _ROUTING.last = (adapter_names, routing)
    return routing


@functools.cache
def _accelerated_class(peft_cls: type) -> type:
    """``PeftEngine`` mixed into ``peft_cls``, named and registered so that pickle finds it."""
    name = "RunLoRA" + (
        "PeftLinear"
        if peft_cls.__module__ == "peft.tuners.lora.layer"
        else "Peft" + peft_cls.__name__
    )
    cls = type(name, (PeftEngine, peft_cls), {"__module__": __name__, "__qualname__": name})
    globals()[name] = cls
    return cls


def __getattr__(name: str) -> type:
    """The accelerated classes by name, made on first use: a process that unpickles a model
    (``torch.load``, a spawned worker) has not switched any layer yet."""
    if name == "RunLoRAPeftLinear":
        from peft.tuners.lora import Linear

        return _accelerated_class(Linear)
    if name.startswith("RunLoRAPeft"):
        try:
            from peft.tuners.lora import bnb as peft_bnb
        except ImportError:
            peft_bnb = None
        peft_cls = getattr(peft_bnb, name[len("RunLoRAPeft") :], None)
        if isinstance(peft_cls, type):
            return _accelerated_class(peft_cls)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_accelerated(module: nn.Module) -> bool:
    """True for a layer whose forward runs runlora's op (a ``RunLoRALinear`` or a PEFT layer
    switched by runlora)."""
    return isinstance(module, LoRAEngine)


def _accelerate(
    module: nn.Module,
    criterion: str,
    dora_save_output: bool | None = None,
    fuse: bool | None = None,
) -> bool:
    """Switch one PEFT LoRA layer to runlora's forward (in place); False if it cannot be."""
    if not isinstance(module, PeftEngine):
        if type(module) not in _peft_linear_classes():
            return False
        if not is_supported_base(module.get_base_layer()):
            return False
        module.__class__ = _accelerated_class(type(module))
    module.criterion = criterion
    if dora_save_output is not None:
        module.dora_save_output = dora_save_output
    if fuse is not None:
        module.fuse = fuse
    elif "_runlora_fuse" not in module.__dict__:  # a layer switched for the first time
        module.fuse = True
    return True


def _lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # no PEFT: describe() still reports RunLoRALinear layers
        LoraLayer = RunLoRALinear

    for name, module in model.named_modules():
        if isinstance(module, (LoraLayer, RunLoRALinear)):
            yield name, module


def _runs_op(layer: nn.Module) -> bool:
    """True if runlora's op runs at least one adapter of ``layer`` (a switched class whose
    adapters are all DoRA / lora_bias / other variants runs PEFT's forward only)."""
    return is_accelerated(layer) and any(_adapter_reason(layer, n) is None for n in layer.lora_A)


def _warn_if_none_accelerated(model: nn.Module) -> None:
    """Warn when no LoRA layer of ``model`` runs runlora's op; once for a given set of layers
    (``get_runlora_model`` under ``patch_peft`` checks twice)."""
    layers = [m for _, m in _lora_layers(model)]
    if not layers or any(_runs_op(m) for m in layers):
        return
    if all(m.__dict__.get("_runlora_warned") for m in layers):
        return
    for m in layers:
        m.__dict__["_runlora_warned"] = True
    kinds = sorted({type(m).__name__ for m in layers})
    warnings.warn(
        f"runlora: none of this model's {len(layers)} LoRA layers ({', '.join(kinds)}) can "
        "run runlora's op, so all of them run PEFT's forward; runlora.describe(model) says why",
        stacklevel=3,
    )


def from_peft(
    peft_model: nn.Module,
    *,
    criterion: str = "flops",
    dora_save_output: bool | None = None,
    fuse: bool | None = None,
    recompute_inputs: bool = True,
) -> nn.Module:
    """Run every LoRA ``Linear`` of a PEFT model on runlora's op, in place (DoRA adapters on
    ``dora_linear``). Calling it again on the same model changes only the settings.

    Args:
        peft_model: a ``peft.PeftModel`` (or any module holding PEFT LoRA layers).
        criterion: how runlora plans each layer (``"flops"``, ``"time"``, ``"roofline"``).
        dora_save_output: DoRA layers keep the unscaled output ``(N, out)`` for the magnitude's
            gradient (True, the default: no extra product in backward), or recompute ``x Wᵀ``
            in backward instead (False: saved bytes as LoRA's, one more ``N·in·out`` product).
            None leaves each layer's setting as it is.
        fuse: True (what a layer switched for the first time gets): layers that the model
            calls one after another with the very same input (q_proj, k_proj, v_proj;
            gate_proj, up_proj) run as one ``fused_lora_linear`` call where the op's cost model
            finds that it pays (``runlora.planning.fusion``), found at the first forward
            (``runlora.layers.groups``; ``describe`` shows the groups). False: each layer runs
            its own op. None leaves each layer's setting as it is.
        recompute_inputs: True (the default): the RMSNorm / LayerNorm outputs and the gated
            MLP's ``act(gate) * up`` that feed LoRA layers are formed again in backward from
            tensors autograd keeps anyway, instead of being saved (``runlora.layers.recompute``):
            training saves what the frozen model saves. False: give those modules their own
            forward back, and the op saves each layer's input.

    Returns:
        ``peft_model`` itself, with the same parameter tensors (an optimizer built before keeps
        working). Layers the op cannot run keep PEFT's forward (``describe`` says which); a
        model none of whose layers it can run gives a warning. LoRA layers PEFT creates for
        this model later (``add_adapter`` / ``load_adapter`` with other targets) run the op too.
    """
    _peft()
    known_criterion(criterion)
    if dora_save_output is not None and not isinstance(dora_save_output, bool):
        raise TypeError(f"dora_save_output must be True, False or None, got {dora_save_output!r}")
    if fuse is not None and not isinstance(fuse, bool):
        raise TypeError(f"fuse must be True, False or None, got {fuse!r}")
    if not isinstance(recompute_inputs, bool):
        raise TypeError(f"recompute_inputs must be True or False, got {recompute_inputs!r}")
    from peft.tuners.lora import LoraModel

    layers = list(_lora_layers(peft_model))
    if not layers:
        warnings.warn(
            f"runlora.from_peft: this {type(peft_model).__name__} holds no PEFT LoRA layer, so "
            "there is nothing to run on runlora's op (build it with peft.get_peft_model, or use "
            "runlora.get_runlora_model)",
            stacklevel=2,
        )
    for _, module in layers:
        _accelerate(module, criterion, dora_save_output, fuse)
    for tuner in peft_model.modules():
        if isinstance(tuner, LoraModel):
            # Layers PEFT creates later for this model (add_adapter / load_adapter with other
            # targets) run the op too: LoraModel.inject_adapter calls self._create_new_module.
            tuner.__dict__["_create_new_module"] = functools.partial(
                _create_accelerated, criterion, dora_save_output, fuse
            )
    recompute.enable(peft_model, recompute_inputs)
    _warn_if_none_accelerated(peft_model)
    return peft_model


def _create_accelerated(
    criterion: str,
    dora_save_output: bool | None,
    fuse: bool,
    lora_config,
    adapter_name,
    target,
    **kwargs,
):
    """``LoraModel._create_new_module``, the new layer switched to runlora's op."""
    from peft.tuners.lora import LoraModel

    module = LoraModel._create_new_module(lora_config, adapter_name, target, **kwargs)
    _accelerate(module, criterion, dora_save_output, fuse)
    return module


def _to_peft_config(config):
    peft = _peft()
    if isinstance(config, _RunLoRAConfig):
        data = config.to_peft_dict()
        data.pop("peft_type", None)
        return peft.LoraConfig(**data), config.criterion
    if isinstance(config, peft.LoraConfig):
        return config, None
    raise TypeError(
        f"config must be a runlora.LoraConfig or a peft.LoraConfig, got {type(config).__name__}"
    )


def get_runlora_model(
    model: nn.Module,
    config,
    adapter_name: str = "default",
    *,
    criterion: str | None = None,
    **peft_kwargs,
):
    """PEFT's ``get_peft_model`` with runlora's op in its LoRA layers.

    Args:
        model: a transformers (or any PyTorch) model, changed in place as PEFT changes it (no
            weight is copied).
        config: a ``runlora.LoraConfig`` (PEFT's fields, plus ``criterion``) or a
            ``peft.LoraConfig``.
        adapter_name: the adapter's name (PEFT's ``"default"``).
        criterion: how layers are planned; default: ``config.criterion``, or ``"flops"``.
        peft_kwargs: passed to ``peft.get_peft_model`` (``autocast_adapter_dtype``, ...).

    Returns:
        A real ``peft.PeftModel``: its ``save_pretrained`` writes PEFT's files (runlora's own
        options are not in them), and TRL, HF Trainer and accelerate treat it as PEFT's.

    Raises:
        ImportError: without PEFT (``pip install 'runlora[hf]'``).
        ValueError: targets that match nothing (PEFT's message), an unknown criterion, or a
            model that is a PeftModel already (use ``from_peft``).
    """
    peft = _peft()
    peft_config, config_criterion = _to_peft_config(config)
    criterion = criterion or config_criterion or "flops"
    known_criterion(criterion)
    if isinstance(model, peft.PeftModel) or any(
        isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer) for m in model.modules()
    ):
        raise ValueError(
            "this model already has PEFT adapters: use runlora.from_peft(model) to run them on "
            "runlora's op, or model.add_adapter(name, config) for another adapter"
        )
    peft_model = peft.get_peft_model(model, peft_config, adapter_name=adapter_name, **peft_kwargs)
    return from_peft(peft_model, criterion=criterion)


def from_pretrained(
    model: nn.Module, model_id, adapter_name: str = "default", *, criterion: str = "flops", **kwargs
):
    """``peft.PeftModel.from_pretrained`` (an adapter saved by PEFT or runlora) with runlora's op
    in its LoRA layers. ``kwargs``: PEFT's (``is_trainable``, ``config``, ...)."""
    peft = _peft()
    known_criterion(criterion)
    return from_peft(
        peft.PeftModel.from_pretrained(model, model_id, adapter_name=adapter_name, **kwargs),
        criterion=criterion,
    )


# --- patch_peft ----------------------------------------------------------------------------


class _Patch:
    """What ``patch_peft`` changed on PEFT's ``LoraModel`` (to undo it) and the criterion new
    layers get."""

    def __init__(self, criterion: str) -> None:
        self.criterion = criterion
        self.saved: dict[str, object] = {}


class PatchHandle:
    """What ``patch_peft`` returns. As a context manager, its exit undoes that call: it
    unpatches PEFT if the call patched it, or restores the criterion if PEFT was patched
    already (so ``with runlora.patch_peft(): ...`` inside a patched script leaves it patched)."""

    def __init__(self, criterion: str, previous: str | None) -> None:
        self.criterion = criterion
        self._previous = previous  # the criterion before this call, None if it patched

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is None:
            unpatch_peft()
        elif _ACTIVE is not None:
            _ACTIVE.criterion = self._previous

    def __repr__(self) -> str:
        return f"runlora.patch_peft(criterion={self.criterion!r})"


_ACTIVE: _Patch | None = None
_PATCH_LOCK = threading.RLock()
_MISSING = object()


def patch_peft(criterion: str = "flops") -> PatchHandle:
    """From now on, every LoRA ``Linear`` that PEFT creates runs runlora's op.

    That covers ``peft.get_peft_model``, ``PeftModel.from_pretrained``, ``add_adapter`` /
    ``load_adapter``, and the trainers that build the PeftModel themselves:
    ``trl.SFTTrainer(peft_config=...)``, ``DPOTrainer``, ``GRPOTrainer``. One line at the top of
    a training script::

        runlora.patch_peft()

    or for a block only: ``with runlora.patch_peft(): ...``. Calling it again changes the
    criterion. Models built before the call are not changed (``from_peft`` does that).

    Args:
        criterion: how runlora plans each layer (``"flops"``, ``"time"``, ``"roofline"``).

    Returns:
        A ``PatchHandle``; as a context manager its exit undoes this call (see there).
    """
    with _PATCH_LOCK:
        return _patch(criterion)


def _patch(criterion: str) -> PatchHandle:
    global _ACTIVE
    _peft()
    known_criterion(criterion)
    if _ACTIVE is not None:
        previous, _ACTIVE.criterion = _ACTIVE.criterion, criterion
        return PatchHandle(criterion, previous)
    from peft.tuners.lora import LoraModel

    patch = _Patch(criterion)
    for attr in ("_create_new_module", "inject_adapter"):
        patch.saved[attr] = LoraModel.__dict__.get(attr, _MISSING)
    create = LoraModel._create_new_module  # the plain function behind the staticmethod
    inject = LoraModel.inject_adapter

    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        module = create(lora_config, adapter_name, target, **kwargs)
        if _ACTIVE is not None:
            _accelerate(module, _ACTIVE.criterion)
        return module

    @functools.wraps(inject)
    def inject_adapter(self, model, adapter_name, *args, **kwargs):
        out = inject(self, model, adapter_name, *args, **kwargs)
        if _ACTIVE is not None:
            recompute.enable(model)
            _warn_if_none_accelerated(model)
        return out

    LoraModel._create_new_module = staticmethod(_create_new_module)
    LoraModel.inject_adapter = inject_adapter
    _ACTIVE = patch
    return PatchHandle(criterion, None)


def unpatch_peft() -> None:
    """Undo ``patch_peft``: PEFT creates its own LoRA layers again. Layers created while patched
    keep runlora's forward (their model's state is theirs). A no-op when not patched."""
    with _PATCH_LOCK:
        _unpatch()


def _unpatch() -> None:
    global _ACTIVE
    if _ACTIVE is None:
        return
    from peft.tuners.lora import LoraModel

    for attr, value in _ACTIVE.saved.items():
        if value is _MISSING:
            if attr in LoraModel.__dict__:
                delattr(LoraModel, attr)
        else:
            setattr(LoraModel, attr, value)
    _ACTIVE = None


# --- describe ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerReport:
    """One LoRA layer as ``describe`` sees it.

    ``engine`` is ``"runlora"`` (the op runs it; ``detail`` is its plan) or ``"peft"`` (PEFT's
    forward; ``detail`` says why)."""

    name: str
    kind: str
    in_features: int | None
    out_features: int | None
    ranks: str
    engine: str
    detail: str


class Description(list):
    """``describe``'s rows (``LayerReport``); ``str()`` is the table it prints."""

    def __str__(self) -> str:
        head = ("layer", "kind", "in", "out", "r", "engine", "plan / why")
        rows = [head] + [
            (
                r.name,
                r.kind,
                "" if r.in_features is None else str(r.in_features),
                "" if r.out_features is None else str(r.out_features),
                r.ranks,
                r.engine,
                r.detail,
            )
            for r in self
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        fast = sum(r.engine == "runlora" for r in self)
        lines.append(f"{fast} of {len(self)} LoRA layers run runlora's op")
        return "\n".join(lines)


def _report(name: str, layer: nn.Module, names: dict[int, str]) -> LayerReport:
    lora_a = getattr(layer, "lora_A", {})
    ranks = ",".join(f"{layer.r[n]}" for n in lora_a if n in getattr(layer, "r", {})) or "-"
    kind = type(layer).__name__
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else None
    kind = f"{kind}({type(base).__name__})" if base is not None else kind
    in_f, out_f = getattr(layer, "in_features", None), getattr(layer, "out_features", None)
    if not is_accelerated(layer):
        if hasattr(layer, "lora_embedding_A") and len(layer.lora_embedding_A):
            why = "Embedding LoRA runs PEFT's forward"
        elif base is not None and not is_supported_base(base):
            why = f"no runlora kind for a {type(base).__name__} base: PEFT's forward"
        elif type(layer) in _peft_linear_classes():
            why = (
                "built without runlora (PEFT's forward): runlora.from_peft(model), or "
                "runlora.patch_peft() before the model is built"
            )
        else:
            why = f"{type(layer).__name__} is not a layer runlora accelerates: PEFT's forward"
        return LayerReport(name, kind, in_f, out_f, ranks, "peft", why)
    reason = _adapters_reason(layer, [n for n in layer.active_adapters if n in lora_a])
    if reason:
        return LayerReport(name, kind, in_f, out_f, ranks, "peft", reason)
    detail = layer.plan_summary()
    remade = layer.__dict__.get("_runlora_input_remade")
    if remade is not None:
        detail += f"; input {'recomputed' if remade else 'saved'}"
    if isinstance(layer, PeftEngine) and layer.fuse:
        detail += "; " + groups.group_summary(layer, names)
    fallback = layer.__dict__.get("_runlora_fallback")
    if fallback:
        detail += f" (a call ran PEFT's forward: {fallback})"
    return LayerReport(name, kind, in_f, out_f, ranks, "runlora", detail)


def describe(model: nn.Module, *, file=sys.stdout) -> Description:
    """For each LoRA layer of ``model``: does runlora's op run it (and with which plan), or
    PEFT's forward (and why). Prints the table to ``file`` (None: don't print).

    Plans appear once a layer has run a forward; before that the row says how it will plan.
    A layer's row also says which layers it is fused with (``from_peft(fuse=...)``), or why
    it runs its own op.
    """
    layers = list(_lora_layers(model))
    names = {id(layer): name for name, layer in layers}
    rows = Description(_report(name, layer, names) for name, layer in layers)
    if file is not None:
        print(rows, file=file)
    return rows


# --- files ---------------------------------------------------------------------------------


def save_adapter_files(
    peft_model: nn.Module,
    directory: str | os.PathLike,
    tensors: dict[str, Tensor],
    adapter_name: str,
) -> Path:
    """Write ``adapter_config.json`` (PEFT's, for ``adapter_name``) and
    ``adapter_model.safetensors`` (``tensors``, PEFT's keys) into ``directory``.

    Each file is written whole in a temporary directory beside ``directory`` and moved into
    place with ``os.replace``, weights first: a crash while writing leaves the previous files
    as they were, never a truncated file. (The pair is two renames: a crash between them leaves
    the new weights beside the previous config, both complete.)"""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # The config as PEFT's save_pretrained writes it: inference_mode on, and for a config
    # without task_type the base class (AutoPeftModel.from_pretrained needs it). The config is
    # written as it is, not a copy: a copied set (target_modules) may list in another order.
    config = peft_model.peft_config[adapter_name]
    auto_mapping = None
    if config.task_type is None and hasattr(peft_model, "_get_base_model_class"):
        base_class = peft_model._get_base_model_class(is_prompt_tuning=config.is_prompt_learning)
        auto_mapping = {
            "base_model_class": base_class.__name__,
            "parent_library": base_class.__module__,
        }
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.runlora-save-", dir=directory.parent))
    inference_mode = config.inference_mode
    try:
        config.inference_mode = True
        try:
            config.save_pretrained(tmp, auto_mapping_dict=auto_mapping)
        finally:
            config.inference_mode = inference_mode
        weights = {k: t.detach().contiguous() for k, t in tensors.items()}
        save_file(weights, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            os.replace(tmp / name, directory / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory
