"""Where one LoRA layer's time goes: each product of the planned order, timed in the order a
training step runs them (issue 16's step target).

    python benchmarks/layer_products.py [--n 1024] [--shape 512x512] [-r 8] [--steps 300]

The merged forward and the merged-dX backward (``merged`` / ``recompute_merged``, what the
planner picks on llama_60m's shapes at N = 1024) written out product by product, each timed
with ``perf_counter`` around it, against the frozen layer's two GEMMs in the same loop. Unlike
timing a product alone in a tight loop, its operands here come after a big GEMM, as in a model.
Prints µs per product (mean over --steps iterations after 20 warm-up ones).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--shape", default="512x512", help="INxOUT")
    p.add_argument("-r", type=int, default=8)
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args(argv)
    n, r, s = args.n, args.r, 2.0
    i, o = (int(v) for v in args.shape.split("x"))
    gen = torch.Generator().manual_seed(0)
    w, a, b = (torch.randn(*shape, generator=gen) for shape in ((o, i), (r, i), (o, r)))
    x, dy = torch.randn(n, i, generator=gen), torch.randn(n, o, generator=gen)
    names = ["merge W + s·BA", "Y = X W'ᵀ", "Z = dY B", "dA = Zᵀ X", "X Aᵀ", "dB = (X Aᵀ)ᵀ dY"]
    names += ["merge again", "dX = dY W'", "frozen Y = X Wᵀ", "frozen dX = dY W"]
    total = dict.fromkeys(names, 0.0)
    clock = time.perf_counter
    for step in range(args.steps + 20):
        t = [clock()]
        m = torch.addmm(w, b, a, alpha=s)
        t.append(clock())
        y = F.linear(x, m)
        t.append(clock())
        z = dy @ b
        t.append(clock())
        da = z.t() @ x
        t.append(clock())
        la = x @ a.t()
        t.append(clock())
        db = (la.t() @ dy).t()
        t.append(clock())
        m2 = torch.addmm(w, b, a, alpha=s)
        t.append(clock())
        dx = dy @ m2
        t.append(clock())
        del m, y, z, da, la, db, m2, dx
        y = F.linear(x, w)
        t.append(clock())
        dx = dy @ w
        t.append(clock())
        del y, dx
        if step >= 20:
            for k, name in enumerate(names):
                total[name] += t[k + 1] - t[k]
    us = {k: v / args.steps * 1e6 for k, v in total.items()}
    print(f"N = {n}, {i} x {o}, r = {r}, fp32, {torch.get_num_threads()} threads: µs per call")
    for name, value in us.items():
        print(f"  {name:20} {value:8.1f}")
    lora = sum(us[k] for k in names[:8])
    frozen = us["frozen Y = X Wᵀ"] + us["frozen dX = dY W"]
    print(f"  LoRA layer / frozen layer: {lora / frozen:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
