"""runlora: faster and lighter LoRA training, with exactly the same math.

    Y = X Wᵀ + s·(X Aᵀ) Bᵀ          W frozen (out, in), A (r, in), B (out, r)

computed in the cheapest of several equivalent orders, planned per layer shape.
"""

from . import roofline as _roofline  # noqa: F401  (registers the "roofline" criterion)
from . import timing as _timing  # noqa: F401  (registers the "time" criterion)
from .config import LoraConfig
from .function import lora_linear
from .layer import RunLoRALinear
from .model import RunLoRAModel, get_runlora_model
from .peft_compat import from_peft
from .planner import CRITERIA, Plan, plan_layer
from .variants import BACKWARD_VARIANTS, FORWARD_VARIANTS, LAYOUTS

__version__ = "0.1.0"

__all__ = [
    "lora_linear",
    "Plan",
    "plan_layer",
    "CRITERIA",
    "FORWARD_VARIANTS",
    "BACKWARD_VARIANTS",
    "LAYOUTS",
    "LoraConfig",
    "RunLoRALinear",
    "RunLoRAModel",
    "get_runlora_model",
    "from_peft",
    "__version__",
]
