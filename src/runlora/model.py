"""``get_runlora_model``: put runlora adapters into a model, PEFT-style.

The result mirrors PEFT's module tree: ``RunLoRAModel.base_model`` (a ``RunLoRATuner``, PEFT's
``LoraModel``) holds the user's model as ``.model``, targeted layers become ``RunLoRALinear``
(``base_layer`` + ``lora_A``/``lora_B`` ModuleDicts keyed by adapter name, ``"default"`` first),
and ``modules_to_save`` become ``ModulesToSave`` wrappers (``original_module`` + a trained copy
per adapter in ``modules_to_save[name]``). So every state-dict key equals PEFT's,
``base_model.model.<path>.lora_A.default.weight``, and the adapter file keys are those with the
adapter name dropped.

A model holds any number of named adapters (``add_adapter``, ``load_adapter``), runs the active
ones (``set_adapter``), or one per example of a batch at inference (``adapter_names=``, see
``runlora.routing``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from .config import LoraConfig
from .layer import RunLoRALinear
from .routing import BASE, Routing, run_grouped
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
    ``disable_adapter()``; each adapter trains its own copy, ``modules_to_save[name]`` (PEFT's
    layout), and the active adapter's copy runs."""

    _inner = "original_module"
    _runlora_wrapper = True  # runlora.targets never looks inside

    def __init__(self, module: nn.Module, adapter_name: str = ADAPTER) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.original_module.requires_grad_(False)
        self.disable_adapters = False
        self.active_adapter = adapter_name
        self._routing: Routing | None = None  # set by RunLoRAModel for adapter_names=
        self._stack_cache = None
        self.update(adapter_name)

    def update(self, adapter_name: str) -> None:
        """A fresh trainable copy of the original module for ``adapter_name``."""
        self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)
        self.modules_to_save[adapter_name].requires_grad_(True)

    def _held(self, adapter_names: list[str]) -> str | None:
        """The one adapter among ``adapter_names`` with a copy here (None: the original runs)."""
        held = [n for n in adapter_names if n in self.modules_to_save]
        if len(held) > 1:
            raise ValueError(
                f"adapters {held} each train their own copy of a modules_to_save module; only "
                "one of them can be active at a time"
            )
        return held[0] if held else None

    def _activate(self, adapter_names: list[str]) -> None:
        """Which copy runs, trainability untouched."""
        self.active_adapter = self._held(adapter_names)

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """Run the copy of the (one) adapter among ``adapter_names`` that this wrapper holds,
        and train only it unless ``inference_mode``; the original if it holds none."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        held = self._held(names)
        for key, copy_ in self.modules_to_save.items():
            copy_.requires_grad_(key == held and not inference_mode)
        self.active_adapter = held

    def delete_adapter(self, adapter_name: str) -> None:
        del self.modules_to_save[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = next(iter(self.modules_to_save), None)

    def _run(self, name: str | None, args, kwargs):
        if name is None or name == BASE or name not in self.modules_to_save:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[name](*args, **kwargs)

    def forward(self, *args, **kwargs):
        if self.disable_adapters:
            return self.original_module(*args, **kwargs)
        if self._routing is not None:
            if not (args and isinstance(args[0], torch.Tensor)):
                raise ValueError(
                    "adapter_names: a modules_to_save module must get its batch as its first "
                    f"positional argument to be run per example; {type(self.original_module)}"
                    " was called without one"
                )
            x, rest = args[0], args[1:]
            groups = self._routing.groups(x.shape[0], x.device)
            return run_grouped(x, groups, lambda name, rows: self._run(name, (rows, *rest), kwargs))
        return self._run(self.active_adapter, args, kwargs)


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


def _set_trainable(model: nn.Module, config: LoraConfig, adapter_name: str) -> None:
    """A new model: everything frozen but ``adapter_name``'s tensors (and the biases
    ``config.bias`` names), unless ``config.inference_mode``."""
    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, (RunLoRALinear, ModulesToSave)):
            module.set_adapter([adapter_name], inference_mode=config.inference_mode)
    if config.inference_mode:
        return
    for module in model.modules():
        if isinstance(module, RunLoRALinear) and adapter_name in module.lora_A:
            if config.bias == "lora_only" and module.base_layer.bias is not None:
                module.base_layer.bias.requires_grad_(True)
    if config.bias == "all":
        for key, param in model.named_parameters():
            if key.endswith("bias") and ".original_module." not in key:
                param.requires_grad_(True)


def _inject(model: nn.Module, config: LoraConfig, adapter_name: str) -> None:
    """Add adapter ``adapter_name`` to the layers ``config`` targets (wrapping the ones not
    wrapped yet) and a copy of each of its modules_to_save. Trainability is left as it was,
    the new tensors frozen; ``_set_trainable`` decides."""
    before = {p: p.requires_grad for p in model.parameters()}
    for name, module in find_targets(model, config):
        r = pattern_value(config.rank_pattern, name, config.r)
        alpha = pattern_value(config.alpha_pattern, name, config.lora_alpha)
        options = dict(use_rslora=config.use_rslora, init_lora_weights=config.init_lora_weights)
        if isinstance(module, RunLoRALinear):
            module.update_layer(adapter_name, r, alpha, config.lora_dropout, **options)
        else:
            layer = RunLoRALinear(
                module,
                r,
                alpha,
                config.lora_dropout,
                adapter_name=adapter_name,
                criterion=config.criterion,
                **options,
            )
            _replace(model, name, layer.train(module.training))
    for name in _modules_to_save_names(model, config):
        module = model.get_submodule(name)
        if isinstance(module, ModulesToSave):
            module.update(adapter_name)
        else:
            _replace(model, name, ModulesToSave(module, adapter_name).train(module.training))
    for p in model.parameters():
        p.requires_grad_(before.get(p, False))


def get_runlora_model(
    model: nn.Module, config: LoraConfig, adapter_name: str = ADAPTER
) -> RunLoRAModel:
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
    _check_adapter_name(adapter_name)
    _inject(model, config, adapter_name)
    _set_trainable(model, config, adapter_name)
    return RunLoRAModel(model, config, adapter_name)


def _check_adapter_name(name) -> None:
    if not isinstance(name, str) or not name or "." in name or name == BASE:
        raise ValueError(
            f"adapter_name must be a non-empty str without '.', and not {BASE!r}; got {name!r}"
        )


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
    model), ``peft_config`` (``{adapter name: LoraConfig}``), ``active_adapter``.

    Several adapters: ``add_adapter`` / ``load_adapter`` add one (frozen, not active),
    ``set_adapter`` activates one (or a list: their terms add up) and makes it trainable,
    ``delete_adapter`` removes one. ``model(**batch, adapter_names=[...])`` and
    ``model.generate(..., adapter_names=[...])`` run example ``i`` with adapter
    ``adapter_names[i]`` (``"__base__"``: none) in eval mode.
    """

    _inner = "base_model"

    def __init__(self, model: nn.Module, config: LoraConfig, adapter_name: str = ADAPTER) -> None:
        super().__init__()
        self.base_model = RunLoRATuner(model)
        self.peft_config = {adapter_name: config}
        self._active_adapters = [adapter_name]
        # HF Trainer reads the forward signature, of the instance (to keep the dataset columns
        # forward names) and of the class (to find label names): both must be the wrapped
        # model's, so each wrapped class gets a RunLoRAModel subclass whose forward wraps its.
        self.__class__ = _signature_class(type(self), type(model))

    # --- adapters ---------------------------------------------------------------------------

    @property
    def active_adapter(self) -> str | list[str]:
        """The active adapter's name (a list when several are active)."""
        names = self._active_adapters
        return names[0] if len(names) == 1 else list(names)

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapters)

    @property
    def active_peft_config(self) -> LoraConfig:
        return self.peft_config[self._active_adapters[0]]

    def _wrappers(self) -> list[nn.Module]:
        """Every RunLoRALinear and ModulesToSave, by a plain walk of the module tree (on every
        forward with adapter_names: ``modules()``'s nested generators cost ~3 ms on llama_60m,
        this ~0.2 ms)."""
        found, stack = [], [self]
        while stack:
            module = stack.pop()
            if isinstance(module, (RunLoRALinear, ModulesToSave)):
                found.append(module)
            stack.extend(m for m in module._modules.values() if m is not None)
        return found

    def _known(self, names: list[str], what: str) -> None:
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(
                f"{what}: no adapter named {', '.join(map(repr, unknown))}; this model has "
                f"{', '.join(map(repr, self.peft_config))}"
            )

    def add_adapter(self, adapter_name: str, peft_config: LoraConfig) -> None:
        """Add a new adapter, initialised as ``peft_config`` says, on the layers it targets.
        It is frozen and not active: ``set_adapter(adapter_name)`` to train or run it."""
        _check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} exists already")
        if not isinstance(peft_config, LoraConfig):
            raise TypeError(
                f"peft_config must be a runlora.LoraConfig, got {type(peft_config).__name__}"
            )
        with_bias = [n for n, c in self.peft_config.items() if c.bias != "none"]
        if with_bias or peft_config.bias != "none":
            raise ValueError(
                "several adapters share the base layers' biases, so only a model with one "
                f"adapter can train them (bias={peft_config.bias!r} for {adapter_name!r}"
                + (f", bias set for {with_bias}" if with_bias else "")
                + "); use bias='none' for every adapter of a model with several (as PEFT asks)"
            )
        _inject(self.get_base_model(), peft_config, adapter_name)
        self.peft_config[adapter_name] = peft_config
        for module in self._wrappers():  # layers wrapped just now run the active adapters too
            module._activate(self._active_adapters)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Run ``adapter_name`` (a list: all of them, their terms summed); its tensors train
        unless ``inference_mode``, other adapters' tensors are frozen, and other parameters
        keep their ``requires_grad``."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if not names:
            raise ValueError("set_adapter needs at least one adapter name")
        self._known(names, "set_adapter")
        wrappers = self._wrappers()
        for module in wrappers:  # check everything before changing anything
            if isinstance(module, ModulesToSave):
                module._held(names)
        for module in wrappers:
            module.set_adapter(names, inference_mode=inference_mode)
        self._active_adapters = names

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name`` from every layer; if it was active, the first remaining
        adapter becomes active (in the inference mode its config says)."""
        self._known([adapter_name], "delete_adapter")
        if len(self.peft_config) == 1:
            raise ValueError(
                f"{adapter_name!r} is this model's only adapter; use unload() for the plain model"
            )
        for module in self._wrappers():
            held = module.lora_A if isinstance(module, RunLoRALinear) else module.modules_to_save
            if adapter_name in held:
                module.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        if adapter_name in self._active_adapters:
            rest = [n for n in self._active_adapters if n != adapter_name]
            rest = rest or [next(iter(self.peft_config))]
            self.set_adapter(rest, inference_mode=self.peft_config[rest[0]].inference_mode)

    def load_adapter(
        self, model_id, adapter_name: str, is_trainable: bool = False, **config_overrides
    ) -> None:
        """Add the adapter saved in directory ``model_id`` (by runlora or PEFT) as
        ``adapter_name``; frozen and not active, like ``add_adapter``."""
        from .io import load_adapter_weights, read_config

        config = read_config(model_id, inference_mode=not is_trainable, **config_overrides)
        self.add_adapter(adapter_name, config)
        try:
            load_adapter_weights(self, model_id, adapter_name=adapter_name)
        except Exception:
            self.delete_adapter(adapter_name)
            raise

    @contextlib.contextmanager
    def _routed(self, adapter_names, *, expand: bool = False) -> Iterator[None]:
        """Within the block every adapted layer runs example i with ``adapter_names[i]``.

        Calls nest (an inner call restores the outer routing when it ends); a model serves
        routed calls from one thread at a time (the routing lives on its layers)."""
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError(
                "adapter_names (one adapter per example) is for inference: call model.eval() "
                "first, or train one adapter at a time with set_adapter"
            )
        routing = Routing(adapter_names, expand=expand)
        self._known(sorted({n for n in routing.names if n != BASE}), "adapter_names")
        self._check_thread()
        wrappers = self._wrappers()
        if any(isinstance(m, RunLoRALinear) and m.merged for m in wrappers):
            raise ValueError(
                "adapter_names cannot be used while adapters are merged into the base weights; "
                "unmerge them first"
            )
        outer = [m.__dict__.get("_routing") for m in wrappers]
        depth = self.__dict__.get("_routing_depth", 0)
        self.__dict__.update(_routing_thread=threading.get_ident(), _routing_depth=depth + 1)
        for module in wrappers:  # plain attributes: skip nn.Module.__setattr__ (~5 µs each)
            module.__dict__["_routing"] = routing
        try:
            yield
        finally:
            for module, previous in zip(wrappers, outer, strict=True):
                module.__dict__["_routing"] = previous
                if depth == 0:
                    module.__dict__["_stack_cache"] = None
            self.__dict__["_routing_depth"] = depth
            if depth == 0:
                self.__dict__["_routing_thread"] = None

    def _check_thread(self) -> None:
        owner = self.__dict__.get("_routing_thread")
        if owner is not None and owner != threading.get_ident():
            raise RuntimeError(
                "this model is running a call with adapter_names in another thread, and the "
                "per-example routing lives on its layers: serve from one thread, or give each "
                "thread its own model"
            )

    def generate(self, *args, adapter_names=None, **kwargs):
        """The wrapped model's ``generate``; ``adapter_names``: one adapter per prompt (each
        prompt's beams and returned sequences run with its adapter)."""
        if adapter_names is not None:
            prompts = kwargs.get("input_ids", args[0] if args else kwargs.get("inputs_embeds"))
            if isinstance(prompts, torch.Tensor) and len(adapter_names) != prompts.shape[0]:
                raise ValueError(
                    f"adapter_names has {len(adapter_names)} names for {prompts.shape[0]} "
                    "prompts; give one adapter name per prompt"
                )
        with self._routed(adapter_names, expand=True):
            return self.get_base_model().generate(*args, **kwargs)

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

    def _unwrap(self, merge: bool, adapter_names: list[str] | None = None) -> nn.Module:
        model = self.get_base_model()
        for name, module in list(model.named_modules()):
            if isinstance(module, RunLoRALinear):
                if merge:
                    module.merge(adapter_names)
                module.merged_adapters.clear()
                _replace(model, name, module.base_layer)
            elif isinstance(module, ModulesToSave):
                keep = module.original_module
                if merge and module.active_adapter is not None:
                    keep = module.modules_to_save[module.active_adapter]
                _replace(model, name, keep)
        return model

    @torch.no_grad()
    def merge_and_unload(self, adapter_names: list[str] | None = None) -> nn.Module:
        """Fold the active adapters (or ``adapter_names``) into the base weights (W += s·B A)
        and return the plain model, with the active adapter's modules_to_save in place of the
        originals."""
        if adapter_names is not None:
            self._known(list(adapter_names), "merge_and_unload")
        return self._unwrap(merge=True, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        """The plain model without adapters, base weights as they were (unmerged)."""
        for _, layer in self.lora_layers():
            layer.unmerge()
        return self._unwrap(merge=False)

    def save_pretrained(self, save_directory, selected_adapters=None, **kwargs) -> None:
        """Write each adapter (or each of ``selected_adapters``) as PEFT does, atomically:
        ``adapter_config.json`` and ``adapter_model.safetensors`` in ``save_directory`` for
        ``"default"``, in ``save_directory/<name>`` for any other. Extra keyword arguments (from
        HF Trainer) are accepted and ignored.

        Under FSDP2 (sharded adapter tensors) this is a collective: call it on every rank; the
        adapter is gathered and rank 0 writes it (``runlora.distributed.save_adapter``)."""
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        self._known(names, "save_pretrained(selected_adapters=...)")
        if _has_sharded_adapter(self):
            from .distributed import save_adapter
        else:
            from .io import save_adapter
        for name in names:
            directory = Path(save_directory)
            save_adapter(
                self, directory if name == ADAPTER else directory / name, adapter_name=name
            )

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id,
        adapter_name: str = ADAPTER,
        is_trainable: bool = False,
        **config_overrides,
    ) -> RunLoRAModel:
        """Load an adapter saved by runlora or PEFT from the directory ``model_id`` onto
        ``model`` as ``adapter_name``. Frozen and in eval mode unless ``is_trainable``."""
        from .io import load_runlora_model

        return load_runlora_model(
            model,
            model_id,
            adapter_name=adapter_name,
            is_trainable=is_trainable,
            **config_overrides,
        )


def _has_sharded_adapter(model: nn.Module) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters() if p.requires_grad)


@functools.cache
def _signature_class(cls: type, model_cls: type) -> type:
    def forward(self, *args, adapter_names=None, **kwargs):
        if adapter_names is None:
            self._check_thread()
            return self.base_model(*args, **kwargs)
        with self._routed(adapter_names):
            return self.base_model(*args, **kwargs)

    functools.update_wrapper(forward, model_cls.forward)
    return type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})
