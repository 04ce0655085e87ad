"""LoRA with runlora in a plain PyTorch training loop.

    python examples/train_loop.py

``runlora.get_runlora_model`` is ``peft.get_peft_model`` with runlora's op in the LoRA layers:
the model is PEFT's own ``PeftModel``, and the adapter is saved in PEFT's format.

A tiny Llama (shipped config ``llama_tiny``, random weights) learns to model the docstrings of
the Python standard library, byte by byte; under a minute on a laptop CPU.
"""

import torch

import runlora
from runlora.configs import build_model, load_config
from runlora.recipes import data

STEPS, BATCH, SEQ_LEN = 60, 8, 64


@torch.no_grad()
def eval_loss(model, rows: torch.Tensor) -> float:
    model.eval()
    loss = model(input_ids=rows, labels=rows).loss.item()
    model.train()
    return loss


def main() -> None:
    tokenizer = data.ByteTokenizer()
    train_texts, eval_texts = data.default_texts()
    train = data.lm_blocks(train_texts, tokenizer.encode, SEQ_LEN, tokenizer.eos_token_id)
    evaluation = data.lm_blocks(eval_texts, tokenizer.encode, SEQ_LEN, tokenizer.eos_token_id)

    # Random weights of std 0.2, not 0.02: LoRA leaves the 64-wide output head frozen, and at the
    # usual scale its logits could barely move from uniform.
    model = build_model(load_config("llama_tiny", initializer_range=0.2), seed=0)  # vocab 512
    # Every linear layer of the blocks; "time" would plan each layer's order by measuring it.
    config = runlora.LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.05,
        criterion="flops",
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
    )
    model = runlora.get_runlora_model(model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)

    print(f"eval loss before: {eval_loss(model, evaluation[:32]):.4f}")
    for step, rows in enumerate(data.batch_order(len(train), BATCH, STEPS, seed=0), 1):
        batch = train[rows]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    print(f"eval loss after:  {eval_loss(model, evaluation[:32]):.4f}")
    runlora.describe(model)  # every LoRA layer, the engine that runs it and its plan
    model.save_pretrained("loop_out/adapter")


if __name__ == "__main__":
    main()
