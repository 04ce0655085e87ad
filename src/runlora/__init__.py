"""runlora: faster and lighter LoRA training, with exactly the same math.

    Y = X Wᵀ + s·(X Aᵀ) Bᵀ          W frozen (out, in), A (r, in), B (out, r)

computed in the cheapest of several equivalent orders, planned per layer shape. Models stay
PEFT's own ``PeftModel``; runlora is the engine of their LoRA layers::

    import runlora
    runlora.patch_peft()          # every LoRA layer PEFT (or TRL, ...) builds runs runlora's op
"""

import importlib.abc
import sys

from .config import LoraConfig
from .integrations.peft import (
    describe,
    from_peft,
    from_pretrained,
    get_runlora_model,
    patch_peft,
    unpatch_peft,
)
from .layers import RunLoRALinear
from .layers.recompute import enable as recompute_inputs
from .ops import (
    BACKWARD_VARIANTS,
    FORWARD_VARIANTS,
    LAYOUTS,
    DoRAPlan,
    Plan,
    dora_linear,
    lora_linear,
    set_plan_resolver,
)
from .planning import CRITERIA, default_plan, plan_layer

# The op knows no planner: lora_linear(plan=None) plans by FLOPs through runlora.planning.
set_plan_resolver(default_plan)

__version__ = "0.3.0"

__all__ = [
    "lora_linear",
    "dora_linear",
    "Plan",
    "DoRAPlan",
    "plan_layer",
    "CRITERIA",
    "FORWARD_VARIANTS",
    "BACKWARD_VARIANTS",
    "LAYOUTS",
    "LoraConfig",
    "RunLoRALinear",
    "get_runlora_model",
    "from_peft",
    "from_pretrained",
    "patch_peft",
    "unpatch_peft",
    "describe",
    "recompute_inputs",
    "__version__",
]

_REMOVED = {
    "RunLoRAModel": (
        "runlora.RunLoRAModel was removed in runlora 0.2: models are PEFT's own PeftModel now. "
        "runlora.get_runlora_model(model, config) returns a peft.PeftModel; load an adapter with "
        "runlora.from_pretrained(model, path) (or peft.PeftModel.from_pretrained under "
        "runlora.patch_peft())"
    ),
}


def __getattr__(name: str):
    if name in _REMOVED:
        raise AttributeError(_REMOVED[name])
    raise AttributeError(f"module 'runlora' has no attribute {name!r}")


#: Modules of runlora 0.2 that moved when the package was laid out in folders (0.3).
_MOVED = {
    "variants": "ops.variants",
    "dropout": "ops.dropout",
    "function": "ops.function",
    "planner": "planning.planner",
    "plan_lookup": "planning.lookup",
    "cache": "planning.cache",
    "roofline": "planning.roofline",
    "timing": "planning.measured",
    "layer": "layers.layer",
    "quant": "layers.quant",
    "routing": "layers.routing",
    "distributed": "integrations.distributed",
    "layer_bench": "bench.layer_bench",
    "finetune": "recipes.finetune",
    "data": "recipes.data",
}


class _MovedModules(importlib.abc.MetaPathFinder):
    """``import runlora.<a 0.2 module>`` fails with the module's new path, not a bare
    ModuleNotFoundError (asked last, so it sees only names nothing else found)."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.partition(".")
        new = _MOVED.get(name) if package == __name__ and "." not in name else None
        if new is not None:
            raise ModuleNotFoundError(
                f"runlora.{name} moved to runlora.{new} in runlora 0.3 (the package is laid out "
                "in folders: ops, planning, layers, integrations, bench, recipes)",
                name=fullname,
            )
        return None


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.append(_MovedModules())
