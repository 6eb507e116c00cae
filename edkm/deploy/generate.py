"""Text generation from a (compressed) causal LM: greedy or sampled, streamed, timed.

`generate_ids` runs the model's own KV cache (``use_cache=True``): one forward over the
prompt (prefill), then one token per forward (decode), yielding each new id as it comes.
`generate` adds the tokenizer: it streams text pieces to a callback and returns the
text with token counts and tokens/s (decode only, prefill timed apart). With `LUTLinear`'s
decode cache the LUT layers decode their weights once, not once per token.

Sampling: ``temperature`` (a finite number) ``<= 0`` is greedy (argmax); otherwise softmax(logits / T),
restricted to the ``top_k`` most likely tokens when ``top_k > 0``, drawn from a
``torch.Generator`` seeded with ``seed`` (same seed, same text).
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from edkm._checks import check_int, is_finite_number

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generation:
    """What `generate` produced."""

    text: str  # the generated text only (prompt excluded)
    ids: list[int]  # generated token ids
    prompt_tokens: int
    prefill_s: float
    decode_s: float

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of decoding (the first token comes from prefill)."""
        steps = len(self.ids) - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")


def pick_next(logits: Tensor, temperature: float, top_k: int, generator: torch.Generator | None) -> int:
    """Choose the next token from (vocab,) logits.

    Args:
        logits: Last-position logits. temperature: <= 0 means greedy.
        top_k: Keep only the k largest logits (0 = all). generator: RNG for sampling.
    Returns:
        The token id.
    """
    if temperature <= 0:
        return int(logits.argmax())
    scores = logits.float() / temperature
    if 0 < top_k < scores.numel():
        kth = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate_ids(model: nn.Module, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
                 top_k: int = 0, seed: int | None = None, eos_token_id: int | None = None,
                 timings: dict[str, float] | None = None) -> Iterator[int]:
    """Yield new token ids one by one (prefill once, then one cached forward per token).

    Args:
        model: A causal LM taking ``input_ids`` / ``past_key_values`` (HF style).
        prompt_ids: The prompt, at least one id.
        max_new_tokens: Upper bound on generated tokens (>= 1).
        temperature, top_k, seed: Sampling (see the module header).
        eos_token_id: Stop after yielding this id.
        timings: Optional dict that receives ``prefill_s`` and ``decode_s`` (running totals).
    Yields:
        Token ids.
    """
    if not prompt_ids:
        raise ValueError("prompt_ids is empty: generation needs at least one prompt token")
    check_int("max_new_tokens", max_new_tokens)
    check_int("top_k", top_k, 0)
    if not is_finite_number(temperature):
        # NaN failed deep in torch.multinomial after the prefill; inf sampled uniformly
        raise ValueError(f"temperature must be a finite number (<= 0: greedy), got {temperature!r}")
    if model.training:
        log.warning("generating with a model in train mode: call model.eval() (LUT layers cache only in eval)")
    gen = None
    if temperature > 0:
        gen = torch.Generator(device="cpu")
        gen.manual_seed(0 if seed is None else seed)
    device = next(model.parameters()).device
    times = timings if timings is not None else {}
    times.update(prefill_s=0.0, decode_s=0.0)
    # transformers >= 5.2x names the KV cache ``cache``; earlier versions ``past_key_values``.
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    past = None
    for step in range(max_new_tokens):
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, **{key: past})
        past = getattr(out, key)
        token = pick_next(out.logits[0, -1].cpu(), temperature, top_k, gen)
        times["prefill_s" if step == 0 else "decode_s"] += time.perf_counter() - t0
        yield token
        if eos_token_id is not None and token == eos_token_id:
            return
        ids = torch.tensor([[token]], dtype=torch.long, device=device)


def generate(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int = 0, seed: int | None = None, on_text: Callable[[str], None] | None = None,
             stop_at_eos: bool = True) -> Generation:
    """Generate text after ``prompt``, streaming pieces to ``on_text`` as they are decoded.

    Args:
        model: A causal LM in eval mode (e.g. from `edkm.load_compressed`).
        tokenizer: Has ``encode(text)`` and ``decode(ids)`` (HF tokenizers, `ByteTokenizer`).
        prompt: Text to continue.
        max_new_tokens, temperature, top_k, seed: See `generate_ids`.
        on_text: Called with each new piece of text (multi-byte characters arrive whole).
        stop_at_eos: Stop at the tokenizer's ``eos_token_id`` when it has one.
    Returns:
        A `Generation`.
    """
    prompt_ids = list(tokenizer.encode(prompt))
    eos = getattr(tokenizer, "eos_token_id", None) if stop_at_eos else None
    timings: dict[str, float] = {}
    new: list[int] = []
    shown = ""
    for token in generate_ids(model, prompt_ids, max_new_tokens, temperature, top_k, seed, eos, timings):
        new.append(token)
        text = tokenizer.decode(new, skip_special_tokens=True)
        if on_text is not None and not text.endswith("\ufffd") and text.startswith(shown):
            on_text(text[len(shown):])  # a trailing U+FFFD is an unfinished multi-byte character
            shown = text
    text = tokenizer.decode(new, skip_special_tokens=True)
    if on_text is not None and text.startswith(shown) and len(text) > len(shown):
        on_text(text[len(shown):])
    return Generation(text, new, len(prompt_ids), timings["prefill_s"], timings["decode_s"])
