"""``runlora layer-bench``: one LoRA layer's forward + backward vs the frozen nn.Linear and PEFT.

    runlora layer-bench                                  # Llama shapes, N = 4096, r = 8 and 64
    runlora layer-bench --shapes 4096x4096 -r 16 --dtype bf16 --device cuda
    runlora layer-bench --variants --shapes 1024x2736 -r 8   # every runlora order and layout

Arms run interleaved on one shared W; see ``runlora.bench.layer_bench``. Writes PREFIX.csv and
PREFIX.json (default prefix runlora_out/layer_bench). Needs peft (pip install 'runlora[bench]').
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from . import CliError, require


def _shape(text: str) -> tuple[int, int]:
    try:
        in_f, out_f = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a shape is INxOUT, like 1024x2736; got {text!r}"
        ) from None
    return in_f, out_f


def add_parser(sub, name: str) -> None:
    from ..bench.layer_bench import LayerSettings

    d = LayerSettings()
    p = sub.add_parser(
        name,
        help="time one LoRA layer: runlora vs PEFT vs frozen nn.Linear",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "-n",
        "--n-tokens",
        type=int,
        default=d.n_tokens,
        help=f"rows of X, batch x sequence (default {d.n_tokens})",
    )
    p.add_argument(
        "--shapes",
        nargs="+",
        type=_shape,
        default=list(d.shapes),
        metavar="INxOUT",
        help="layer shapes (default: 1024x1024 1024x2736 2736x1024)",
    )
    p.add_argument(
        "-r",
        "--ranks",
        nargs="+",
        type=int,
        default=list(d.ranks),
        metavar="R",
        help="LoRA ranks (default: 8 64)",
    )
    p.add_argument("-a", "--lora-alpha", type=float, default=d.lora_alpha)
    p.add_argument("-d", "--lora-dropout", type=float, default=d.dropout)
    p.add_argument("--dtype", default=d.dtype, help="fp32, bf16 or fp16 (fp16 needs CUDA)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--criterion", default=d.criterion, help="how runlora plans the layer (default flops)"
    )
    p.add_argument(
        "--variants",
        action="store_true",
        help="time every runlora (forward, backward, layout) on the first shape and "
        "rank instead of the planned one",
    )
    p.add_argument(
        "--min-run-time",
        type=float,
        default=d.min_run_time,
        metavar="SECONDS",
        help=f"timed seconds per arm and shape, at least (default {d.min_run_time:g})",
    )
    p.add_argument("--warmup", type=int, default=d.warmup_rounds, metavar="ROUNDS")
    p.add_argument("--min-rounds", type=int, default=d.min_rounds, metavar="ROUNDS")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "-o",
        "--out",
        default="runlora_out/layer_bench",
        metavar="PREFIX",
        help="write PREFIX.csv and PREFIX.json (default runlora_out/layer_bench)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..bench.harness import resolve_device
    from ..bench.layer_bench import (
        LayerSettings,
        format_layer_table,
        layer_arms,
        measure_layer,
        variant_arms,
    )
    from ..bench.report import environment, write_csv_json

    require(["peft"], "bench")
    settings = LayerSettings(
        n_tokens=args.n_tokens,
        shapes=tuple(args.shapes),
        ranks=tuple(args.ranks),
        lora_alpha=args.lora_alpha,
        dropout=args.lora_dropout,
        dtype=args.dtype,
        device=resolve_device(args.device),
        criterion=args.criterion,
        min_run_time=args.min_run_time,
        warmup_rounds=args.warmup,
        min_rounds=args.min_rounds,
        seed=args.seed,
    )
    try:
        settings.check()
    except ValueError as err:
        raise CliError(str(err)) from None
    jobs = [(s, r) for s in settings.shapes for r in settings.ranks]
    if args.variants:
        jobs = jobs[:1]
    rows = []
    for (in_f, out_f), r in jobs:
        build = variant_arms if args.variants else layer_arms
        arms = build(in_f, out_f, r, settings)
        measured = measure_layer(
            arms, settings, progress=not args.no_progress, desc=f"{in_f}x{out_f} r={r}"
        )
        if args.variants:
            measured.sort(key=lambda row: row["ms_mean"])
        rows += [{"in": in_f, "out": out_f, "r": r, **row} for row in measured]
    print(
        f"runlora layer-bench: N = {settings.n_tokens}, {settings.dtype}, {settings.device}, "
        f"dropout {settings.dropout:g}, criterion {settings.criterion}"
    )
    print(format_layer_table(rows))
    doc = {
        "settings": asdict(settings),
        "environment": environment(settings.device),
        "variants": bool(args.variants),
        "rows": rows,
    }
    csv_path, json_path = write_csv_json(Path(args.out), rows, doc)
    print(f"wrote {csv_path}, {json_path}")
    return 0
