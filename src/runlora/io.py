"""Adapters on disk in PEFT's format, both ways.

A directory holds ``adapter_config.json`` (PEFT's ``LoraConfig`` fields, ``peft_type`` "LORA")
and ``adapter_model.safetensors`` with PEFT's keys:

    base_model.model.<path>.lora_A.weight         (r, in)
    base_model.model.<path>.lora_B.weight         (out, r)
    base_model.model.<path>.base_layer.bias       bias="lora_only"/"all": an adapted layer's bias
    base_model.model.<path>.bias                  bias="all": any other bias
    base_model.model.<path>.<param>               modules_to_save: the trained module's tensors

Since runlora's module tree is PEFT's (see ``runlora.model``), a file key is a state-dict key with
the adapter name (``.default``) dropped. Saving is atomic: both files are written to temporary
files in the target directory and moved into place with ``os.replace``, so a crash while writing
leaves the previous adapter as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import LoraConfig
from .layer import RunLoRALinear
from .model import ADAPTER, ModulesToSave, RunLoRAModel, get_runlora_model

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "adapter_state_dict",
    "adapter_tensors",
    "save_adapter",
    "load_adapter_weights",
    "load_runlora_model",
    "read_config",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_BIN_NAME = "adapter_model.bin"


def _file_key(state_key: str, adapter_name: str = ADAPTER) -> str:
    """PEFT's file key for a state-dict key: the adapter's name dropped."""
    for infix, repl in (
        (f".modules_to_save.{adapter_name}.", "."),
        (f".lora_A.{adapter_name}.", ".lora_A."),
        (f".lora_B.{adapter_name}.", ".lora_B."),
    ):
        state_key = state_key.replace(infix, repl)
    return state_key


def adapter_state_dict(model: RunLoRAModel, adapter_name: str = ADAPTER) -> dict[str, Tensor]:
    """The tensors PEFT would save for ``model``'s adapter ``adapter_name``, under PEFT's file
    keys, in key order."""
    return {k: t.detach() for k, t in adapter_tensors(model, adapter_name).items()}


def adapter_tensors(model: RunLoRAModel, adapter_name: str = ADAPTER) -> dict[str, Tensor]:
    """``adapter_state_dict`` as the model stores the tensors: its own parameters, DTensor shards
    under FSDP2, partitioned parameters under ZeRO-3 (``runlora.distributed`` gathers them).

    Tensors are picked by identity and named by ``model.state_dict()``, so wrappers that keep
    their own name out of state-dict keys (``checkpoint_wrapper``, as accelerate's FSDP
    activation checkpointing applies it) leave the file keys as PEFT writes them.
    """
    config = model.peft_config[adapter_name]
    keep: set[int] = set()
    for module in model.modules():
        if isinstance(module, RunLoRALinear) and adapter_name in module.lora_A:
            keep.add(id(module.lora_A[adapter_name].weight))
            keep.add(id(module.lora_B[adapter_name].weight))
            if config.bias == "lora_only" and module.base_layer.bias is not None:
                keep.add(id(module.base_layer.bias))
        elif isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
            keep |= {id(p) for p in module.modules_to_save[adapter_name].parameters()}
    if config.bias == "all":  # every bias but those of the originals and of other adapters
        own = f".modules_to_save.{adapter_name}."
        keep |= {
            id(p)
            for n, p in model.named_parameters()
            if n.endswith("bias")
            and ".original_module." not in n
            and (".modules_to_save." not in n or own in n)
        }
    state = model.state_dict(keep_vars=True)
    return {_file_key(k, adapter_name): state[k] for k in sorted(state) if id(state[k]) in keep}


def _write_weights(tensors: dict[str, Tensor], path: str) -> None:
    save_file(
        {k: v.contiguous().cpu() for k, v in tensors.items()}, path, metadata={"format": "pt"}
    )


def _write_config(data: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def save_adapter(
    model: RunLoRAModel,
    directory: str | os.PathLike,
    tensors: dict[str, Tensor] | None = None,
    *,
    adapter_name: str = ADAPTER,
) -> None:
    """Save ``model``'s adapter ``adapter_name`` to ``directory`` in PEFT's format, atomically.

    ``tensors``: the file's tensors if already at hand (gathered from shards, say); by default
    ``adapter_state_dict(model, adapter_name)``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.peft_config[adapter_name]
    data = {**config.to_peft_dict(), "inference_mode": True}
    base = model.get_base_model()
    data["base_model_name_or_path"] = (
        config.base_model_name_or_path
        or getattr(getattr(base, "config", None), "_name_or_path", None)
        or None
    )
    temps: dict[str, str] = {}
    try:
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            fd, temps[name] = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
            os.close(fd)
        _write_weights(
            adapter_state_dict(model, adapter_name) if tensors is None else tensors,
            temps[WEIGHTS_NAME],
        )
        _write_config(data, temps[CONFIG_NAME])
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            os.replace(temps.pop(name), directory / name)
    finally:
        for temp in temps.values():
            with contextlib.suppress(OSError):
                os.unlink(temp)


def read_config(directory: str | os.PathLike, **overrides) -> LoraConfig:
    """The ``LoraConfig`` in ``directory/adapter_config.json`` (written by runlora or PEFT)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"no adapter config at {path}: is {directory} an adapter "
            "directory written by save_pretrained?"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{path} is not a readable JSON adapter config ({err}); save the adapter again"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return LoraConfig.from_peft_dict(data, source=str(path), **overrides)


def _read_weights(directory: Path) -> tuple[dict[str, Tensor], Path]:
    path = directory / WEIGHTS_NAME
    try:
        if path.is_file():
            return load_file(str(path)), path
        if (directory / _BIN_NAME).is_file():
            path = directory / _BIN_NAME
            return torch.load(path, map_location="cpu", weights_only=True), path
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise ValueError(
            f"{path} is not a readable adapter weights file ({err}); save the adapter again"
        ) from None
    raise FileNotFoundError(
        f"no adapter weights at {directory / WEIGHTS_NAME} (nor "
        f"{_BIN_NAME}): the adapter directory is incomplete"
    )


def _state_key(file_key: str, wrappers: set[str], adapter_name: str) -> str | None:
    """The model state-dict key for a file key; None for keys PEFT writes but nobody reads."""
    if ".original_module." in file_key:
        return None
    for end in (".lora_A.weight", ".lora_B.weight"):
        if file_key.endswith(end):
            return file_key[: -len(".weight")] + f".{adapter_name}.weight"
    file_key = file_key.replace(".modules_to_save.", ".")  # PEFT's bias="all" quirk
    for wrapper in wrappers:
        if file_key.startswith(wrapper + "."):
            return f"{wrapper}.modules_to_save.{adapter_name}.{file_key[len(wrapper) + 1 :]}"
    return file_key


@torch.no_grad()
def load_adapter_weights(
    model: RunLoRAModel, directory: str | os.PathLike, *, adapter_name: str = ADAPTER
) -> None:
    """Copy the tensors of ``directory``'s adapter file into ``model``'s adapter
    ``adapter_name``.

    Raises:
        ValueError: for a key that matches no tensor of the model, a shape that differs (naming
            the layer and both shapes), or a LoRA tensor of the adapter missing from the file.
    """
    tensors, path = _read_weights(Path(directory))
    state = model.state_dict(keep_vars=True)
    # modules_to_save wrappers, named as state-dict keys name them (see adapter_state_dict)
    wrappers = {k.split(".modules_to_save.")[0] for k in state if ".modules_to_save." in k}
    loaded = set()
    for file_key, value in tensors.items():
        key = _state_key(file_key, wrappers, adapter_name)
        if key is None:
            continue
        if key not in state:
            raise ValueError(
                f"{path}: tensor {file_key!r} matches no parameter of the model "
                "(was the adapter saved for another model, or other target_modules?)"
            )
        target = state[key]
        if target.shape != value.shape:
            layer = file_key.rsplit(".", 2)[0] if ".lora_" in file_key else file_key
            raise ValueError(
                f"{path}: layer {layer!r}: {file_key.rsplit('.', 2)[-2]} has shape "
                f"{tuple(value.shape)} in the file but {tuple(target.shape)} in the model; "
                "the adapter's r/rank_pattern or the base model differ from the ones it was "
                "saved with"
            )
        target.copy_(value)
        loaded.add(key)
    own = (f".lora_A.{adapter_name}.", f".lora_B.{adapter_name}.")
    missing = [k for k in state if any(o in k for o in own) and k not in loaded]
    if missing:
        raise ValueError(
            f"{path} lacks {len(missing)} LoRA tensors the config asks for, e.g. "
            f"{missing[0]!r}; the file and {CONFIG_NAME} do not belong together"
        )


def load_runlora_model(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    adapter_name: str = ADAPTER,
    is_trainable: bool = False,
    **overrides,
) -> RunLoRAModel:
    """Adapt ``model`` as ``directory``'s config says and load its tensors (runlora or PEFT) as
    adapter ``adapter_name``.

    Frozen and in eval mode unless ``is_trainable``. ``overrides`` replace config fields (e.g.
    ``criterion="time"``).
    """
    config = read_config(directory, inference_mode=not is_trainable, **overrides)
    wrapped = get_runlora_model(model, config, adapter_name=adapter_name)
    load_adapter_weights(wrapped, directory, adapter_name=adapter_name)
    if not is_trainable:
        wrapped.eval()
    return wrapped
