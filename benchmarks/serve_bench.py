"""Serving many adapters over one base: a batch whose examples each name their own adapter.

One base model (a shipped config, random weights), K LoRA adapters (random A and B, rank r, on
every linear layer of the blocks), a batch of B examples whose ``adapter_names`` cycle through
the K adapters and ``"__base__"``. Under ``torch.no_grad``, in eval mode: a forward over B × S
tokens (prefill), one forward over B × 1 (a decoding step without a KV cache, so every call is
a new batch), and ``generate`` (B prompts of P tokens, greedy, with KV cache). Arms, interleaved
round-robin:

- base: the model without adapters (the floor);
- peft: ``peft_model(input_ids, adapter_names=names)`` (PEFT's mixed-batch forward);
- runlora: ``runlora_model(input_ids, adapter_names=names)``: the same ``PeftModel`` API, its LoRA
  layers switched to runlora's op (``get_runlora_model``), whose mixed batch runs the base
  product once and each adapter's term on its rows;
- peft one / runlora one: every example with the same adapter (``set_adapter``), for scale.

PEFT and runlora hold the same adapter tensors; the script checks that their logits (and
generated tokens) agree before it times anything. Prints ms per call, × base and runlora's
speedup over PEFT; --out writes JSON.

    python benchmarks/serve_bench.py --model llama_60m --adapters 4 -r 8 --batch-size 16 \\
        --seq-len 128 --out benchmarks/results/serve_llama_60m.json
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
from pathlib import Path

import peft
import torch

from runlora import LoraConfig, get_runlora_model
from runlora.bench.harness import interleave
from runlora.bench.report import environment
from runlora.configs import build_model, load_config
from runlora.integrations.peft import is_accelerated

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama_60m", help="shipped config name or config path")
    p.add_argument("--adapters", type=int, default=4, help="K adapters over the base")
    p.add_argument("-r", "--lora-r", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16, help="examples per batch")
    p.add_argument("--seq-len", type=int, default=128, help="prefill tokens per example")
    p.add_argument("--prompt-len", type=int, default=32, help="generate: prompt tokens")
    p.add_argument("--new-tokens", type=int, default=16, help="generate: tokens to generate")
    p.add_argument("--min-run-time", type=float, default=10.0, help="seconds per arm and shape")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: as is)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def build(args):
    """(base model, PEFT model, runlora model, adapter names), adapters equal in both."""
    # Frozen like the adapted models' bases: torch's matmul folds a non-contiguous 3-D input
    # (the LM head's last-position slice in generate) into one GEMM only when the weight
    # requires grad, so a base with trainable weights would run a faster LM head than both.
    base = build_model(load_config(args.model), seed=0).eval().requires_grad_(False)
    names = [f"task{k}" for k in range(args.adapters)]
    kwargs = dict(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=TARGETS)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs), names[0])
    ours = get_runlora_model(copy.deepcopy(base), LoraConfig(**kwargs), names[0])
    for name in names[1:]:  # PeftModel.add_adapter for both (runlora's layers keep their op)
        theirs.add_adapter(name, peft.LoraConfig(**kwargs))
        ours.add_adapter(name, peft.LoraConfig(**kwargs))
    layers = [m for m in ours.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert layers and all(is_accelerated(m) for m in layers), "a LoRA layer runs PEFT's forward"
    assert all(set(m.lora_A) == set(names) for m in layers)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        state = theirs.state_dict()
        for key, value in state.items():
            if ".lora_" in key:  # B is zero at init: give every adapter a real effect
                value.copy_(torch.randn(value.shape, generator=gen) * 0.05)
        ours.load_state_dict(state)
    return base, theirs.eval(), ours.eval(), names


def _caller(label: str, ids: torch.Tensor, args: argparse.Namespace):
    """``run(model, adapter_names or None)`` for one shape: a forward, or greedy ``generate``
    with the KV cache."""

    def forward(model, names):
        return model(input_ids=ids) if names is None else model(input_ids=ids, adapter_names=names)

    def generate(model, names):
        kwargs = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
        if names is not None:
            kwargs["adapter_names"] = names
        return model.generate(input_ids=ids, use_cache=True, **kwargs)

    return generate if label == "generate" else forward


def arms(run, base, theirs, ours, mixed) -> dict:
    """The timed arms: the base model; PEFT and runlora on the mixed batch (``mixed``: one
    adapter name per example); each with one adapter for the whole batch ("one")."""
    return {
        "base": functools.partial(run, base, None),
        "peft": functools.partial(run, theirs, mixed),
        "runlora": functools.partial(run, ours, mixed),
        "peft one": functools.partial(run, theirs, None),
        "runlora one": functools.partial(run, ours, None),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base, theirs, ours, names = build(args)
    vocab = base.config.vocab_size
    mixed = [(names + ["__base__"])[i % (len(names) + 1)] for i in range(args.batch_size)]
    gen = torch.Generator().manual_seed(2)
    results = {}
    shapes = (("prefill", args.seq_len), ("decode", 1), ("generate", args.prompt_len))
    for label, seq in shapes:
        ids = torch.randint(0, vocab, (args.batch_size, seq), generator=gen)
        run = _caller(label, ids, args)
        with torch.no_grad():
            if label == "generate":  # greedy: the same tokens from every arm
                err = float((run(ours, mixed) != run(theirs, mixed)).sum())
            else:
                err = (run(ours, mixed).logits - run(theirs, mixed).logits).abs().max().item()
        steps = arms(run, base, theirs, ours, mixed)
        with torch.no_grad():
            times = interleave(steps, min_run_time=args.min_run_time, desc=label, progress=True)
        ms = {arm: statistics.median(t) * 1e3 for arm, t in times.items()}
        results[label] = {
            "tokens": args.batch_size * seq,
            "ms": ms,
            "ms_all": {arm: [x * 1e3 for x in t] for arm, t in times.items()},
            "max_abs_logit_diff_vs_peft": err,
        }
        what = (
            f"{args.new_tokens} new tokens each, greedy; tokens differing from PEFT's: {err:.0f}"
            if label == "generate"
            else f"runlora vs PEFT logits differ by at most {err:.2e}"
        )
        print(
            f"\n{label}: {args.batch_size} x {seq} tokens, {len(names)} adapters + base, "
            f"r={args.lora_r}; {what}"
        )
        print(f"  {'arm':<12} {'ms':>9} {'x base':>8} {'speedup vs PEFT':>16}")
        for arm, value in ms.items():
            peer = {"runlora": "peft", "runlora one": "peft one"}.get(arm)
            speedup = f"{(ms[peer] - value) / ms[peer] * 100:+.1f} %" if peer else "-"
            print(f"  {arm:<12} {value:>9.2f} {value / ms['base']:>8.3f} {speedup:>16}")
    if args.out:
        doc = {"settings": vars(args), "env": environment("cpu"), "results": results}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
