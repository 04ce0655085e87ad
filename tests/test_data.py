"""runlora.recipes.data: user files, the stdlib corpus, the package task, tokenizer and batching."""

from __future__ import annotations

import json

import pytest
import torch

from runlora.recipes import data


def test_byte_tokenizer_round_trips_any_text():
    tok = data.ByteTokenizer()
    text = "déjà vu — 日本語\n\tend"
    ids = tok.encode(text)
    assert max(ids) < 256 and tok.decode(ids) == text
    assert tok.decode([*ids, tok.eos_token_id, tok.pad_token_id]) == text
    assert tok.vocab_size == 259 > tok.pad_token_id > tok.eos_token_id > tok.bos_token_id


def test_plain_text_is_split_into_paragraphs(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("first paragraph\nstill first\n\n\n  second  \n   \nthird\n")
    assert data.read_texts(path) == ["first paragraph\nstill first", "second", "third"]
    path.write_text("no blank lines\nso one document\n  per line\n")
    assert data.read_texts(path) == ["no blank lines", "so one document", "per line"]


def test_jsonl_keeps_text_and_other_fields(tmp_path):
    path = tmp_path / "corpus.jsonl"
    rows = [{"text": "one", "label": "a"}, {"text": "two", "label": "b"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert data.read_records(path) == rows
    assert data.read_texts(path) == ["one", "two"]


@pytest.mark.parametrize(
    ("content", "suffix", "match"),
    [
        (None, ".txt", "train file not found"),
        ("", ".txt", "has no text"),
        ("  \n\n \t\n", ".txt", "has no text"),
        ('{"text": "  "}\n', ".jsonl", "has no text"),
        ('{"txt": "a"}\n', ".jsonl", 'line 1: needs a "text" string'),
        ('{"text": "a"}\n{broken\n', ".jsonl", "line 2: not JSON"),
    ],
)
def test_bad_files_are_one_clear_error(tmp_path, content, suffix, match):
    path = tmp_path / f"data{suffix}"
    if content is not None:
        path.write_text(content)
    with pytest.raises(data.DataError, match=match):
        data.read_records(path, what="train file")


def test_stdlib_corpus_is_deterministic_and_split_without_overlap():
    docs = data.stdlib_docstrings()
    assert len(docs) > 1000
    assert all(len(d.text) >= data.MIN_DOC_CHARS for d in docs)
    assert {"email", "asyncio", "json"} <= {d.package for d in docs}
    assert not {d.package for d in docs} & {"test", "idlelib", "antigravity"}
    assert data._docstrings_of(__file__) == [__doc__]  # ast, not import
    train, evaluation = data.default_texts()
    assert len(train) + len(evaluation) == len(docs)
    assert len(evaluation) == len(docs) // data.EVAL_EVERY
    assert evaluation[0] == docs[data.EVAL_EVERY - 1].text
    assert (train, evaluation) == data.default_texts()


def test_package_task_is_balanced_with_names_masked():
    task = data.package_task(n_classes=4, per_class=50)
    assert len(task.label_names) == 4 and task.label_names == sorted(task.label_names)
    for labels, per_class in ((task.train_labels, 40), (task.eval_labels, 10)):
        assert sorted(set(labels)) == [0, 1, 2, 3]
        assert all(labels.count(k) == per_class for k in range(4))
    for text, label in zip(task.train_texts, task.train_labels, strict=True):
        name = task.label_names[label]
        assert f" {name} " not in f" {text.lower()} "
    assert not set(task.train_texts) & set(task.eval_texts)


def test_records_task_maps_labels_and_rejects_unknown_ones():
    train = [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]
    task = data.records_task(train, [{"text": "c", "label": "y"}])
    assert (task.label_names, task.train_labels, task.eval_labels) == (["x", "y"], [0, 1], [1])
    with pytest.raises(data.DataError, match="not seen in training: z"):
        data.records_task(train, [{"text": "c", "label": "z"}])
    with pytest.raises(data.DataError, match='needs a "label"'):
        data.records_task([{"text": "a"}], train)


def test_lm_blocks_join_documents_with_eos_and_drop_the_tail():
    tok = data.ByteTokenizer()
    blocks = data.lm_blocks(["ab", "cde"], tok.encode, 3, tok.eos_token_id)  # the last eos: tail
    assert blocks.tolist() == [[97, 98, 257], [99, 100, 101]]
    with pytest.raises(data.DataError, match="fewer than one --seq-len 64"):
        data.lm_blocks(["short"], tok.encode, 64, tok.eos_token_id)


def test_batch_order_depends_on_the_seed_only():
    torch.manual_seed(1)
    first = data.batch_order(10, 3, 7, seed=5)
    torch.rand(100)  # other draws from the global RNG change nothing
    assert torch.equal(torch.stack(first), torch.stack(data.batch_order(10, 3, 7, seed=5)))
    assert not torch.equal(torch.stack(first), torch.stack(data.batch_order(10, 3, 7, seed=6)))
    assert len(first) == 7 and all(b.shape == (3,) for b in first)
    epoch = torch.cat(first[:3])  # 3 batches per epoch, no row twice within one
    assert len(set(epoch.tolist())) == 9
    with pytest.raises(data.DataError, match="fewer than one --batch-size 8"):
        data.batch_order(5, 8, 1, seed=0)
