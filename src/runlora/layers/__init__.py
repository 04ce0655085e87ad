"""LoRA modules that run the op: ``RunLoRALinear`` and the base kinds it wraps (``layer``),
quantized bitsandbytes bases (``quant``), and routing several adapters through one batch
(``routing``)."""

from .layer import LoRAEngine, RunLoRALinear

__all__ = ["LoRAEngine", "RunLoRALinear"]
