"""``LoraConfig``: PEFT's LoRA settings, same field names and meanings, plus runlora's own.

Only what runlora runs is accepted; PEFT features it does not implement (DoRA, LoRA bias
vectors, PiSSA-style initialisations, ...) are refused with an error rather than ignored.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields

from .ops.checks import dropout_probability, positive_int
from .planning.criteria import known_criterion

__all__ = ["LoraConfig", "PEFT_ONLY_FEATURES"]

_BIAS_MODES = ("none", "all", "lora_only")

#: adapter_config.json keys whose non-default values runlora cannot honour, with the default.
PEFT_ONLY_FEATURES = {
    "lora_bias": False,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "use_qalora": False,
    "alora_invocation_tokens": None,
}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _names(value, what: str) -> list[str] | str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    raise TypeError(f"{what} must be a list of module names, a regex string or None, got {value!r}")


@dataclass
class LoraConfig:
    """Which layers get an adapter, and how (PEFT's ``LoraConfig`` fields and meanings).

    Attributes:
        r: rank of every adapter (unless ``rank_pattern`` says otherwise).
        lora_alpha: scaling numerator: s = lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA).
        lora_dropout: dropout probability on each adapter's input, in [0, 1).
        target_modules: module names or name suffixes (``["q_proj", "v_proj"]``), a regex that
            must match the full module name, or ``"all-linear"`` (every linear layer but the
            output head).
        exclude_modules: names/suffixes or a regex of modules never to adapt.
        bias: ``"none"``, ``"all"`` (train every bias) or ``"lora_only"`` (the adapted layers').
        use_rslora: s = lora_alpha / sqrt(r).
        init_lora_weights: True (B = 0, A Kaiming-uniform), ``"gaussian"`` or False (random B).
        modules_to_save: modules trained in full and saved with the adapter (a classifier head).
        layers_to_transform: layer indices to adapt (with ``layers_pattern``, the name of the
            layer list, such as ``"layers"`` or ``"h"``).
        rank_pattern, alpha_pattern: ``{name or regex: r / alpha}`` per-module overrides.
        fan_in_fan_out: the base weight is stored ``(in, out)``; set for you for GPT-2's Conv1D.
        use_dora: DoRA (a learned magnitude per output row), run by ``runlora.ops.dora``.
        criterion: how runlora plans each layer's computation order (``"flops"``, ``"time"``,
            ``"roofline"``): runlora's own, not saved with the adapter.
        task_type, base_model_name_or_path, inference_mode: as in PEFT; written to the file.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    use_dora: bool = False
    criterion: str = "flops"
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        positive_int("r", self.r)
        if not isinstance(self.lora_alpha, (int, float)) or isinstance(self.lora_alpha, bool):
            raise ValueError(f"lora_alpha must be a number, got {self.lora_alpha!r}")
        dropout_probability("lora_dropout", self.lora_dropout)
        self.target_modules = _names(self.target_modules, "target_modules")
        self.exclude_modules = _names(self.exclude_modules, "exclude_modules")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    re.compile(value)
                except re.error as err:
                    raise ValueError(f"{name} {value!r} is not a valid regex: {err}") from None
        if self.bias not in _BIAS_MODES:
            raise ValueError(f"bias must be one of {', '.join(_BIAS_MODES)}, got {self.bias!r}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(
                f"init_lora_weights must be True, False or 'gaussian', got "
                f"{self.init_lora_weights!r}; PEFT's other initialisations (pissa, olora, loftq, "
                "eva, corda, ...) change the base weights and are not supported by runlora"
            )
        if self.modules_to_save is not None:
            self.modules_to_save = _names(self.modules_to_save, "modules_to_save")
            if isinstance(self.modules_to_save, str):
                self.modules_to_save = [self.modules_to_save]
        ltt = self.layers_to_transform
        if ltt is not None and not _is_int(ltt):
            if not (isinstance(ltt, (list, tuple)) and all(_is_int(i) for i in ltt)):
                raise TypeError(
                    f"layers_to_transform must be an int or a list of ints, got {ltt!r}"
                )
            self.layers_to_transform = list(ltt)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(
                "layers_pattern only applies together with layers_to_transform; set "
                "layers_to_transform (e.g. [0, 1]) or drop layers_pattern"
            )
        if self.layers_to_transform is not None and isinstance(self.target_modules, str):
            raise ValueError(
                "layers_to_transform cannot be used with a regex target_modules; put the layer "
                "indices in the regex instead"
            )
        for key, value in self.rank_pattern.items():
            positive_int(f"rank_pattern[{key!r}]", value)
        for key, value in self.alpha_pattern.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"alpha_pattern[{key!r}] must be a number, got {value!r}")
        known_criterion(self.criterion)

    def to_peft_dict(self) -> dict:
        """The ``adapter_config.json`` content PEFT reads (``peft_type`` ``"LORA"``)."""
        out = asdict(self)
        del out["criterion"]
        for key in ("target_modules", "exclude_modules"):
            if isinstance(out[key], list):
                out[key] = sorted(out[key])
        out.update(PEFT_ONLY_FEATURES)
        out["peft_type"] = "LORA"
        out["revision"] = None
        return dict(sorted(out.items()))

    @classmethod
    def from_peft_dict(cls, data: dict, source: str = "adapter_config.json", **overrides):
        """A config from PEFT's ``adapter_config.json`` content; PEFT-only features are refused.

        Raises:
            ValueError: naming ``source`` and the field, for a non-LoRA or unsupported adapter.
        """
        if data.get("peft_type", "LORA") != "LORA":
            raise ValueError(
                f"{source}: peft_type is {data.get('peft_type')!r}; runlora loads "
                "LoRA adapters only (peft_type 'LORA')"
            )
        for key, default in PEFT_ONLY_FEATURES.items():
            if data.get(key, default) not in (default, {}, []):
                raise ValueError(
                    f"{source}: {key}={data[key]!r} is a PEFT feature runlora does "
                    "not implement; load this adapter with peft instead"
                )
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        if (
            isinstance(kwargs.get("init_lora_weights"), str)
            and kwargs["init_lora_weights"] != "gaussian"
        ):
            raise ValueError(
                f"{source}: init_lora_weights={kwargs['init_lora_weights']!r} "
                "changes the base weights; runlora supports True, False, 'gaussian'"
            )
        kwargs.update(overrides)
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: {err}") from None
