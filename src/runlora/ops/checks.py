"""Argument checks shared by every layer of runlora, each written once with the error it raises."""

from __future__ import annotations

__all__ = ["positive_int", "dropout_probability", "name_matches"]


def positive_int(name: str, value: object) -> int:
    """``value`` if it is an int ≥ 1 (not a bool), else ``ValueError`` naming ``name``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def dropout_probability(name: str, value: object) -> float:
    """``value`` as a float if it is a number in [0, 1), else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")
    return float(value)


def name_matches(name: str, target: str) -> bool:
    """True if module ``name`` is ``target`` or ends with ``"." + target`` (PEFT's suffix rule:
    ``"q_proj"`` matches ``"model.layers.0.self_attn.q_proj"``, not ``"xq_proj"``)."""
    return name == target or name.endswith("." + target)
