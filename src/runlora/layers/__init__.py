"""LoRA modules that run the op: ``RunLoRALinear`` and the base kinds it wraps (``layer``),
quantized bitsandbytes bases (``quant``), and routing several adapters through one batch
(``routing``).

The base kinds beyond the dense one are registered here, once, whenever any of ``layers`` is
imported: ``quant``'s bitsandbytes ``Linear4bit``/``Linear8bitLt`` (registered after the dense
kind, so tried before it: they subclass ``nn.Linear``). bitsandbytes itself is not imported.
"""

from . import quant
from .layer import LoRAEngine, RunLoRALinear, register_base_kind

register_base_kind(quant.is_quantized_base, quant.base_handler)

__all__ = ["LoRAEngine", "RunLoRALinear"]
