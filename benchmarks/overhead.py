"""Per-call overhead of one LoRA layer on a tiny shape, where the work is negligible.

64 × 64 nn.Linear, r = 8, 8 tokens, one thread: frozen ``nn.Linear``, PEFT's ``lora.Linear`` and
``RunLoRALinear``; forward, forward + backward, and forward under ``torch.no_grad``. Each figure
is the best of 7 interleaved rounds of 1000 calls (µs per call). What it shows is Python and
dispatch cost per layer call, which on a GPU is paid on the host for every layer of every step.

    python benchmarks/overhead.py
"""

from __future__ import annotations

import copy
import time

import peft
import torch
from torch import nn

from runlora import RunLoRALinear


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


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = nn.Linear(64, 64)
    x = torch.randn(8, 64, requires_grad=True)
    wrapped = peft.get_peft_model(
        _One(copy.deepcopy(base)), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["layer"])
    )
    arms = {
        "frozen": copy.deepcopy(base).requires_grad_(False),
        "peft": wrapped.base_model.model.layer,
        "runlora": RunLoRALinear(copy.deepcopy(base), r=8, lora_alpha=16),
    }
    best: dict[str, list[float]] = {name: [float("inf")] * 3 for name in arms}
    for _ in range(7):
        for name, mod in arms.items():
            figures = [per_call_us(lambda m=mod: m(x))]
            figures.append(per_call_us(lambda m=mod: m(x).sum().backward()))
            with torch.no_grad():
                figures.append(per_call_us(lambda m=mod: m(x)))
            best[name] = [min(a, b) for a, b in zip(best[name], figures, strict=True)]
    print(f"{'arm':<8} {'fwd µs':>8} {'fwd+bwd µs':>11} {'no_grad fwd µs':>15}")
    for name, (fwd, both, inference) in best.items():
        print(f"{name:<8} {fwd:>8.1f} {both:>11.1f} {inference:>15.1f}")


if __name__ == "__main__":
    main()
