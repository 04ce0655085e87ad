"""Model configs shipped with runlora, and building random-init models from them (no hub).

Shipped (``list_configs()``): the ReLoRA/GaLore Llama family ``llama_9m`` … ``llama_3b`` (sizes
as in those papers' ``llama_*m.json``, ``max_position_embeddings`` 1024, vocab 32000), the
Llama-2-7b shape ``llama2_7b``, ``roberta_base``/``roberta_large``, ``opt_350m``, ``vit_base``,
and ``llama_tiny`` (2 layers, hidden 64) for tests and smoke runs.

    >>> cfg = load_config("llama_60m")            # or "path/to/config.json", or a model dir
    >>> model = build_model(cfg, dtype=torch.bfloat16)
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

__all__ = [
    "list_configs",
    "load_config",
    "build_model",
    "count_parameters",
    "default_task",
    "default_target_modules",
    "max_seq_len",
    "TASKS",
]

#: task name -> transformers Auto class name that builds it.
TASKS = {
    "causal_lm": "AutoModelForCausalLM",
    "masked_lm": "AutoModelForMaskedLM",
    "sequence_classification": "AutoModelForSequenceClassification",
    "image_classification": "AutoModelForImageClassification",
}

# Architecture-name suffix -> task, for configs that name their architecture.
_ARCH_SUFFIX = {
    "ForCausalLM": "causal_lm",
    "ForMaskedLM": "masked_lm",
    "ForSequenceClassification": "sequence_classification",
    "ForImageClassification": "image_classification",
}


def _shipped_dir() -> Path:
    return Path(str(resources.files(__name__)))


def list_configs() -> list[str]:
    """Names of the shipped configs, sorted (``llama_60m``, ``roberta_base``, …)."""
    return sorted(p.stem for p in _shipped_dir().glob("*.json"))


def load_config(name_or_path: str | Path, **overrides):
    """A ``transformers`` config from a shipped name, a config JSON file or a local model dir.

    Never touches the network. ``overrides`` set config attributes (``num_hidden_layers=2``).
    The config's ``name_or_path`` is the shipped name or the path given.

    Raises:
        ValueError: ``name_or_path`` is none of the three, or the file is not a config.
    """
    from transformers import AutoConfig

    text = str(name_or_path)
    path = Path(text).expanduser()
    if text in list_configs() and not path.exists():
        source = _shipped_dir() / f"{text}.json"
    elif path.is_file() or (path.is_dir() and (path / "config.json").is_file()):
        source = path
    else:
        raise ValueError(
            f"unknown model {text!r}: not a shipped config ({', '.join(list_configs())}), "
            "a config JSON file, or a local model directory with a config.json"
        )
    try:
        config = AutoConfig.from_pretrained(str(source), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot read a model config from {text!r}: {first}") from err
    for key, value in overrides.items():
        setattr(config, key, value)
    config.name_or_path = text
    return config


def default_task(config) -> str:
    """The task a config is built for: from its ``architectures``, else by model type
    (``vit`` -> image classification, ``roberta``/``bert`` -> masked LM, else causal LM)."""
    for arch in getattr(config, "architectures", None) or ():
        for suffix, task in _ARCH_SUFFIX.items():
            if arch.endswith(suffix):
                return task
    if config.model_type in ("vit", "deit", "beit"):
        return "image_classification"
    if config.model_type in ("roberta", "bert", "xlm-roberta", "deberta-v2"):
        return "masked_lm"
    return "causal_lm"


def default_target_modules(model: torch.nn.Module) -> list[str]:
    """Every linear layer inside the model's numbered blocks, as the name after the block index
    (``self_attn.q_proj``, ``mlp.down_proj``; suffixes, matched as PEFT matches them).

    Embeddings, output heads and poolers stay frozen, as in the RunLoRA paper's benchmarks.
    Read off the module tree, so it follows transformers' own module names.
    """
    found: dict[str, None] = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) and type(module).__name__ != "Conv1D":
            continue
        parts = name.split(".")
        index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        if index is not None and index + 1 < len(parts):
            found[".".join(parts[index + 1 :])] = None
    if not found:
        raise ValueError(
            f"no linear layer inside numbered blocks in {type(model).__name__}; name the "
            "targets (e.g. --target-modules q_proj v_proj)"
        )
    return list(found)


def max_seq_len(config) -> int | None:
    """The longest sequence the model's position embeddings allow; None for image models
    (their token count is fixed by image and patch size)."""
    if default_task(config) == "image_classification":
        return None
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None:
        return None
    if config.model_type in ("roberta", "xlm-roberta"):  # positions start after padding_idx
        limit -= (config.pad_token_id or 0) + 1
    return int(limit)


def _auto_class(config, task: str | None):
    import transformers

    task = task or default_task(config)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    return getattr(transformers, TASKS[task])


def build_model(
    config,
    *,
    task: str | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    seed: int | None = 0,
) -> torch.nn.Module:
    """A randomly initialised model for ``config`` (from ``load_config``), in training mode.

    Args:
        task: a key of ``TASKS``; default ``default_task(config)``.
        dtype, device: where the parameters end up.
        seed: seeds torch before init, so one seed gives the same weights; None leaves the RNG.
    """
    cls = _auto_class(config, task)
    if seed is not None:
        torch.manual_seed(seed)
    model = cls.from_config(config)
    model.to(device=device, dtype=dtype)
    return model.train()


def count_parameters(config, *, task: str | None = None) -> int:
    """Parameter count of ``build_model(config)``, embeddings and heads included, measured on
    the meta device (no memory, no init), so it is cheap for 7b too."""
    cls = _auto_class(config, task)
    with torch.device("meta"):
        model = cls.from_config(config)
    return sum(p.numel() for p in model.parameters())
