"""A byte-level tokenizer for the tiny smoke-test model (no tokenizer files needed)."""

from __future__ import annotations

from typing import Any


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocab 256): enough for the tiny smoke-test model."""

    vocab_size = 256

    def __call__(self, text: str, **_: Any) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode("utf-8"))}

    def encode(self, text: str, **_: Any) -> list[int]:
        """The UTF-8 bytes of ``text`` as ids."""
        return list(text.encode("utf-8"))

    def decode(self, ids, **_: Any) -> str:
        """``ids`` back to text; bytes that are not valid UTF-8 become U+FFFD."""
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")
