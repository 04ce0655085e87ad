"""runlora vs PEFT under FSDP2 (or DeepSpeed ZeRO-3) on CPU: per-rank step time and memory.

Each arm (runlora, PEFT) runs in its own fresh set of N processes over gloo, so peak RSS is the
arm's own. Every rank builds the same model (seed 0), adds LoRA adapters, shards it (FSDP2:
``fully_shard`` on each decoder layer and the root; ``--engine zero3``: ``deepspeed.initialize``
with ZeRO stage 3 and DeepSpeed's defaults otherwise) and trains on synthetic tokens with AdamW.
Per rank it reports:

- step ms: median forward + backward + optimizer step, the ranks aligned by a barrier;
- saved MiB: bytes autograd keeps for backward in one step (each storage once, parameters
  excluded, and so are FSDP2's all-gathered weights and the views autograd saves of them:
  ``runlora.bench.memory.saved_tensor_bytes``);
- peak RSS MiB: the process's high-water mark (``ru_maxrss``) at the end.

    python benchmarks/fsdp_bench.py --model llama_60m --nproc 2 --batch-size 4 --seq-len 256 \\
        --out benchmarks/results/fsdp_llama_60m.json
    python benchmarks/fsdp_bench.py --engine zero3 ...   # needs pip install deepspeed
    python benchmarks/fsdp_bench.py --repeats 3 ...      # alternate launches: steadier ratios

Ratios (runlora / PEFT) are printed per rank. Run nothing else on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import json
import os
import resource
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from runlora.bench.memory import saved_tensor_bytes
from runlora.integrations.distributed import shutdown

ARMS = ("runlora", "peft")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama_60m", help="shipped config name or config path")
    p.add_argument("--nproc", type=int, default=2, help="ranks (processes)")
    p.add_argument("--engine", choices=("fsdp2", "zero3"), default="fsdp2")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per rank and step")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("-r", "--lora-r", type=int, default=8)
    p.add_argument("--criterion", default="flops", help="runlora's planning criterion")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="launch the arms this many times, alternating; step ms is the median over all "
        "timed steps of all launches, and the per-launch ratios are printed",
    )
    p.add_argument("--timeout", type=float, default=1800, help="seconds per arm before giving up")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def build(arm: str, args: argparse.Namespace) -> torch.nn.Module:
    from runlora.configs import build_model, load_config

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    base = build_model(load_config(args.model), seed=0)
    kwargs = dict(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=targets)
    if arm == "runlora":
        from runlora import LoraConfig, get_runlora_model

        model = get_runlora_model(base, LoraConfig(criterion=args.criterion, **kwargs))
    else:
        import peft

        model = peft.get_peft_model(base, peft.LoraConfig(**kwargs))
    from peft.tuners.lora import LoraLayer

    from runlora.integrations.peft import is_accelerated

    # Both arms are PEFT's PeftModel; runlora's has every LoRA layer on runlora's op.
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers and all(is_accelerated(m) == (arm == "runlora") for m in layers), arm
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.get_base_model().enable_input_require_grads()
    return model


def worker(rank: int, arm: str, args: argparse.Namespace, port: int, out: str) -> None:
    faulthandler.enable()  # a rank that aborts (SIGABRT, seen rarely here) prints every stack
    torch.set_num_threads(args.threads)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=args.nproc,
        timeout=datetime.timedelta(minutes=10),
    )
    try:
        model = build(arm, args)
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=1e-4)
        if args.engine == "zero3":
            import deepspeed

            os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(args.nproc))
            config = {
                "train_micro_batch_size_per_gpu": args.batch_size,
                "zero_optimization": {"stage": 3},
                "zero_allow_untested_optimizer": True,
                "gradient_clipping": 0.0,
            }
            engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        else:
            from torch.distributed.fsdp import fully_shard

            for block in model.get_base_model().model.layers:
                fully_shard(block)
            fully_shard(model)
            engine = None
        if arm == "runlora":
            from runlora.integrations.distributed import sync_plans

            sync_plans(model, n_tokens=args.batch_size * args.seq_len)
        gen = torch.Generator().manual_seed(rank)
        vocab = model.get_base_model().config.vocab_size

        def step() -> None:
            ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=gen)
            if engine is not None:
                engine.backward(engine(input_ids=ids, labels=ids).loss)
                engine.step()
                return
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(args.warmup):
            step()
        times = []
        for _ in range(args.steps):
            dist.barrier()
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        saved, _ = saved_tensor_bytes(step, exclude_params_of=model)
        row = {
            "rank": rank,
            "step_ms": statistics.median(times),
            "step_ms_all": times,
            "saved_bytes": saved,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }
        rows: list = [None] * args.nproc
        dist.all_gather_object(rows, row)
        if rank == 0:
            Path(out).write_text(json.dumps(rows))
    except BaseException:
        dist.destroy_process_group()
        raise
    shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_arm(arm: str, args: argparse.Namespace) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, f"{arm}.json")
        context = mp.start_processes(
            worker,
            args=(arm, args, _free_port(), out),
            nprocs=args.nproc,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + args.timeout
        try:
            while not context.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{arm}: ranks still running after {args.timeout} s")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
        return json.loads(Path(out).read_text())


def _merge_launches(runs: list[list[dict]]) -> list[dict]:
    """One row per rank over several launches: median step over all their timed steps, the
    largest saved bytes and peak RSS, and each launch's own median."""
    merged = []
    for rank_rows in zip(*runs, strict=True):
        steps = [ms for row in rank_rows for ms in row["step_ms_all"]]
        merged.append(
            {
                "rank": rank_rows[0]["rank"],
                "step_ms": statistics.median(steps),
                "step_ms_all": steps,
                "step_ms_per_launch": [row["step_ms"] for row in rank_rows],
                "saved_bytes": max(row["saved_bytes"] for row in rank_rows),
                "peak_rss_bytes": max(row["peak_rss_bytes"] for row in rank_rows),
            }
        )
    return merged


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    launches: dict[str, list[list[dict]]] = {arm: [] for arm in args.arms}
    for _ in range(args.repeats):
        for arm in args.arms:
            launches[arm].append(run_arm(arm, args))
    results = {arm: _merge_launches(runs) for arm, runs in launches.items()}
    mib = 2**20
    print(
        f"{args.model}, {'FSDP2' if args.engine == 'fsdp2' else 'DeepSpeed ZeRO-3'} over gloo, "
        f"{args.nproc} ranks x {args.threads} threads, batch "
        f"{args.batch_size} x {args.seq_len} per rank, r={args.lora_r}, fp32"
        + (", gradient checkpointing" if args.gradient_checkpointing else "")
    )
    print(f"{'arm':<8} {'rank':>4} {'step ms':>9} {'saved MiB':>10} {'peak RSS MiB':>13}")
    for arm, rows in results.items():
        for row in rows:
            print(
                f"{arm:<8} {row['rank']:>4} {row['step_ms']:>9.1f} "
                f"{row['saved_bytes'] / mib:>10.1f} {row['peak_rss_bytes'] / mib:>13.1f}"
            )
    if set(ARMS) <= results.keys():
        for ours, theirs in zip(results["runlora"], results["peft"], strict=True):
            per_launch = [
                f"{a / b:.3f}"
                for a, b in zip(
                    ours["step_ms_per_launch"], theirs["step_ms_per_launch"], strict=True
                )
            ]
            print(
                f"rank {ours['rank']}: runlora / PEFT step time "
                f"{ours['step_ms'] / theirs['step_ms']:.3f} (per launch: {', '.join(per_launch)}),"
                f" saved bytes {ours['saved_bytes'] / max(1, theirs['saved_bytes']):.3f}, "
                f"peak RSS {ours['peak_rss_bytes'] / max(1, theirs['peak_rss_bytes']):.3f}"
            )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            json.dumps({"settings": vars(args), "results": results}, indent=1)
        )
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
