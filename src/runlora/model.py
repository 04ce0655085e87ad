"""``get_runlora_model``: put runlora adapters into a model, PEFT-style.

The result mirrors PEFT's module tree: ``RunLoRAModel.base_model`` (a ``RunLoRATuner``, PEFT's
``LoraModel``) holds the user's model as ``.model``, targeted layers become ``RunLoRALinear``
(``base_layer`` + ``lora_A``/``lora_B`` ModuleDicts keyed ``"default"``), and
``modules_to_save`` become ``ModulesToSave`` wrappers (``original_module`` + a trained copy in
``modules_to_save["default"]``). So every state-dict key equals PEFT's,
``base_model.model.<path>.lora_A.default.weight``, and the adapter file keys are those with the
adapter name dropped.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterator

import torch
from torch import nn

from .config import LoraConfig
from .layer import RunLoRALinear
from .targets import find_targets, pattern_value

__all__ = ["RunLoRAModel", "RunLoRATuner", "ModulesToSave", "get_runlora_model"]

ADAPTER = "default"


class _Passthrough(nn.Module):
    """Attribute lookups that nn.Module does not resolve go to ``self.<_inner>``."""

    _inner = "model"

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == self._inner:
                raise
            return getattr(super().__getattr__(self._inner), name)


class ModulesToSave(_Passthrough):
    """A module trained in full next to the adapters: the original is kept, frozen, for
    ``disable_adapter()``; the trained copy is ``modules_to_save["default"]`` (PEFT's layout)."""

    _inner = "original_module"

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict({ADAPTER: copy.deepcopy(module)})
        self.original_module.requires_grad_(False)
        self.modules_to_save.requires_grad_(True)
        self.disable_adapters = False

    def forward(self, *args, **kwargs):
        if self.disable_adapters:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[ADAPTER](*args, **kwargs)


class RunLoRATuner(_Passthrough):
    """PEFT's ``LoraModel`` position in the tree: holds the adapted model as ``.model``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def _set_trainable(model: nn.Module, config: LoraConfig, trainable: bool) -> None:
    model.requires_grad_(False)
    if not trainable:
        return
    for module in model.modules():
        if isinstance(module, RunLoRALinear):
            module.lora_A.requires_grad_(True)
            module.lora_B.requires_grad_(True)
            if config.bias == "lora_only" and module.base_layer.bias is not None:
                module.base_layer.bias.requires_grad_(True)
        elif isinstance(module, ModulesToSave):
            module.modules_to_save.requires_grad_(True)
    if config.bias == "all":
        for name, param in model.named_parameters():
            if name.endswith("bias") and ".original_module." not in name:
                param.requires_grad_(True)


def get_runlora_model(model: nn.Module, config: LoraConfig) -> RunLoRAModel:
    """Wrap ``model``: adapters on the layers ``config`` targets, everything else frozen.

    The model is changed in place (its target layers are replaced by ``RunLoRALinear``s around
    the same layer objects; no weight is copied) and returned wrapped in a ``RunLoRAModel``.

    Raises:
        ValueError / TypeError: if targets match nothing or match a non-linear module (see
            ``runlora.targets.find_targets``), or if the model already has runlora adapters.
    """
    if any(isinstance(m, RunLoRALinear) for m in model.modules()):
        raise ValueError(
            "this model already has runlora adapters; wrap the original model, "
            "or use RunLoRAModel.merge_and_unload() / unload() first"
        )
    targets = find_targets(model, config)
    for name, module in targets:
        r = pattern_value(config.rank_pattern, name, config.r)
        alpha = pattern_value(config.alpha_pattern, name, config.lora_alpha)
        layer = RunLoRALinear(
            module,
            r,
            alpha,
            config.lora_dropout,
            use_rslora=config.use_rslora,
            init_lora_weights=config.init_lora_weights,
            criterion=config.criterion,
        )
        _replace(model, name, layer)
    for name in _modules_to_save_names(model, config):
        _replace(model, name, ModulesToSave(model.get_submodule(name)))
    _set_trainable(model, config, trainable=not config.inference_mode)
    return RunLoRAModel(model, config)


def _modules_to_save_names(model: nn.Module, config: LoraConfig) -> list[str]:
    wanted = config.modules_to_save or []
    names = [
        n
        for n, _ in model.named_modules()
        if n and any(n == w or n.endswith("." + w) for w in wanted)
    ]
    missing = [w for w in wanted if not any(n == w or n.endswith("." + w) for n in names)]
    if missing:
        raise ValueError(f"modules_to_save {missing} matched no module of {type(model).__name__}")
    return names


class RunLoRAModel(_Passthrough):
    """A model with runlora adapters; behaves like the model it wraps (PEFT's ``PeftModel``).

    ``model(**batch)``, ``.generate``, ``.config`` and any other attribute go to the wrapped
    model. Attributes: ``base_model`` (``RunLoRATuner``; ``base_model.model`` is the wrapped
    model), ``peft_config`` (``{"default": LoraConfig}``).
    """

    _inner = "base_model"

    def __init__(self, model: nn.Module, config: LoraConfig) -> None:
        super().__init__()
        self.base_model = RunLoRATuner(model)
        self.peft_config = {ADAPTER: config}
        self.active_adapter = ADAPTER
        # HF Trainer reads the forward signature, of the instance (to keep the dataset columns
        # forward names) and of the class (to find label names): both must be the wrapped
        # model's, so each wrapped class gets a RunLoRAModel subclass whose forward wraps its.
        self.__class__ = _signature_class(type(self), type(model))

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    def lora_layers(self) -> Iterator[tuple[str, RunLoRALinear]]:
        """``(name, layer)`` for every adapted layer, names as in ``named_modules()``."""
        return ((n, m) for n, m in self.named_modules() if isinstance(m, RunLoRALinear))

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters), PEFT's way (each tensor once)."""
        trainable = total = 0
        for p in self.parameters():
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / max(1, total):.4f}"
        )

    def gradient_checkpointing_enable(self, *args, **kwargs) -> None:
        """The wrapped model's, plus inputs that require grad so that checkpointed blocks with a
        frozen embedding still propagate gradients to the adapters (as PEFT does)."""
        model = self.get_base_model()
        model.gradient_checkpointing_enable(*args, **kwargs)
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model runs as it was, without adapters or modules_to_save."""
        switches = [m for m in self.modules() if isinstance(m, (RunLoRALinear, ModulesToSave))]
        before = [m.disable_adapters for m in switches]
        for m in switches:
            m.disable_adapters = True
        try:
            yield
        finally:
            for m, state in zip(switches, before, strict=True):
                m.disable_adapters = state

    def _unwrap(self, merge: bool) -> nn.Module:
        model = self.get_base_model()
        for name, module in list(model.named_modules()):
            if isinstance(module, RunLoRALinear):
                if merge:
                    module.merge()
                module.merged_adapters.clear()
                _replace(model, name, module.base_layer)
            elif isinstance(module, ModulesToSave):
                _replace(
                    model,
                    name,
                    module.modules_to_save[ADAPTER] if merge else module.original_module,
                )
        return model

    @torch.no_grad()
    def merge_and_unload(self) -> nn.Module:
        """Fold each adapter into its base weight (W += s·B A) and return the plain model, with
        the trained modules_to_save in place of the originals."""
        return self._unwrap(merge=True)

    def unload(self) -> nn.Module:
        """The plain model without adapters, base weights as they were (unmerged)."""
        for _, layer in self.lora_layers():
            layer.unmerge()
        return self._unwrap(merge=False)

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` as PEFT does,
        atomically. Extra keyword arguments (from HF Trainer) are accepted and ignored.

        Under FSDP2 (sharded adapter tensors) this is a collective: call it on every rank; the
        adapter is gathered and rank 0 writes it (``runlora.distributed.save_adapter``)."""
        if _has_sharded_adapter(self):
            from .distributed import save_adapter
        else:
            from .io import save_adapter
        save_adapter(self, save_directory)

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, model_id, is_trainable: bool = False, **config_overrides
    ) -> RunLoRAModel:
        """Load an adapter saved by runlora or PEFT from the directory ``model_id`` onto
        ``model``. Frozen and in eval mode unless ``is_trainable``."""
        from .io import load_runlora_model

        return load_runlora_model(model, model_id, is_trainable=is_trainable, **config_overrides)


def _has_sharded_adapter(model: nn.Module) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters() if p.requires_grad)


@functools.cache
def _signature_class(cls: type, model_cls: type) -> type:
    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    functools.update_wrapper(forward, model_cls.forward)
    return type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})
