"""Which modules of a model a ``LoraConfig`` adapts: PEFT's matching rules, and clear errors.

PEFT's rules: a list entry matches a module whose full name equals it or ends with ``"." +`` it;
a string is a regex that must match the full name; ``"all-linear"`` is every linear layer but
the output head. ``exclude_modules`` and ``modules_to_save`` win over targets;
``layers_to_transform`` keeps only the given layer indices.

In a model that already has adapters, an adapted layer (``RunLoRALinear``) is matched by its own
name and takes the new adapter; nothing inside it or inside a ``ModulesToSave`` wrapper is.
"""

from __future__ import annotations

import difflib
import re

from torch import nn

from .config import LoraConfig
from .layer import RunLoRALinear, is_supported_base

__all__ = ["find_targets", "pattern_value", "ALL_LINEAR"]

ALL_LINEAR = "all-linear"
_SEQ_CLS_HEADS = ("classifier", "score")


def _in_list(key: str, names: list[str]) -> bool:
    return key in names or any(key.endswith("." + n) for n in names)


def _excluded(config: LoraConfig, key: str) -> bool:
    ex = config.exclude_modules
    if ex and (re.fullmatch(ex, key) if isinstance(ex, str) else _in_list(key, ex)):
        return True
    return any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in config.modules_to_save or ())


def _layer_index_ok(config: LoraConfig, key: str) -> bool:
    indices = config.layers_to_transform
    if indices is None:
        return True
    patterns = config.layers_pattern
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match:
                break
    if not match:
        return False
    index = int(match.group("idx"))
    return index == indices if isinstance(indices, int) else index in indices


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``named_modules()`` without the model itself and without what lies inside runlora's
    wrappers (a ``RunLoRALinear``'s base layer and adapters, ``ModulesToSave``'s copies)."""
    out: list[tuple[str, nn.Module]] = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(w + ".") for w in inside):
            continue
        out.append((name, module))
        if getattr(module, "_runlora_wrapper", False):
            inside.append(name)
    return out


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, RunLoRALinear) or is_supported_base(module)


def _all_linear(model: nn.Module, config: LoraConfig) -> list[str]:
    heads = set()
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None and config.task_type == "SEQ_CLS":
        head = next((getattr(model, n) for n in _SEQ_CLS_HEADS if hasattr(model, n)), None)
    candidates = _candidates(model)
    for name, module in candidates:
        if head is not None and module is head:
            heads.add(name)
    return [n for n, m in candidates if _adaptable(m) and n not in heads]


def _is_target(config: LoraConfig, key: str, targets) -> bool:
    if _excluded(config, key):
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    return _in_list(key, targets) and _layer_index_ok(config, key)


def find_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs ``config`` adapts, in ``named_modules`` order.

    Raises:
        ValueError: if nothing matches (naming the closest module names) or if no target was
            given. TypeError: if a matched module is not a linear layer (naming it).
    """
    targets = config.target_modules
    if targets is None:
        raise ValueError(
            "target_modules is not set: name the layers to adapt, e.g. "
            "target_modules=['q_proj', 'v_proj'], a regex, or 'all-linear'"
        )
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        targets = _all_linear(model, config)
    found = [(n, m) for n, m in _candidates(model) if _is_target(config, n, targets)]
    for name, module in found:
        if not _adaptable(module):
            raise TypeError(
                f"target module {name!r} is a {type(module).__name__}, not a linear layer; "
                "runlora adapts nn.Linear and Conv1D only: narrow target_modules "
                "(e.g. to its linear children) or add it to exclude_modules"
            )
    if not found:
        raise ValueError(_no_match_message(model, config))
    return found


def _no_match_message(model: nn.Module, config: LoraConfig) -> str:
    names = [n for n, _ in model.named_modules() if n]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    wanted = (
        [config.target_modules]
        if isinstance(config.target_modules, str)
        else (config.target_modules)
    )
    close: list[str] = []
    for want in wanted:
        pool = names if "." in want or isinstance(config.target_modules, str) else leaves
        close += [
            c for c in difflib.get_close_matches(want, pool, n=3, cutoff=0.5) if c not in close
        ]
    hint = (
        f"closest module names: {', '.join(close)}"
        if close
        else (f"module names include: {', '.join(leaves[:12])}")
    )
    extra = ""
    if config.layers_to_transform is not None:
        extra = (
            f" (with layers_to_transform={config.layers_to_transform}, "
            f"layers_pattern={config.layers_pattern})"
        )
    return (
        f"target_modules={config.target_modules!r}{extra} matched no module of "
        f"{type(model).__name__}; {hint}"
    )


def pattern_value(pattern: dict, key: str, default):
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first pattern matching the end of
    the module name ``key`` (as a regex on dotted name components), else ``default``."""
    for pattern_key, value in pattern.items():
        if re.match(rf"(.*\.)?({pattern_key})$", key):
            return value
    return default
