"""Training data that needs no internet: user files, or a corpus read from the installed stdlib.

Three sources, all deterministic:

- user files: plain text (documents separated by blank lines) or JSONL with a ``"text"`` field
  (and a ``"label"`` field for classification);
- the default corpus: the docstrings of the Python standard library installed with this
  interpreter, parsed with ``ast`` (nothing is imported, nothing is copied into the repository),
  in sorted module order, split into train/eval by position;
- a sentence-level task built from it: which stdlib package does this docstring come from.

Causal LMs without a tokenizer of their own use :class:`ByteTokenizer` (256 bytes + 3 specials).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "DataError",
    "ByteTokenizer",
    "Docstring",
    "read_records",
    "read_texts",
    "stdlib_docstrings",
    "default_texts",
    "split_eval",
    "PackageTask",
    "package_task",
    "records_task",
    "lm_blocks",
    "batch_order",
]

#: One document in every EVAL_EVERY goes to the eval split.
EVAL_EVERY = 10
#: Docstrings shorter than this (characters) carry too little text to learn from.
MIN_DOC_CHARS = 40
#: Never parsed: test suites, demos, and modules whose text is not about the module.
_SKIP_MODULES = frozenset({"test", "idlelib", "lib2to3", "turtledemo", "this", "antigravity"})
_SKIP_DIRS = frozenset({"test", "tests", "__pycache__", "idle_test"})


class DataError(ValueError):
    """Training data that cannot be used; the message says what to fix."""


# --- tokenizer ------------------------------------------------------------------------------


class ByteTokenizer:
    """UTF-8 bytes as token ids 0-255, then ``bos`` 256, ``eos`` 257, ``pad`` 258.

    For causal LMs built from a config, which have no tokenizer: any text, no vocabulary file.
    The model's ``vocab_size`` must be at least :attr:`vocab_size` (259).
    """

    bos_token_id = 256
    eos_token_id = 257
    pad_token_id = 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


# --- user files -----------------------------------------------------------------------------


def _is_jsonl(path: Path, first_line: str) -> bool:
    return path.suffix.lower() in (".jsonl", ".ndjson") or first_line.lstrip().startswith("{")


def read_records(path: str | os.PathLike, *, what: str = "data file") -> list[dict]:
    """The records of a plain-text or JSONL file, as dicts with at least a ``"text"`` string.

    Plain text: one record per paragraph (blocks separated by blank lines), or per line when
    the file has no blank lines. JSONL: one JSON
    object per non-empty line, each with a ``"text"`` string; other fields are kept.

    Raises:
        DataError: the file is missing, unreadable, empty, or a JSONL line lacks ``"text"``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {what} {path}: {err}") from err
    lines = content.splitlines()
    first = next((line for line in lines if line.strip()), "")
    if _is_jsonl(path, first):
        records = []
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{what} {path}, line {lineno}: not JSON ({err.msg})") from err
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise DataError(f'{what} {path}, line {lineno}: needs a "text" string field')
            records.append(rec)
    else:
        paragraphs = [p.strip() for p in re.split(r"\n\s*\n", content) if p.strip()]
        if len(paragraphs) == 1:  # no blank lines: one document per line
            paragraphs = [line.strip() for line in lines if line.strip()]
        records = [{"text": p} for p in paragraphs]
    records = [r for r in records if r["text"].strip()]
    if not records:
        raise DataError(f"{what} {path} has no text")
    return records


def read_texts(path: str | os.PathLike, *, what: str = "data file") -> list[str]:
    """The texts of :func:`read_records`."""
    return [r["text"] for r in read_records(path, what=what)]


# --- the default corpus: stdlib docstrings -------------------------------------------------


@dataclass(frozen=True)
class Docstring:
    """One docstring of the installed standard library.

    Attributes:
        package: the top-level stdlib module or package it belongs to (``"email"``).
        text: the cleaned docstring (``inspect.cleandoc``).
    """

    package: str
    text: str


def _module_files(name: str) -> list[str]:
    """The .py files of a top-level stdlib module or package, sorted; [] for C modules."""
    try:
        spec = importlib.util.find_spec(name)  # a top-level name: finds, does not import
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    if spec.submodule_search_locations:
        files = []
        for location in sorted(spec.submodule_search_locations):
            for root, dirs, names in os.walk(location):
                dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
                files += [os.path.join(root, n) for n in sorted(names) if n.endswith(".py")]
        return files
    origin = spec.origin or ""
    return [origin] if origin.endswith(".py") else []


def _docstrings_of(path: str) -> list[str]:
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return []
    docs = []
    for node in ast.walk(tree):  # breadth first: a fixed order for a given file
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= MIN_DOC_CHARS:
                docs.append(doc)
    return docs


@functools.cache
def stdlib_docstrings() -> tuple[Docstring, ...]:
    """Every docstring of this interpreter's pure-Python standard library, in a fixed order.

    Modules in sorted name order (``sys.stdlib_module_names``, private and test modules left
    out), files in sorted path order, docstrings in ``ast.walk`` order. About 5,600 docstrings
    and 1.3 MB of text on CPython 3.11; parsed once per process (a few seconds).
    """
    docs = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in _SKIP_MODULES:
            continue
        for path in _module_files(name):
            docs += [Docstring(name, text) for text in _docstrings_of(path)]
    if not docs:
        raise DataError(
            "found no stdlib source to build the default corpus from; "
            "pass --train-file and --eval-file"
        )
    return tuple(docs)


def split_eval(items: list) -> tuple[list, list]:
    """(train, eval): every EVAL_EVERY-th item to eval, the rest to train, order kept."""
    train = [x for i, x in enumerate(items) if i % EVAL_EVERY != EVAL_EVERY - 1]
    evaluation = [x for i, x in enumerate(items) if i % EVAL_EVERY == EVAL_EVERY - 1]
    return train, evaluation


def default_texts() -> tuple[list[str], list[str]]:
    """The default corpus as (train texts, eval texts): stdlib docstrings, split 9:1."""
    return split_eval([d.text for d in stdlib_docstrings()])


# --- a sentence-level task: which package is this docstring from ---------------------------


@dataclass(frozen=True)
class PackageTask:
    """A text-classification data set: texts, integer labels, and the label names."""

    train_texts: list[str]
    train_labels: list[int]
    eval_texts: list[str]
    eval_labels: list[int]
    label_names: list[str]


def _mask_name(text: str, name: str) -> str:
    # The package's own name would give the answer away; the rest of its vocabulary may not.
    return re.sub(rf"\b{re.escape(name)}\b", "[name]", text, flags=re.IGNORECASE)


def package_task(n_classes: int = 8, per_class: int = 150) -> PackageTask:
    """Classify a stdlib docstring by the package it comes from.

    The ``n_classes`` packages with the most docstrings (ties by name), ``per_class`` docstrings
    of each (the first ones, in corpus order), so the classes are balanced and chance is
    ``1 / n_classes``. The package's own name is masked in its docstrings. Split 4:1 within each
    class, so both splits are balanced.
    """
    docs = stdlib_docstrings()
    counts = Counter(d.package for d in docs)
    ranked = sorted(counts, key=lambda p: (-counts[p], p))
    names = sorted(ranked[:n_classes])
    if len(names) < n_classes or counts[ranked[n_classes - 1]] < per_class:
        raise DataError(f"the stdlib corpus has too few docstrings for {n_classes} x {per_class}")
    train_texts, train_labels, eval_texts, eval_labels = [], [], [], []
    for label, name in enumerate(names):
        texts = [_mask_name(d.text, name) for d in docs if d.package == name][:per_class]
        for i, text in enumerate(texts):
            into = (eval_texts, eval_labels) if i % 5 == 4 else (train_texts, train_labels)
            into[0].append(text)
            into[1].append(label)
    return PackageTask(train_texts, train_labels, eval_texts, eval_labels, names)


def records_task(train: list[dict], evaluation: list[dict]) -> PackageTask:
    """A classification task from user JSONL records with ``"text"`` and ``"label"`` fields."""
    for split, records in (("train", train), ("eval", evaluation)):
        if any("label" not in r for r in records):
            raise DataError(f'every {split} record needs a "label" field for classification')
    names = sorted({str(r["label"]) for r in train})
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted({str(r["label"]) for r in evaluation} - set(names))
    if unknown:
        raise DataError(f"eval labels not seen in training: {', '.join(unknown[:5])}")
    if len(names) < 2:
        raise DataError("classification needs at least 2 distinct labels in the train file")
    return PackageTask(
        [r["text"] for r in train],
        [index[str(r["label"])] for r in train],
        [r["text"] for r in evaluation],
        [index[str(r["label"])] for r in evaluation],
        names,
    )


# --- batching -------------------------------------------------------------------------------


def lm_blocks(texts: list[str], encode, seq_len: int, eos_id: int) -> Tensor:
    """Token ids of all texts, each followed by ``eos_id``, cut into rows of ``seq_len``.

    Args:
        texts: documents, in order.
        encode: ``str -> list[int]``.
        seq_len: tokens per row.
        eos_id: the separator appended to every document.

    Returns:
        LongTensor of shape ``(n_blocks, seq_len)``; the incomplete tail is dropped.

    Raises:
        DataError: the texts hold fewer than ``seq_len`` tokens.
    """
    ids: list[int] = []
    for text in texts:
        ids += encode(text)
        ids.append(eos_id)
    n_blocks = len(ids) // seq_len
    if n_blocks == 0:
        raise DataError(f"the text holds {len(ids)} tokens, fewer than one --seq-len {seq_len}")
    return torch.tensor(ids[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


def batch_order(n_items: int, batch_size: int, steps: int, seed: int) -> list[Tensor]:
    """Row indices for ``steps`` batches: a fresh seeded permutation each epoch.

    Uses its own generator, so the order depends on ``seed`` only (not on what else draws
    random numbers), and two backends trained with the same seed see the same batches.
    A batch never spans two epochs; the last ``n_items % batch_size`` rows of each epoch's
    permutation are skipped.
    """
    if n_items < batch_size:
        raise DataError(f"{n_items} training examples, fewer than one --batch-size {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    per_epoch = n_items // batch_size
    order: list[Tensor] = []
    while len(order) < steps:
        perm = torch.randperm(n_items, generator=gen)
        order += list(perm[: per_epoch * batch_size].view(per_epoch, batch_size))
    return order[:steps]
