"""One DoRA layer against the LoRA op and the frozen layer: median step times over interleaved
rounds, then torch.profiler's table of the DoRA op (where its extra time goes).

    python benchmarks/dora_layer_profile.py [--n 1024 --in 512 --out 1376 -r 8 --rounds 30]

Shapes default to llama_60m's up_proj at batch 4 × 256; fp32 on CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

import runlora


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--in", dest="in_f", type=int, default=512)
    p.add_argument("--out", dest="out_f", type=int, default=1376)
    p.add_argument("-r", type=int, default=8)
    p.add_argument("--rounds", type=int, default=30)
    args = p.parse_args()
    torch.manual_seed(0)
    n, i, o, r = args.n, args.in_f, args.out_f, args.r
    x = torch.randn(n, i, requires_grad=True)
    w = torch.randn(o, i) / 20
    a = (torch.randn(r, i) / 20).requires_grad_()
    b = (torch.randn(o, r) / 20).requires_grad_()
    m = torch.linalg.vector_norm(w, dim=1).requires_grad_()
    dy = torch.randn(n, o)

    def frozen():
        torch.nn.functional.linear(x, w).backward(dy)

    def lora():
        runlora.lora_linear(x, w, a, b, scaling=2.0).backward(dy)

    def dora(save_output=True):
        runlora.dora_linear(x, w, a, b, m, scaling=2.0, save_output=save_output).backward(dy)

    arms = {"frozen": frozen, "lora": lora, "dora": dora, "dora_lowmem": lambda: dora(False)}
    for fn in arms.values():
        for _ in range(3):
            fn()
    times = {k: [] for k in arms}
    for _ in range(args.rounds):
        for k, fn in arms.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    ref = statistics.median(times["lora"])
    for k, t in times.items():
        med = statistics.median(t)
        print(f"{k:<12} {med * 1e3:7.2f} ms   x lora {med / ref:.3f}")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            dora()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
