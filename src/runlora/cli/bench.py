"""``runlora bench``: training-step time and memory of runlora vs PEFT vs the frozen model.

    runlora bench                                   # llama_20m + llama_60m, 4 x 256, r=8, CPU
    runlora bench -m llama_130m llama_250m -r 128 -d 0.1 --dtype bf16 --device cuda
    runlora bench --list

Arms run interleaved on shared weights; see ``runlora.bench`` for what each figure measures.
Writes PREFIX.csv, PREFIX.json and PREFIX.png (default prefix runlora_out/bench). Needs
transformers and peft (pip install 'runlora[bench]'), checked before anything runs; without
matplotlib the CSV and JSON are written, and the PNG is skipped with a warning.
"""

from __future__ import annotations

import argparse

from . import CliError, optional, require

#: the no-argument job (``make bench``): a few minutes on a 2-core CPU.
DEFAULT_MODELS = ("llama_20m", "llama_60m")


def add_parser(sub, name: str) -> None:
    from ..bench.model_bench import BenchSettings

    d = BenchSettings()
    p = sub.add_parser(
        name,
        help="time a training step: runlora vs PEFT vs frozen",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "-m",
        "--model",
        nargs="+",
        default=list(DEFAULT_MODELS),
        metavar="MODEL",
        help="shipped config names (see --list), config JSON paths or local model "
        f"dirs (default: {' '.join(DEFAULT_MODELS)})",
    )
    p.add_argument("--list", action="store_true", help="list the shipped configs and exit")
    p.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help=f"sequences per step (default {d.batch_size})",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=d.seq_len,
        help=f"tokens per sequence, at most the model's max_position_embeddings "
        f"(default {d.seq_len}; ignored by image models)",
    )
    p.add_argument("-r", "--lora-r", type=int, default=d.r, help=f"LoRA rank (default {d.r})")
    p.add_argument(
        "-a",
        "--lora-alpha",
        type=float,
        default=d.lora_alpha,
        help=f"LoRA alpha; scaling = alpha / r (default {d.lora_alpha:g})",
    )
    p.add_argument(
        "-d",
        "--lora-dropout",
        type=float,
        default=d.lora_dropout,
        help="dropout on the LoRA branch's input (default 0)",
    )
    p.add_argument("--dtype", default=d.dtype, help="fp32, bf16 or fp16 (fp16 needs CUDA)")
    p.add_argument(
        "--target-modules",
        nargs="+",
        default=None,
        metavar="NAME",
        help="module names or name suffixes to adapt (default: every linear layer "
        "of the transformer blocks)",
    )
    p.add_argument(
        "--criterions",
        nargs="+",
        default=list(d.criterions),
        metavar="CRITERION",
        help="planning criteria; one runlora arm each (default: flops)",
    )
    p.add_argument(
        "--min-run-time",
        type=float,
        default=d.min_run_time,
        metavar="SECONDS",
        help=f"timed seconds per arm, at least (default {d.min_run_time:g})",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=d.warmup_rounds,
        metavar="ROUNDS",
        help=f"untimed rounds first (default {d.warmup_rounds})",
    )
    p.add_argument(
        "--min-rounds",
        type=int,
        default=d.min_rounds,
        metavar="ROUNDS",
        help=f"timed rounds, at least (default {d.min_rounds})",
    )
    p.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="default: cuda if available, else cpu",
    )
    p.add_argument(
        "--quant",
        default="none",
        choices=("none", "4bit", "8bit"),
        help="quantize the frozen base weights (bitsandbytes)",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="weights and batch seed")
    p.add_argument(
        "-o",
        "--out",
        default="runlora_out/bench",
        metavar="PREFIX",
        help="write PREFIX.csv, PREFIX.json, PREFIX.png (default runlora_out/bench)",
    )
    p.add_argument(
        "--dora",
        action="store_true",
        help="also PEFT's DoRA (use_dora=True) against runlora's DoRA: saving the unscaled "
        "output for the magnitude's gradient, and recomputing it (runlora_dora_lowmem)",
    )
    p.add_argument(
        "--fused",
        action="store_true",
        help="also runlora without shared-input fusion (runlora_unfused: from_peft(model, "
        "fuse=False)) and without fusion or recomputed inputs (runlora_saved: also "
        "recompute_inputs=False): what each adds to the default's gain",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plot", action="store_true", help="write no PREFIX.png")


def _list_configs() -> str:
    from ..configs import count_parameters, default_task, list_configs, load_config

    lines = []
    for name in list_configs():
        cfg = load_config(name)
        n = count_parameters(cfg)
        lines.append(
            (
                n,
                f"{name:<15} {cfg.model_type:<8} {default_task(cfg):<21} "
                f"hidden {cfg.hidden_size:>5}  layers {cfg.num_hidden_layers:>3}  "
                f"{n / 1e6:>8.1f}M params",
            )
        )
    return "\n".join(line for _, line in sorted(lines))


def run(args: argparse.Namespace) -> int:
    from ..bench.harness import BenchError, resolve_device
    from ..bench.model_bench import BenchSettings, format_table, run_bench, write_outputs
    from ..configs import load_config

    if args.list:
        require(["transformers"], "hf")
        print(_list_configs())
        return 0
    require(["transformers", "peft"], "bench")
    if args.quant != "none":
        require(["bitsandbytes"], "quant")
    settings = BenchSettings(
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        dtype=args.dtype,
        target_modules=tuple(args.target_modules) if args.target_modules else None,
        criterions=tuple(args.criterions),
        min_run_time=args.min_run_time,
        warmup_rounds=args.warmup,
        min_rounds=args.min_rounds,
        device=resolve_device(args.device),
        quant=args.quant,
        seed=args.seed,
        dora=args.dora,
        fused=args.fused,
    )
    try:
        settings.check()
        for name in args.model:
            settings.check_model(load_config(name))
    except ValueError as err:
        raise CliError(str(err)) from None
    plot = not args.no_plot and optional(
        "matplotlib",
        "bench",
        command="bench",
        skipped=f"{args.out}.png is not drawn (the CSV and JSON are written)",
    )
    try:
        results = run_bench(args.model, settings, progress=not args.no_progress)
    except BenchError as err:  # e.g. target modules that match no layer
        raise CliError(str(err)) from None
    print(format_table(results, settings))
    paths = write_outputs(results, settings, args.out, plot=plot)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
