"""``runlora plan``: which computation order each target layer of a model would run, and why.

runlora plan -m llama_1.3b --batch-size 8 --seq-len 1024 -r 16 --criterion roofline

Needs transformers (pip install 'runlora[hf]') to read the model config.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

from ..bench.harness import DTYPES
from ..ops.checks import dropout_probability, name_matches, positive_int
from ..ops.variants import BACKWARD_VARIANTS, FORWARD_VARIANTS, Problem
from ..planning.cache import default_cache
from ..planning.planner import CRITERIA, plan_layer
from . import CliError, require


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(
        name, help="show the plan for each target layer of a model", description=__doc__
    )
    p.add_argument("-m", "--model", help="shipped config name, config JSON path or model dir")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("-r", "--lora-r", type=int, default=8)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--criterion", default="flops", help=f"one of {', '.join(CRITERIA)}")
    p.add_argument("-d", "--lora-dropout", type=float, default=0.0)
    p.add_argument(
        "--target-modules",
        nargs="+",
        default=None,
        help="module names or suffixes (default: every nn.Linear but the output head)",
    )
    p.add_argument("-o", "--out", default=None, help="write the plans as JSON to this path")
    p.add_argument("--clear-cache", action="store_true", help="empty the persistent plan cache")


def _meta_model(name: str) -> nn.Module:
    from ..configs import build_model, load_config

    try:
        config = load_config(name)
    except (FileNotFoundError, ValueError, OSError) as err:
        raise CliError(str(err)) from None
    with torch.device("meta"):
        return build_model(config)


def target_linears(model: nn.Module, targets: list[str] | None) -> dict[str, nn.Linear]:
    """nn.Linear modules whose name equals or ends with a target (default: all but the head)."""
    found = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if targets is None:
            if leaf not in ("lm_head", "classifier", "score", "pooler", "dense_head"):
                found[name] = mod
        elif any(name_matches(name, t) for t in targets):
            found[name] = mod
    if not found:
        raise CliError(f"no nn.Linear matches --target-modules {targets}")
    return found


def peft_flops(n: int, i: int, o: int, r: int) -> int:
    """FLOPs of PEFT's order: sequential forward, autograd backward that keeps X Aᵀ."""
    p = Problem(n, i, o, r)
    return (
        FORWARD_VARIANTS["sequential"].cost(p).flops
        + BACKWARD_VARIANTS["recompute_split"].cost(p, saved_la=True).flops
    )


def plan_rows(
    linears: dict[str, nn.Linear],
    n_tokens: int,
    r: int,
    criterion: str,
    dtype: torch.dtype,
    device: str,
    dropout: float,
    progress: bool = True,
) -> list:
    from tqdm.auto import tqdm

    shapes: dict[tuple[int, int, bool], list[str]] = {}
    for name, mod in linears.items():
        shapes.setdefault((mod.in_features, mod.out_features, mod.bias is not None), []).append(
            name
        )
    rows = []
    for (i, o, bias), names in tqdm(
        shapes.items(), desc=f"planning ({criterion})", disable=not progress, unit="shape"
    ):
        t0 = time.perf_counter()
        plan = plan_layer(
            n_tokens,
            i,
            o,
            r,
            criterion=criterion,
            bias=bias,
            dropout=dropout,
            dtype=dtype,
            device=device,
        )
        rows.append(
            {
                "layers": names,
                "in_features": i,
                "out_features": o,
                "bias": bias,
                "n_tokens": n_tokens,
                "r": r,
                "plan": plan.to_dict(),
                "peft_flops": peft_flops(n_tokens, i, o, r),
                "planning_s": round(time.perf_counter() - t0, 4),
            }
        )
    return rows


def _print(rows: list) -> None:
    head = (
        f"{'layers':<40} {'in x out':>11} {'forward':>13} {'backward':>26} {'layout':>8} "
        f"{'GFLOP':>8} {'vs PEFT':>8} {'pred ms':>8} {'meas ms':>8}"
    )
    print(head)
    print("-" * len(head))
    for row in rows:
        p = row["plan"]
        names = row["layers"]
        leaves = ",".join(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))
        label = leaves + (f" (x{len(names)})" if len(names) > 1 else "")
        ratio = p["flops"] / row["peft_flops"]
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        print(
            f"{label:<40} {row['in_features']:>5}x{row['out_features']:<5} {p['forward']:>13} "
            f"{p['backward']:>26} {p['layout']:>8} {p['flops'] / 1e9:>8.2f} {ratio:>8.3f} "
            f"{fmt(p['predicted_ms']):>8} {fmt(p['measured_ms']):>8}"
        )


def run(args) -> int:
    if args.clear_cache:
        cache = default_cache()
        cache.clear()
        print(f"cleared plan cache {cache.path}")
        if args.model is None:
            return 0
    if args.model is None:
        raise CliError("-m/--model is required (or --clear-cache alone)")
    require(["transformers"], "hf")
    if args.criterion not in CRITERIA:
        raise CliError(f"unknown criterion {args.criterion!r}; known: {', '.join(CRITERIA)}")
    try:
        for opt in ("batch_size", "seq_len", "lora_r"):
            positive_int(f"--{opt.replace('_', '-')}", getattr(args, opt))
        dropout_probability("--lora-dropout", args.lora_dropout)
    except ValueError as err:
        raise CliError(str(err)) from None
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise CliError(f"--device {args.device} asked for, but torch sees no CUDA device")
    model = _meta_model(args.model)
    linears = target_linears(model, args.target_modules)
    t0 = time.perf_counter()
    rows = plan_rows(
        linears,
        args.batch_size * args.seq_len,
        args.lora_r,
        args.criterion,
        DTYPES[args.dtype],
        args.device,
        args.lora_dropout,
    )
    total = time.perf_counter() - t0
    _print(rows)
    print(
        f"\n{len(linears)} layers, {len(rows)} distinct shapes, planned in {total:.2f} s "
        f"by {args.criterion!r}"
    )
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            json.dumps(
                {
                    "model": args.model,
                    "criterion": args.criterion,
                    "planning_s": total,
                    "layers": rows,
                },
                indent=1,
            )
        )
        print(f"wrote {out}")
    return 0
