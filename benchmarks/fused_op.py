"""The fused multi-projection op against one ``lora_linear`` per projection, op level (issue 16).

    python benchmarks/fused_op.py [--n 1024] [--d 512] [--m 1376] [--ranks 8 128] [--rounds 15]
    python benchmarks/fused_op.py --device cuda --dtype bf16 --n 8192     # on a GPU

What the model bench cannot separate from the groups' bookkeeping and the rest of the step: the
op alone, on the shapes of one Llama block, planned as the model's layers are (by FLOPs):

- ``qkv``: q_proj, k_proj, v_proj, three (d, d) projections reading one x ``(N, d)``;
- ``gate_up``: gate_proj, up_proj, two (m, d) projections reading one x.

Each round times forward + backward of the frozen projections (``F.linear`` per projection, x
requiring grad: the floor), the K separate ops, and the fused op, back to back (synchronised on
CUDA); the figures are medians of the per-round ratios. The outputs and gradients of the two
LoRA arms are checked against each other first. Prints a table and writes --out (JSON) if given.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import runlora
from runlora.ops.fused import fused_lora_linear

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _arms(n: int, d: int, outs: list[int], r: int, seed: int, dtype, device):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    x = rnd(n, d).requires_grad_()
    ws = [rnd(o, d, scale=d**-0.5) for o in outs]
    As = [rnd(r, d, scale=d**-0.5).requires_grad_() for _ in outs]
    Bs = [rnd(o, r, scale=0.1).requires_grad_() for o in outs]
    dys = [rnd(n, o) for o in outs]
    s = 2.0
    plans = [runlora.plan_layer(n, d, o, r, dtype=dtype, device=device) for o in outs]
    params = [x, *As, *Bs]

    def run(ys):
        torch.autograd.backward(list(ys), dys)
        grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        return ys, grads

    def frozen():
        return run([F.linear(x, w) for w in ws])

    def separate():
        ys = [
            runlora.lora_linear(x, w, a, b, scaling=s, plan=p)
            for w, a, b, p in zip(ws, As, Bs, plans, strict=True)
        ]
        return run(ys)

    def fused():
        k = len(outs)
        ys = fused_lora_linear(
            x, ws, As, Bs, [None] * k, scalings=[s] * k, dropouts=[0.0] * k, plans=plans
        )
        return run(ys)

    return {"frozen": frozen, "separate": separate, "fused": fused}, plans


def _check(arms, dtype) -> None:
    (ys1, g1), (ys2, g2) = arms["separate"](), arms["fused"]()
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16 / fp16: the sums' rounding
    for a, b in zip([*ys1, *g1], [*ys2, *g2], strict=True):
        a, b = a.float(), b.float()
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * a.abs().max().item())


def measure(arms, rounds: int, reps: int, device: torch.device) -> dict[str, list[float]]:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for f in arms.values():  # warm-up
        f()
    times: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(rounds):
        for name, f in arms.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(reps):
                f()
            sync()
            times[name].append((time.perf_counter() - t0) / reps * 1e3)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1024, help="tokens N (default 1024 = 4 x 256)")
    p.add_argument("--d", type=int, default=512, help="hidden size (default llama_60m's)")
    p.add_argument("--m", type=int, default=1376, help="intermediate size")
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 128])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--reps", type=int, default=5, help="calls per arm per round")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    rows = []
    where = f"{torch.get_num_threads()} threads" if device.type == "cpu" else str(device)
    print(f"fused op vs separate ops: N = {args.n}, {args.dtype}, {where}")
    print(
        f"{'group':8} {'r':>4} {'frozen ms':>10} {'sep x frozen':>13} {'fused x frozen':>15} "
        f"{'fused x sep':>12}  plan"
    )
    for r in args.ranks:
        for group, outs in (("qkv", [args.d] * 3), ("gate_up", [args.m] * 2)):
            arms, plans = _arms(args.n, args.d, outs, r, r, dtype, device)
            _check(arms, dtype)
            t = measure(arms, args.rounds, args.reps, device)

            def ratio(a, b, t=t):
                return statistics.median(x / y for x, y in zip(t[a], t[b], strict=True))

            row = {
                "group": group,
                "r": r,
                "frozen_ms": statistics.median(t["frozen"]),
                "separate_x_frozen": ratio("separate", "frozen"),
                "fused_x_frozen": ratio("fused", "frozen"),
                "fused_x_separate": ratio("fused", "separate"),
                "plan": f"{plans[0].forward}/{plans[0].backward}",
                "times_ms": t,
            }
            rows.append(row)
            print(
                f"{group:8} {r:>4} {row['frozen_ms']:>10.2f} {row['separate_x_frozen']:>13.3f} "
                f"{row['fused_x_frozen']:>15.3f} {row['fused_x_separate']:>12.3f}  {row['plan']}"
            )
    if args.out:
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        doc = {
            "args": vars(args),
            "machine": gpu or platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "rows": rows,
        }
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
