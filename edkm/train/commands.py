"""What ``edkm eval``, ``edkm export`` and ``edkm lowrank`` do, as library functions.

The CLI parses arguments and calls these (``edkm train`` calls `edkm.train.loop.train`);
each returns what the CLI prints.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from edkm.train.checkpoint import best_checkpoint, latest_checkpoint, load_checkpoint, read_manifest
from edkm.train.config import ConfigError, TrainConfig
from edkm.train.data import heldout_windows, load_any_model, load_model, load_model_and_windows

log = logging.getLogger(__name__)

WHICH = ("best", "latest")


def evaluate_source(source: str, config: TrainConfig, tokenizer: str | None = None) -> dict[str, Any]:
    """Perplexity and fidelity to the float model of any model on every evaluation domain.

    Args:
        source: An edkm export, ``"smollm2"``, an HF directory or a .gguf file.
        config: Its ``data`` section picks corpus, window length, window count and
            ``eval_domains``; its ``model`` section names the float model the scores are
            relative to (the teacher: ``smollm2`` by default, ``tiny`` for tiny runs).
        tokenizer: Tokenizer of an export (see `edkm.train.data.load_any_model`).
    Returns:
        ``{"model", "perplexity", "heldout_tokens", "domains"}``: the perplexity on the
        corpus's held-out split exactly as the trainer scores it, and
        `edkm.train.domains.domain_report` per domain.
        Raises ``ValueError`` when the model and the float model's vocabularies differ.
    """
    from edkm.evaluate import perplexity
    from edkm.train.domains import domain_report, reference_domains

    model, tok = load_any_model(source, tokenizer)
    reference, _ = load_model(config)
    vocab = (model.get_output_embeddings().weight.shape[0], reference.get_output_embeddings().weight.shape[0])
    if vocab[0] != vocab[1]:
        raise ValueError(f"{source!r} has a {vocab[0]}-token vocabulary but the float model of model.source="
                         f"{config.model.source!r} has {vocab[1]}: pass the --config the model was trained with")
    windows = heldout_windows(config, tok)
    domains = reference_domains(reference, config, tok, heldout=windows)
    report = domain_report(model, reference, domains)
    with torch.no_grad():  # exactly the trainer's held-out score (fidelity sums the same NLL in another order)
        ppl = perplexity(model, windows)
    return {"model": source, "perplexity": ppl, "heldout_tokens": windows.numel(), "domains": report}


def pick_checkpoint(path: str | Path, which: str = "best") -> Path:
    """The checkpoint directory ``path`` names: itself if it is one, else the run
    directory's ``best`` (falling back to ``latest`` for runs without scores) or ``latest``.

    Raises:
        FileNotFoundError naming the path when there is none; ValueError for ``which``.
    """
    if which not in WHICH:
        raise ConfigError(f"which must be one of {WHICH}, got {which!r}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if (path / "manifest.json").exists():
        return path
    ckpt = best_checkpoint(path) if which == "best" else None
    if ckpt is None:
        if which == "best":
            log.info("%s has no scored checkpoint ('best'): taking 'latest'", path)
        ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint found in {str(path)!r} (no 'latest' file)")
    return ckpt


def export_checkpoint(path: str | Path, out: str | Path, which: str = "best", fmt: str = "edkm",
                      prefill_len: int = 64, context: int = 512) -> dict[str, Any]:
    """Finalize a training checkpoint and write its packed export.

    Args:
        path: A run directory or one of its ``step-*`` checkpoint directories.
        out: Output ``.edkm.safetensors`` file (its directory is created), or the folder /
            ``.mlpackage`` for the other formats.
        which: For a run directory: ``best`` (lowest held-out perplexity) or ``latest``.
        fmt: ``edkm`` (packed safetensors), ``folder`` (save_pretrained-style folder with
            config and tokenizer) or ``coreml`` (see `edkm.deploy.formats.write_format`).
        prefill_len, context: Core ML prefill length and KV-cache length.
    Returns:
        ``{"checkpoint", "step", "score", "score_by", "sizes", "out"}`` (``sizes`` for ``edkm``;
        ``summary`` for the other formats); ``score`` is the held-out score recorded
        with the checkpoint (None if it was not scored), ``score_by`` what it measures
        (``ppl`` or ``kl``, see ``run.best_by``).
    """
    if fmt not in ("edkm", "folder", "coreml"):
        raise ConfigError(f"export format must be edkm, folder or coreml, got {fmt!r}")
    from edkm.preparation import prepare
    from edkm.train.sharded import is_sharded_checkpoint, load_sharded_model
    from edkm.train.steps import export_model

    ckpt = pick_checkpoint(path, which)
    sharded = is_sharded_checkpoint(ckpt)  # an FSDP2 run's checkpoint: gathered here, in one process
    state, manifest = (None, read_manifest(ckpt)) if sharded else load_checkpoint(ckpt)
    config = TrainConfig.from_dict(manifest["meta"]["config"], source=f"{ckpt}/manifest.json")
    model, tokenizer = load_model(config)
    prepare(model, config.dkm)
    if sharded:
        load_sharded_model(ckpt, model)
    else:
        model.load_state_dict(state["model"])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"checkpoint": ckpt, "step": manifest["step"], "score": manifest.get("score"),
              "score_by": manifest.get("score_by", "ppl"), "out": out}
    if fmt != "edkm":
        from edkm.deploy.formats import write_format
        from edkm.preparation import finalize

        finalize(model.eval())
        return {**result, "summary": write_format(model, tokenizer, fmt, out, prefill_len, context)}
    return {**result, "sizes": export_model(model.eval(), out)}


def lowrank_run(config: TrainConfig, out: str | Path, calib_windows: int = 16) -> tuple[Any, Path]:
    """LoRD: decompose the model's linear layers on ``calib_windows`` training windows and
    save the result to ``out`` (``edkm train ... model.source=OUT`` clusters it).

    Returns:
        ``(report, saved directory)``.
    """
    from edkm.lowrank import lowrank_model
    from edkm.lowrank.persist import save_lowrank

    if config.lowrank is None:
        raise ConfigError("the config has no 'lowrank' section; add one or pass lowrank.rank_reduction=0.25")
    if calib_windows < 1:
        raise ConfigError(f"--calib-windows must be >= 1, got {calib_windows}")
    model, windows = load_model_and_windows(config)
    calib = windows.train[:calib_windows]
    bs = config.optim.batch_size
    report = lowrank_model(model, [calib[i : i + bs] for i in range(0, calib.shape[0], bs)], config.lowrank)
    return report, save_lowrank(model, dataclasses.asdict(config.model), out)
