"""LoRA with runlora under Hugging Face ``Trainer``, gradient checkpointing on or off.

    python examples/train_trainer.py                      # checkpointing on
    python examples/train_trainer.py --no-checkpointing

``runlora.get_runlora_model`` returns PEFT's own ``PeftModel`` (its LoRA layers run runlora's
op), so ``Trainer`` treats it as PEFT's: checkpoints hold only the adapter, and
``trainer.train(resume_from_checkpoint=...)`` loads it back.

A tiny Llama (shipped config ``llama_tiny``, random weights) learns to model the docstrings of
the Python standard library, byte by byte; under a minute on a laptop CPU.
"""

import argparse

import torch
from transformers import Trainer, TrainingArguments

import runlora
from runlora.configs import build_model, load_config
from runlora.recipes import data


class Blocks(torch.utils.data.Dataset):
    """Rows of token ids; the model shifts the labels itself."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()

    tokenizer = data.ByteTokenizer()
    train_texts, eval_texts = data.default_texts()
    train = data.lm_blocks(train_texts, tokenizer.encode, 64, tokenizer.eos_token_id)
    evaluation = data.lm_blocks(eval_texts, tokenizer.encode, 64, tokenizer.eos_token_id)[:64]

    # Random weights of std 0.2, not 0.02: LoRA leaves the 64-wide output head frozen, and at the
    # usual scale its logits could barely move from uniform.
    model = build_model(load_config("llama_tiny", initializer_range=0.2), seed=0)  # vocab 512
    lora = runlora.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    model = runlora.get_runlora_model(model, lora)
    model.print_trainable_parameters()

    training_args = TrainingArguments(
        output_dir="trainer_out",
        max_steps=args.steps,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        logging_steps=10,
        gradient_checkpointing=not args.no_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        save_strategy="no",
        report_to="none",
        use_cpu=True,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=Blocks(train),
        eval_dataset=Blocks(evaluation),
    )
    print(f"eval loss before: {trainer.evaluate()['eval_loss']:.4f}")
    trainer.train()
    print(f"eval loss after:  {trainer.evaluate()['eval_loss']:.4f}")
    model.save_pretrained("trainer_out/adapter")  # PEFT's format: peft.PeftModel can load it


if __name__ == "__main__":
    main()
