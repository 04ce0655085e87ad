"""runlora: faster and lighter LoRA training, with exactly the same math.

    Y = X Wᵀ + s·(X Aᵀ) Bᵀ          W frozen (out, in), A (r, in), B (out, r)

computed in the cheapest of several equivalent orders, planned per layer shape.
"""

from .function import lora_linear
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
    "__version__",
]
