"""LoRA fine-tuning with runlora under ``accelerate launch`` (DDP, FSDP2 or DeepSpeed ZeRO-2/3).

Synthetic next-token data on a shipped Llama config, so it runs anywhere::

    accelerate launch --config_file examples/accelerate_configs/fsdp2.yaml \\
        examples/accelerate_train.py --model llama_60m --steps 5 --out out/adapter   # GPUs
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 \\
        examples/accelerate_train.py --model llama_tiny --steps 5 --out out/adapter  # CPU, DDP

(accelerate 1.15 turns FSDP and DeepSpeed on only with GPUs or other accelerators.)

The model is PEFT's own ``PeftModel`` (``get_runlora_model`` runs its LoRA layers on runlora's
op). What runlora adds to a plain accelerate loop: ``sync_plans`` after ``prepare`` (rank 0
plans, every rank runs the same plans), ``save_adapter`` at the end (the adapter tensors are
gathered from the shards, which PEFT's ``save_pretrained`` does not do under FSDP2; rank 0
writes one PEFT-format adapter), and ``shutdown`` before ``end_training`` (a barrier first:
gloo can abort a rank whose group is destroyed under it).
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from torch.distributed.elastic.multiprocessing.errors import record

from runlora import LoraConfig, get_runlora_model
from runlora.configs import build_model, load_config
from runlora.integrations.distributed import save_adapter, shutdown, sync_plans


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama_tiny", help="shipped config name or config path")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=2, help="sequences per rank and step")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("-r", "--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16)
    p.add_argument("--criterion", default="flops", help="flops, roofline or time")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--out", default=None, help="directory for the PEFT-format adapter")
    return p.parse_args()


@record  # under torchrun / accelerate launch, a failing rank's traceback is reported
def main() -> None:
    args = parse_args()
    accelerator = Accelerator()
    config = load_config(args.model)
    model = get_runlora_model(
        build_model(config, seed=0),
        LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            criterion=args.criterion,
            target_modules="all-linear",
        ),
    )
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    if accelerator.state.deepspeed_plugin is not None:  # no DataLoader to take them from
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = args.batch_size
        ds_config["train_batch_size"] = args.batch_size * accelerator.num_processes
    model, optimizer = accelerator.prepare(model, optimizer)

    compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
        accelerator.mixed_precision, torch.float32
    )
    plans = sync_plans(model, n_tokens=args.batch_size * args.seq_len, dtype=compute_dtype)
    accelerator.print(
        f"{len(plans)} plans shared by {accelerator.num_processes} ranks: "
        + ", ".join(sorted({f"{p.forward}/{p.backward}" for p in plans.values()}))
    )

    gen = torch.Generator().manual_seed(1000 + accelerator.process_index)
    model.train()
    for step in range(args.steps):
        ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), generator=gen)
        ids = ids.to(accelerator.device)
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        accelerator.print(f"step {step}: loss {loss.item():.4f} (rank 0)")

    if args.out:
        accelerator.wait_for_everyone()
        save_adapter(model, args.out)
        accelerator.print(f"wrote {args.out}")
    shutdown()  # every rank done communicating before the process group goes
    accelerator.end_training()


if __name__ == "__main__":
    main()
