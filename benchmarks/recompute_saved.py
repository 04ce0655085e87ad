"""Saved bytes for backward with and without recomputed LoRA inputs (issue 16), deterministic.

    python benchmarks/recompute_saved.py [--config llama_60m] [--batch 4] [--seq 256] [--r 8]

One training step of each arm on the same weights (CPU fp32 unless --dtype), all seven
projections adapted; autograd's saved tensors counted once per storage, parameters excluded
(runlora.bench.memory.saved_tensor_bytes). Prints a table and writes --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from runlora.bench.memory import MIB
from runlora.bench.model_bench import BenchSettings, _make_batch, build_arms
from runlora.configs import build_model, default_target_modules, load_config


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="llama_60m")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from runlora.bench.memory import saved_tensor_bytes

    rows = []
    for dropout in (0.0, 0.1):
        torch.manual_seed(0)
        config = load_config(args.config)
        model = build_model(config).to(getattr(torch, args.dtype))
        settings = BenchSettings(
            batch_size=args.batch,
            seq_len=args.seq,
            r=args.r,
            lora_alpha=2 * args.r,
            lora_dropout=dropout,
            fused=True,
            criterions=("flops",),
        )
        batch = _make_batch(config, "causal_lm", settings)
        arms = build_arms(model, batch, settings, default_target_modules(model))
        floor = None
        for arm in arms:
            saved, _ = saved_tensor_bytes(arm.step, arm.exclude)
            floor = saved if arm.name == "floor" else floor
            rows.append(
                {
                    "dropout": dropout,
                    "arm": arm.name,
                    "saved_mib": saved / MIB,
                    "x_floor": saved / floor,
                }
            )
            print(
                f"dropout {dropout}  {arm.name:22s} {saved / MIB:8.1f} MiB  "
                f"{saved / floor:.3f}x floor",
                flush=True,
            )
    if args.out:
        with open(args.out + ".tmp", "w") as f:
            json.dump(
                {"command": " ".join(sys.argv), "args": vars(args), "rows": rows}, f, indent=1
            )
        import os

        os.replace(args.out + ".tmp", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
