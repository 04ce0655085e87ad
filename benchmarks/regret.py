"""Planner regret: time of the pair each criterion picks over the best measured pair.

Every forward variant and every (backward variant, layout) is timed on each shape of a grid;
because the halves are independent, the best pair is the best forward plus the best backward.
Run alone on a quiet machine:

    .venv/bin/python benchmarks/regret.py --out benchmarks/regret_cpu.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import torch
from tqdm import tqdm

import runlora
from runlora.ops.variants import LAYOUTS, Problem
from runlora.planning.measured import measure_halves
from runlora.planning.roofline import calibrate
from runlora.planning.scoring import candidates

GRID_N = (256, 1024, 4096, 16384)
GRID_DIMS = ((512, 512), (1024, 2736), (2736, 1024), (2048, 2048), (4096, 4096), (8192, 1024))
GRID_R = (4, 16, 64, 256)
MAX_WORK = 2**35  # N·in·out above this takes minutes per shape on a 2-core CPU: skipped


def timed_halves(problem: Problem) -> tuple[list, list]:
    """The forward variants and the (backward variant, layout) pairs to time for ``problem``:
    each candidate half once (a ``_dx_first`` twin runs the same products as its base)."""
    pairs = list(candidates(problem))
    fwds = list({f.name: f for f, _ in pairs}.values())
    bwds = [
        (b, lay)
        for b in {b.name: b for _, b in pairs}.values()
        if not b.dx_first
        for lay in LAYOUTS
    ]
    return fwds, bwds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/regret_cpu.json")
    ap.add_argument("--budget", type=float, default=0.4, help="seconds per variant")
    ap.add_argument("--max-work", type=float, default=MAX_WORK)
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    calib = calibrate(torch.float32, "cpu", refresh=True)
    calib_s = time.perf_counter() - t0
    grid = [
        (n, i, o, r)
        for n, (i, o), r in itertools.product(GRID_N, GRID_DIMS, GRID_R)
        if n * i * o <= args.max_work and r < min(i, o)
    ]
    rows = []
    for n, i, o, r in tqdm(grid, desc="shapes"):
        problem = Problem(n, i, o, r)
        fwds, bwds = timed_halves(problem)
        per_variant = args.budget * len(fwds + bwds)
        f_ms, b_ms = measure_halves(
            problem, fwds, bwds, torch.float32, torch.device("cpu"), per_variant
        )
        best = min(f_ms.values()) + min(b_ms.values())
        row = {"n": n, "in": i, "out": o, "r": r, "best_ms": best}
        for crit in ("flops", "roofline"):
            plan = runlora.plan_layer(n, i, o, r, criterion=crit)
            ms = f_ms[plan.forward] + b_ms[(plan.backward.removesuffix("_dx_first"), plan.layout)]
            row[crit] = {
                "forward": plan.forward,
                "backward": plan.backward,
                "layout": plan.layout,
                "ms": ms,
                "regret": ms / best,
            }
        rows.append(row)
    summary = {}
    for crit in ("flops", "roofline"):
        regrets = [row[crit]["regret"] for row in rows]
        summary[crit] = {
            "median": statistics.median(regrets),
            "worst": max(regrets),
            "mean": statistics.fmean(regrets),
        }
    out = {
        "device": runlora.planning.cache.device_key("cpu", torch.float32),
        "calibration": calib,
        "calibration_s": calib_s,
        "summary": summary,
        "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"{len(rows)} shapes; calibration {calib_s:.1f} s")
    for crit, s in summary.items():
        print(
            f"{crit:>9}: regret median {s['median']:.3f}  mean {s['mean']:.3f}  "
            f"worst {s['worst']:.3f}"
        )


if __name__ == "__main__":
    main()
