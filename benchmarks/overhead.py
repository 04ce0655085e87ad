"""Per-call overhead of one LoRA layer on a tiny shape, where the work is negligible.

64 × 64 nn.Linear, r = 8, 8 tokens, one thread. Arms:

- frozen: the ``nn.Linear`` alone;
- peft: PEFT's ``lora.Linear`` (its own forward);
- peft+runlora: the same PEFT ``lora.Linear`` switched by ``runlora.from_peft``, i.e. runlora's
  op inside PEFT's layer, as ``get_runlora_model`` and ``patch_peft`` build it;
- runlora: ``RunLoRALinear``, runlora's own layer class.

Forward, forward + backward, and forward under ``torch.no_grad``. Each figure is the best of 7
interleaved rounds of 1000 calls (µs per call). What it shows is Python and dispatch cost per
layer call, which on a GPU is paid on the host for every layer of every step.

    python benchmarks/overhead.py
"""

from __future__ import annotations

import copy
import time

import peft
import torch
from torch import nn

from runlora import RunLoRALinear, from_peft
from runlora.integrations.peft import is_accelerated


def per_call_us(fn, n: int = 1000) -> float:
    for _ in range(20):
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


class _One(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def _peft_layer(base: nn.Linear) -> nn.Module:
    """PEFT's ``lora.Linear`` around a copy of ``base`` (r = 8, alpha 16)."""
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["layer"])
    return peft.get_peft_model(_One(copy.deepcopy(base)), config).base_model.model.layer


def main(rounds: int = 7, calls: int = 1000) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = nn.Linear(64, 64)
    x = torch.randn(8, 64, requires_grad=True)
    patched = from_peft(_peft_layer(base))
    assert is_accelerated(patched) and isinstance(patched, peft.tuners.lora.Linear)
    arms = {
        "frozen": copy.deepcopy(base).requires_grad_(False),
        "peft": _peft_layer(base),
        "peft+runlora": patched,
        "runlora": RunLoRALinear(copy.deepcopy(base), r=8, lora_alpha=16),
    }
    best: dict[str, list[float]] = {name: [float("inf")] * 3 for name in arms}
    for _ in range(rounds):
        for name, mod in arms.items():
            figures = [per_call_us(lambda m=mod: m(x), calls)]
            figures.append(per_call_us(lambda m=mod: m(x).sum().backward(), calls))
            with torch.no_grad():
                figures.append(per_call_us(lambda m=mod: m(x), calls))
            best[name] = [min(a, b) for a, b in zip(best[name], figures, strict=True)]
    print(f"{'arm':<13} {'fwd µs':>8} {'fwd+bwd µs':>11} {'no_grad fwd µs':>15}")
    for name, (fwd, both, inference) in best.items():
        print(f"{name:<13} {fwd:>8.1f} {both:>11.1f} {inference:>15.1f}")


if __name__ == "__main__":
    main()
