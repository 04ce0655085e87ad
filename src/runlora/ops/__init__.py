"""The paper's math: the LoRA op's computation orders as data with their cost model
(``variants``), the products in each layout (``products``), regenerated dropout masks
(``dropout``), the ``Plan`` the op runs (``plan``) and the op itself (``lora_linear``); DoRA's
orders (``dora_variants``) and op (``dora_linear``) beside it; the fused op over projections that
share an input (``fused_lora_linear``) with its stacking and cost (``fused_variants``).

Nothing here imports the rest of runlora.
"""

from .dora import dora_linear
from .dora_variants import DoRAPlan
from .function import lora_linear, set_plan_resolver
from .fused import fused_lora_linear
from .plan import Plan, as_plan
from .variants import BACKWARD_VARIANTS, FORWARD_VARIANTS, LAYOUTS, Problem

__all__ = [
    "lora_linear",
    "dora_linear",
    "fused_lora_linear",
    "DoRAPlan",
    "set_plan_resolver",
    "Plan",
    "as_plan",
    "Problem",
    "FORWARD_VARIANTS",
    "BACKWARD_VARIANTS",
    "LAYOUTS",
]
