"""``runlora finetune``: LoRA training of a causal LM or of all-MiniLM-L6-v2, optionally compared
step by step with PEFT.

    runlora finetune -m llama_60m --steps 300 --compare -o runs/llama_60m
    runlora finetune -m minilm --epochs 3 --compare -o runs/minilm

Needs transformers and peft (pip install 'runlora[hf]'), checked before anything runs. Without
matplotlib, --compare writes the adapters and the log, and skips loss_curves.png with a warning.
"""

from __future__ import annotations

import argparse
import math

from . import CliError, optional, require

__all__ = ["add_parser", "run"]


def _targets(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(
            "give module names separated by commas, e.g. q_proj,v_proj"
        )
    return names


def add_parser(subparsers, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name,
        help="LoRA fine-tuning, with --compare against PEFT",
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        epilog=__doc__.split("\n\n")[-1].replace("\n", " "),  # what it needs installed
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "-m",
        "--model",
        default="llama_20m",
        help="a shipped config name (llama_20m, llama_60m, ...), a local Hugging Face causal-LM "
        "directory, or 'minilm' (pretrained all-MiniLM-L6-v2, sentence classification)",
    )
    p.add_argument(
        "--train-file",
        help="plain text (documents separated by blank lines) or JSONL with a 'text' field "
        "('label' too for minilm); default: docstrings of the installed Python stdlib",
    )
    p.add_argument("--eval-file", help="same format; default: every 10th train document")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps (default 100)")
    length.add_argument("--epochs", type=float, help="passes over the training set")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (constant)")
    p.add_argument("-r", "--lora-r", type=int, default=8, help="LoRA rank")
    p.add_argument("-a", "--lora-alpha", type=float, default=16.0, help="scaling = alpha / r")
    p.add_argument("-d", "--lora-dropout", type=float, default=0.0)
    p.add_argument(
        "--target-modules",
        type=_targets,
        help="comma-separated Linear names (default: every Linear but the output head)",
    )
    p.add_argument("--criterion", default="flops", help="runlora's planning criterion")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=("runlora", "peft"), default="runlora")
    p.add_argument(
        "--compare",
        action="store_true",
        help="train with both backends from identical weights and data order; plot both curves",
    )
    p.add_argument(
        "-o",
        "--output-dir",
        default="finetune_out",
        help="where the adapter(s), finetune_log.json and loss_curves.png go",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plot", action="store_true", help="with --compare: no loss_curves.png")
    return p


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


def run(args: argparse.Namespace) -> int:
    from ..planning.planner import CRITERIA
    from ..recipes import data
    from ..recipes.finetune import FinetuneOptions, finetune, summary_line

    require(["transformers", "peft"], "hf")
    if args.criterion not in CRITERIA:
        raise CliError(f"unknown --criterion {args.criterion!r}; known: {', '.join(CRITERIA)}")
    plot = (
        args.compare
        and not args.no_plot
        and optional(
            "matplotlib",
            "bench",
            command="finetune",
            skipped="loss_curves.png is not drawn (the adapters and the log are written)",
        )
    )
    try:
        options = FinetuneOptions(
            model=args.model,
            train_file=args.train_file,
            eval_file=args.eval_file,
            steps=args.steps,
            epochs=args.epochs,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            lr=args.lr,
            lora_r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            target_modules=args.target_modules,
            criterion=args.criterion,
            seed=args.seed,
            backend=args.backend,
            compare=args.compare,
            output_dir=args.output_dir,
            progress=not args.no_progress,
            plot=plot,
        )
    except ValueError as err:  # an option out of range
        raise CliError(str(err)) from err
    try:
        result = finetune(options)
    except data.DataError as err:
        raise CliError(str(err).strip().splitlines()[0]) from err

    print(result["task"].description)
    for backend, r in result["runs"].items():
        line = (
            f"{backend}: {len(r.loss)} steps in {sum(r.step_time_s):.1f} s, "
            f"eval loss {r.eval_loss_start:.4f} -> {r.eval_loss_end:.4f}"
        )
        if r.accuracy_start is not None:
            line += f", eval accuracy {_pct(r.accuracy_start)} -> {_pct(r.accuracy_end)}"
        print(f"{line}; adapter in {r.adapter_dir}")
    if result["summary"] is not None:
        print(summary_line(result["summary"]))
    print(f"log: {args.output_dir}/finetune_log.json")
    failed = [b for b, r in result["runs"].items() if not math.isfinite(r.loss[-1])]
    if failed:
        print(f"training diverged (non-finite loss) for: {', '.join(failed)}")
        return 1
    return 0
