"""Supervised fine-tuning with TRL's ``SFTTrainer``, its LoRA layers run by runlora.

    pip install 'runlora[trl]'
    python examples/train_sft.py

``runlora.patch_peft()`` is the only runlora line: TRL builds its PEFT model from
``peft_config=`` as always, and every LoRA layer PEFT creates runs runlora's op. The model stays
PEFT's own ``PeftModel``, so checkpoints hold only the adapter and it is saved in PEFT's format.

A tiny Llama (shipped config ``llama_tiny``, random weights) learns to model the docstrings of
the Python standard library, byte by byte; under a minute on a laptop CPU.
"""

import argparse

import peft
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

import runlora
from runlora.configs import build_model, load_config
from runlora.recipes import data


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer built in code, nothing downloaded: the 256 bytes, then <s>, </s>
    and <pad> (ids 256, 257, 258)."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<s>": 256, "</s>": 257, "<pad>": 258})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default="sft_out")
    args = parser.parse_args()

    runlora.patch_peft()  # from here on, PEFT's LoRA layers run runlora's op

    train_texts, eval_texts = data.default_texts()
    train = Dataset.from_dict({"text": train_texts})
    evaluation = Dataset.from_dict({"text": eval_texts[:64]})

    # Random weights of std 0.2, not 0.02: LoRA leaves the 64-wide output head frozen, and at the
    # usual scale its logits could barely move from uniform.
    model = build_model(load_config("llama_tiny", initializer_range=0.2), seed=0)  # vocab 512
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=args.out,
            max_steps=args.steps,
            per_device_train_batch_size=8,
            learning_rate=3e-3,
            max_length=64,
            logging_steps=10,
            bf16=False,  # TRL's default is bf16 mixed precision; this tiny model trains in fp32
            save_strategy="no",
            report_to="none",
        ),
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=byte_tokenizer(),
        peft_config=peft.LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
        ),
    )
    trainer.model.print_trainable_parameters()
    print(f"eval loss before: {trainer.evaluate()['eval_loss']:.4f}")
    trainer.train()
    print(f"eval loss after:  {trainer.evaluate()['eval_loss']:.4f}")
    runlora.describe(trainer.model)  # every LoRA layer, the engine that runs it and its plan
    trainer.save_model(f"{args.out}/adapter")  # PEFT's format: peft.PeftModel can load it


if __name__ == "__main__":
    main()
