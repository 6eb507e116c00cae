"""A corpus file that is not UTF-8 text is an error naming the file."""

from __future__ import annotations

import pytest

from edkm.hub.text import load_corpus


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_binary_corpus_names_the_file(tmp_path, suffix):
    path = tmp_path / f"corpus{suffix}"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary")
    with pytest.raises(ValueError, match=f"corpus file '{path}' is not UTF-8 text"):
        load_corpus(str(path))
