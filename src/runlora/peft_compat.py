"""``from_peft``: run an existing PEFT LoRA model on runlora's op, in place.

Each ``peft.tuners.lora.Linear`` keeps its identity, its parameters (the very same tensors, so an
optimizer built before the switch keeps working) and all of PEFT's machinery (save_pretrained,
merge, disable_adapter, set_adapter): only its class is switched to a subclass whose forward
calls ``runlora.lora_linear``. Whatever that forward does not cover (DoRA and other LoRA
variants, several active adapters, per-example adapter_names, an input dtype other than the
adapter's) falls back to PEFT's own forward.
"""

from __future__ import annotations

import functools
import sys

from torch import Tensor, nn

from .layer import _dropout_p, base_args_fn, is_supported_base, run_adapter

__all__ = ["from_peft"]


def _peft_linear_classes() -> tuple[type, ...]:
    """PEFT's plain LoRA Linear, and its bitsandbytes (QLoRA) layers when bnb is installed."""
    from peft.tuners.lora import Linear as PeftLinear

    classes = [PeftLinear]
    if sys.modules.get("bitsandbytes") is not None:
        from peft.tuners.lora import bnb as peft_bnb

        classes += [
            getattr(peft_bnb, n) for n in ("Linear8bitLt", "Linear4bit") if hasattr(peft_bnb, n)
        ]
    return tuple(classes)


@functools.cache
def _runlora_peft_linear(peft_cls: type | None = None) -> type:
    if peft_cls is None:
        from peft.tuners.lora import Linear as peft_cls

    class RunLoRAPeftLinear(peft_cls):
        """PEFT's ``lora.Linear`` with its single-adapter forward run by ``runlora.lora_linear``."""

        runlora_criterion = "flops"

        def _runlora_adapter(self, x: Tensor, kwargs: dict) -> str | None:
            if self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None:
                return None
            if len(self.active_adapters) != 1:
                return None
            name = self.active_adapters[0]
            if name not in self.lora_A or name in getattr(self, "lora_variant", {}):
                return None
            if getattr(self, "use_dora", {}).get(name) or getattr(self, "lora_bias", {}).get(name):
                return None
            if self.lora_A[name].weight.dtype != x.dtype:
                return None
            return name

        def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
            name = self._runlora_adapter(x, kwargs)
            if name is None or args or kwargs:
                return super().forward(x, *args, **kwargs)
            base = self.get_base_layer()
            y, _ = run_adapter(
                x,
                base_args_fn(base)(base, self.fan_in_fan_out),
                self.lora_A[name].weight,
                self.lora_B[name].weight,
                scaling=self.scaling[name],
                dropout=_dropout_p(self.lora_dropout[name]),
                training=self.training,
                criterion=self.runlora_criterion,
            )
            return y

        def __repr__(self) -> str:
            return "runlora." + super().__repr__()

    name = "RunLoRAPeft" + (
        "Linear" if peft_cls.__module__ == "peft.tuners.lora.layer" else peft_cls.__name__
    )
    RunLoRAPeftLinear.__name__ = RunLoRAPeftLinear.__qualname__ = name
    RunLoRAPeftLinear.__module__ = __name__
    globals()[name] = RunLoRAPeftLinear  # so that pickle finds it
    return RunLoRAPeftLinear


def from_peft(peft_model: nn.Module, *, criterion: str = "flops") -> nn.Module:
    """Switch every plain LoRA ``Linear`` of a PEFT model to runlora's op, in place.

    Args:
        peft_model: a ``peft.PeftModel`` (or any module holding ``peft.tuners.lora.Linear``).
        criterion: how runlora plans each layer (``"flops"``, ``"time"``, ``"roofline"``).

    Returns:
        ``peft_model`` itself, with the same parameter tensors.

    Raises:
        ValueError: if the model holds no LoRA Linear layer runlora can run.
    """
    switch = {}
    for peft_cls in _peft_linear_classes():
        cls = _runlora_peft_linear(peft_cls)
        switch[peft_cls] = switch[cls] = cls
    switched = 0
    for module in peft_model.modules():
        if type(module) in switch and is_supported_base(module.get_base_layer()):
            module.__class__ = switch[type(module)]
            module.runlora_criterion = criterion
            switched += 1
    if not switched:
        raise ValueError(
            f"{type(peft_model).__name__} holds no peft LoRA Linear layer over nn.Linear or "
            "Conv1D (or a bitsandbytes 4/8-bit layer); embedding and other LoRA layers keep "
            "PEFT's forward"
        )
    return peft_model
