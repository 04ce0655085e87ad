"""Quantized base weights (QLoRA): the LoRA op over a bitsandbytes 4-bit or 8-bit frozen W.

The base weight stays in its quantized storage. Each use dequantizes it into a fresh
``(out, in)`` buffer in the op's dtype, once in forward and once more in backward (only when dX
is needed), and drops the buffer right after: no dequantized copy of W lives between the two, and
the quantized storage is only ever read::

    packed W (4/8-bit) ──dequantize──▶ W (out, in), fresh ──▶ X Wᵀ + s·(X Aᵀ) Bᵀ   (forward)
                       ──dequantize──▶ W (out, in), fresh ──▶ dX = dY W + s·Z A     (backward)

Because the buffer is fresh, the merged orders fold s·B A into it in place (no second
``(out, in)`` allocation), which makes them cheaper here than on an unquantized W.

bitsandbytes is optional (``pip install 'runlora[quant]'``); it is imported only when a quantized
base is asked for. ``is_quantized_base`` and ``base_handler`` are the base kind that
``runlora.layers`` registers with ``register_base_kind`` (this module registers nothing): both
say no to anything that is not a bitsandbytes ``Linear4bit``/``Linear8bitLt``, without importing
bnb.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..ops.checks import name_matches
from ..ops.function import check_args

__all__ = [
    "QuantizedWeight",
    "quant_provider",
    "is_quantized_base",
    "base_handler",
    "quantize_model",
    "dequantize",
    "require_bitsandbytes",
]

_INSTALL_HINT = "pip install 'runlora[quant]' (or: pip install bitsandbytes)"
#: Linear layers ``quantize_model`` leaves in full precision by default (as transformers does).
DEFAULT_SKIP = ("lm_head",)


def require_bitsandbytes():
    """The ``bitsandbytes`` module, or an ImportError that says what to install."""
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError(
            f"a 4-bit or 8-bit quantized base weight needs bitsandbytes, which is not installed "
            f"or failed to import ({err}); install it with: {_INSTALL_HINT}"
        ) from err
    return bitsandbytes


def _bnb_loaded():
    # A bitsandbytes layer can only exist if bitsandbytes was imported, so the dispatcher never
    # needs to import it (nor fail) for the plain nn.Linear case.
    return sys.modules.get("bitsandbytes")


class QuantizedWeight:
    """A frozen bitsandbytes base weight, seen by ``runlora.lora_linear`` as ``(out, in)``.

    The provider reads the module's quantized storage and statistics on every call (it caches
    nothing), so it stays valid across ``.to(device)`` and ``load_state_dict``.

    Attributes:
        module: the ``bnb.nn.Linear4bit`` or ``bnb.nn.Linear8bitLt``.
        bits: 4 or 8.
        shape: ``(out, in)`` of the dequantized weight.
    """

    def __init__(self, module: nn.Module, bits: int) -> None:
        self.module = module
        self.bits = bits
        if bits == 4:
            state = self._quant_state()
            self.shape = tuple(int(d) for d in state.shape)
        else:
            if getattr(module.weight, "has_fp16_weights", False) or module.state.has_fp16_weights:
                raise ValueError(
                    "Linear8bitLt(has_fp16_weights=True) keeps and trains a 16-bit weight, so it "
                    "is not a frozen quantized base; build it with has_fp16_weights=False "
                    "(BitsAndBytesConfig(load_in_8bit=True) does)"
                )
            self._scales()
            self.shape = tuple(int(d) for d in module.weight.shape)

    @property
    def weight(self) -> Tensor:
        """The quantized parameter itself (never written to)."""
        return self.module.weight

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """bitsandbytes' compute dtype for a 4-bit layer, None for 8-bit (it computes in x's)."""
        return getattr(self.module, "compute_dtype", None) if self.bits == 4 else None

    @property
    def device(self) -> torch.device:
        return self.module.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the adapter (and so the op) is expected to run in: the dtype the weight was
        quantized from (the model's dtype) for 4-bit; for 8-bit, which does not record it, the
        bias's dtype, else torch's default dtype."""
        if self.bits == 4:
            state = self._quant_state()
            # bitsandbytes' CPU inference repacking switches the state to bf16; the model's dtype
            # is then kept as original_dtype.
            return getattr(state, "original_dtype", None) or state.dtype
        bias = self.module.bias
        return bias.dtype if bias is not None else torch.get_default_dtype()

    def _quant_state(self):
        state = getattr(self.module.weight, "quant_state", None)
        if state is None:
            state = getattr(self.module, "quant_state", None)
        if state is None or not getattr(self.module.weight, "bnb_quantized", True):
            raise ValueError(
                "this Linear4bit's weight is not quantized yet: bitsandbytes quantizes it when "
                "the module is moved to a device, so call module.to('cuda') or module.to('cpu') "
                "first (or build the model with runlora.layers.quant.quantize_model)"
            )
        return state

    def _scales(self) -> Tensor:
        scb = getattr(self.module.weight, "SCB", None)
        if scb is None:
            scb = self.module.state.SCB
        if scb is None and self.module.weight.dtype == torch.int8:
            raise ValueError(
                "this Linear8bitLt's int8 weight has lost its row scales (SCB): bitsandbytes "
                "moves them from weight.SCB to module.state on the first forward, so a copy of "
                "the module that shares the weight must share module.state too (deepcopy memo)"
            )
        if scb is None or self.module.weight.dtype != torch.int8:
            raise ValueError(
                "this Linear8bitLt's weight is not quantized yet: bitsandbytes quantizes it when "
                "the module is moved to a device, so call module.to('cuda') or module.to('cpu') "
                "first (or build the model with runlora.layers.quant.quantize_model)"
            )
        return scb

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """W ``(out, in)`` in ``dtype`` (default: the compute dtype, else float32), in a fresh
        buffer the caller owns and may overwrite."""
        dtype = dtype or self.compute_dtype or torch.float32
        if self.bits == 8:
            # W = CB · SCB / 127 per row; one pass straight into the target dtype, the same
            # arithmetic as bitsandbytes' own dequantize-then-matmul training path.
            scb = self._scales()
            return self.module.weight.data.to(dtype).mul_(scb.unsqueeze(1).mul(1.0 / 127.0))
        bnb = require_bitsandbytes()
        data, state = self.module.weight.data, self._quant_state()
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacked the weight for its AVX512-BF16 inference kernel (an eval
            # forward of the bnb layer itself). Unpack a copy: its inverse rewrites the state.
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            data, state = _convert_weight_packed_for_cpu_inverse(data, copy.copy(state))
            if not state.nested:  # the inverse leaves plain block scales in the packed layout
                state.absmax = state.absmax.t().reshape(-1).float()
        w = bnb.functional.dequantize_4bit(data, state)  # (out, in) in the state's dtype
        return w if w.dtype == dtype else w.to(dtype)

    def check(self, x: Tensor, lora_a: Tensor, lora_b: Tensor, bias: Tensor | None) -> None:
        """The op's argument checks, with this weight's shape and device standing in for W."""
        if self.weight.requires_grad:
            raise ValueError(
                "the quantized base weight requires grad, but it is frozen storage; call "
                "base_layer.weight.requires_grad_(False)"
            )
        device = self.weight.device
        if isinstance(x, Tensor) and x.device != device:
            raise ValueError(
                f"x is on {x.device} but the quantized base weight is on {device}; move the "
                "input or the model so they share one device"
            )
        # A zero-stride stand-in: W's shape, x's dtype and device, one element of memory.
        stand_in = (x.new_zeros(()) if isinstance(x, Tensor) else torch.zeros(())).expand(
            self.shape
        )
        check_args(x, stand_in, lora_a, lora_b, bias, 1.0, 0.0)

    def __repr__(self) -> str:
        out_f, in_f = self.shape
        kind = f"{self._quant_state().quant_type}" if self.bits == 4 else "int8"
        return f"QuantizedWeight(bits={self.bits}, {kind}, out={out_f}, in={in_f})"


def quant_provider(base_layer: nn.Module) -> QuantizedWeight | None:
    """The ``quant=`` argument of ``lora_linear`` for ``base_layer``, or None if it is not a
    bitsandbytes ``Linear4bit``/``Linear8bitLt`` (then use ``base_layer.weight`` as usual).

    Cheap enough to call on every forward; never imports bitsandbytes itself.
    """
    bnb = _bnb_loaded()
    if bnb is None:
        return None
    if isinstance(base_layer, bnb.nn.Linear4bit):
        return QuantizedWeight(base_layer, 4)
    if isinstance(base_layer, bnb.nn.Linear8bitLt):
        return QuantizedWeight(base_layer, 8)
    return None


def base_handler(layer: nn.Module, fan_in_fan_out: bool = False):
    """The base kind's ``args`` (see ``runlora.layers.layer.BaseKind``): ``(quantized weight,
    bias, provider)`` for a bitsandbytes layer, None for anything else (PEFT's dispatcher
    convention). Runs on every forward."""
    quant = quant_provider(layer)
    if quant is None:
        return None
    if fan_in_fan_out:
        raise ValueError(
            "a bitsandbytes layer stores its weight as (out, in); use fan_in_fan_out=False"
        )
    return quant.weight, layer.bias, quant


def is_quantized_base(layer: nn.Module) -> bool:
    """The base kind's ``matches``: True for a bitsandbytes ``Linear4bit``/``Linear8bitLt``.

    Raises:
        ValueError: for one that cannot be a frozen quantized base (not quantized yet,
            ``has_fp16_weights=True``), saying what to do.
    """
    return base_handler(layer) is not None


def dequantize(base_layer: nn.Module, dtype: torch.dtype | None = None) -> Tensor:
    """A bitsandbytes layer's weight as a fresh dense ``(out, in)`` tensor (for merging adapters
    into a full-precision copy, or for tests)."""
    provider = quant_provider(base_layer)
    if provider is None:
        raise TypeError(
            f"expected a bitsandbytes Linear4bit or Linear8bitLt, got {type(base_layer).__name__}"
        )
    return provider.dequantize(dtype)


def _quantized_linear(
    bnb, lin: nn.Linear, bits: int, compute_dtype, quant_type, double_quant, threshold
):
    out_f, in_f = lin.out_features, lin.in_features
    has_bias = lin.bias is not None
    # Built on meta so no throwaway random weight is allocated; quantized by the .to() below.
    if bits == 4:
        q = bnb.nn.Linear4bit(
            in_f,
            out_f,
            bias=has_bias,
            compute_dtype=compute_dtype,
            compress_statistics=double_quant,
            quant_type=quant_type,
            device="meta",
        )
        q.weight = bnb.nn.Params4bit(
            lin.weight.data,
            requires_grad=False,
            compress_statistics=double_quant,
            quant_type=quant_type,
            module=q,
        )
    else:
        q = bnb.nn.Linear8bitLt(
            in_f,
            out_f,
            bias=has_bias,
            has_fp16_weights=False,
            threshold=threshold,
            device="meta",
        )
        q.weight = bnb.nn.Int8Params(lin.weight.data, requires_grad=False, has_fp16_weights=False)
    if has_bias:
        q.bias = lin.bias
    q.train(lin.training)
    return q.to(lin.weight.device)


def quantize_model(
    model: nn.Module,
    bits: int,
    compute_dtype: torch.dtype | None = None,
    *,
    quant_type: str = "nf4",
    double_quant: bool = True,
    skip: Iterable[str] = DEFAULT_SKIP,
    threshold: float = 0.0,
) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by a bitsandbytes quantized layer
    holding the same weight, like loading it with ``BitsAndBytesConfig`` but for a model
    already in memory (built from a config, say). Works on CPU and CUDA.

    Args:
        model: any module; its Linear weights are quantized on the device they are on.
        bits: 4 (``Linear4bit``, QLoRA) or 8 (``Linear8bitLt``, LLM.int8()).
        compute_dtype: 4-bit only, bitsandbytes' compute dtype (``bnb_4bit_compute_dtype``);
            None lets bitsandbytes take it from the first input.
        quant_type: 4-bit only, ``"nf4"`` or ``"fp4"``.
        double_quant: 4-bit only, quantize the block scales too (``bnb_4bit_use_double_quant``).
        skip: names (or name suffixes) of Linear layers to keep in full precision.
        threshold: 8-bit only, LLM.int8()'s activation outlier threshold (0: none).

    Returns:
        ``model``, with ``is_loaded_in_4bit`` or ``is_loaded_in_8bit`` set as transformers sets
        them, so PEFT puts its own bnb LoRA layers on it too.
    """
    if bits not in (4, 8) or isinstance(bits, bool):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    bnb = require_bitsandbytes()
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and name and not any(name_matches(name, s) for s in skip)
    ]
    for name, lin in targets:
        q = _quantized_linear(bnb, lin, bits, compute_dtype, quant_type, double_quant, threshold)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, q)
    setattr(model, f"is_loaded_in_{bits}bit", True)
    return model
