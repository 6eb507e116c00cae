"""The ``edkm`` command line: a thin shell that builds configs and calls library functions.

    edkm train  --config configs/NAME.yaml [--output-dir DIR] [--max-steps N] [--resume] [k=v ...]
    edkm eval   --model PATH          perplexity on the held-out split
    edkm export --checkpoint DIR --out FILE [--format edkm|folder|coreml]
    edkm generate --model FILE|DIR --prompt TEXT [--max-new-tokens N] [--temperature T --top-k K --seed S]
    edkm lowrank --config configs/NAME.yaml --out DIR   (LoRD; train then clusters DIR)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("edkm")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``edkm`` console script; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if not args.quiet else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError, ImportError) as err:
        if args.debug:
            raise
        print(f"edkm: error: {err}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edkm", description="Train-time weight clustering (DKM) for LLaMA models.")
    p.add_argument("--quiet", action="store_true", help="Only warnings and errors from the library log.")
    p.add_argument("--debug", action="store_true", help="Show full tracebacks instead of one-line errors.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="Cluster a model with DKM while fine-tuning it, then evaluate and export.")
    t.add_argument("--config", help="YAML config (see configs/). Defaults to the built-in SmolLM2 4-bit setup.")
    t.add_argument("--output-dir", help="Run directory (overrides run.output_dir).")
    t.add_argument("--max-steps", type=int, help="Optimizer steps (overrides optim.max_steps).")
    t.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                   help="Continue from the run directory's latest checkpoint.")
    t.add_argument("--stop-after", type=int, help="Stop after this many steps in this process (testing resumes).")
    t.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. dkm.bits=3 optim.lr=1e-4")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="Perplexity of a model on the held-out split of the corpus.")
    e.add_argument("--model", required=True,
                   help="An edkm export (.edkm.safetensors), a local HF directory, a .gguf file, or 'smollm2'.")
    e.add_argument("--config", help="YAML config whose data section picks corpus and windows.")
    e.add_argument("--tokenizer", help="Tokenizer source for exports: 'smollm2', 'bytes', or an HF directory.")
    e.add_argument("overrides", nargs="*", help="section.key=value overrides for the data section.")
    e.set_defaults(func=_eval)

    lr = sub.add_parser("lowrank", help="LoRD: decompose a model's linear layers into low-rank factors and save it.")
    lr.add_argument("--config", required=True, help="YAML config with model, data and lowrank sections.")
    lr.add_argument("--out", required=True, help="Output directory; `edkm train ... model.source=DIR` clusters it.")
    lr.add_argument("--calib-windows", type=int, default=16, help="Training windows used as calibration data.")
    lr.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. lowrank.rank_reduction=0.25")
    lr.set_defaults(func=_lowrank)

    x = sub.add_parser("export", help="Write packed LUT indices + LUTs of a training checkpoint.")
    x.add_argument("--checkpoint", required=True, help="Run directory or one of its step-* checkpoint directories.")
    x.add_argument("--out", required=True, help="Output .edkm.safetensors file (folder: a directory; coreml: "
                   "a .mlpackage).")
    x.add_argument("--format", choices=("edkm", "folder", "coreml"), default="edkm",
                   help="edkm: packed safetensors; folder: save_pretrained-style folder with config and tokenizer; "
                   "coreml: stateful Core ML .mlpackage with the exact LUTs (needs the coreml extra). For coreml "
                   "--checkpoint may also be an .edkm.safetensors export or an edkm folder.")
    x.add_argument("--prefill-len", type=int, default=64, help="coreml: tokens per prefill call.")
    x.add_argument("--context", type=int, default=512, help="coreml: KV-cache length.")
    x.set_defaults(func=_export)

    g = sub.add_parser("generate", help="Generate text from an edkm export (streamed, tokens/s reported).")
    g.add_argument("--model", required=True,
                   help="An .edkm.safetensors export or an edkm folder (export --format folder).")
    g.add_argument("--prompt", required=True, help="Text to continue.")
    g.add_argument("--max-new-tokens", type=int, default=64, help="Most tokens to generate.")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sample from softmax(logits / T).")
    g.add_argument("--top-k", type=int, default=0, help="Sample only among the k most likely tokens (0: all).")
    g.add_argument("--seed", type=int, default=0, help="Sampling seed.")
    g.add_argument("--tokenizer",
                   help="'bytes', 'smollm2' or an HF directory (default: the folder's own, or by vocab).")
    g.set_defaults(func=_generate)
    return p


def _generate(args: argparse.Namespace) -> int:
    from edkm.deploy.folder import load_for_generation
    from edkm.deploy.generate import generate

    model, tokenizer = load_for_generation(args.model, args.tokenizer)
    print(args.prompt, end="", flush=True)
    g = generate(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed,
                 on_text=lambda piece: print(piece, end="", flush=True))
    print()
    print(f"[{len(g.ids)} tokens, prompt {g.prompt_tokens} tokens, prefill {g.prefill_s:.2f}s, "
          f"{g.tokens_per_s:.1f} tokens/s]", file=sys.stderr)
    return 0


def _train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from edkm.train.config import load_config
    from edkm.train.loop import train

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"run.output_dir={args.output_dir}")
    if args.max_steps is not None:
        overrides.append(f"optim.max_steps={args.max_steps}")
    config = load_config(args.config, overrides)
    main_rank = int(os.environ.get("RANK", "0")) == 0  # torchrun / accelerate launch: rank 0 reports
    bar = tqdm(total=config.optim.max_steps, desc="train", unit="step", dynamic_ncols=True, disable=not main_rank)

    def on_step(row: dict) -> None:
        if not main_rank:
            return
        bar.n = row["step"]
        bar.refresh()
        bar.write(f"step {row['step']:>5} loss {row['loss']:.4f} lr {row['lr']:.2e} tau {row['tau']:.1e} "
                  f"{row['step_s']:.2f}s/step {row['tokens_per_s']:.0f} tok/s "
                  f"peak {row['peak_mem_bytes'] / 2**30:.2f} GiB drift {row['centroid_drift']:.2e}")

    result = train(config, resume=args.resume, on_step=on_step, stop_after=args.stop_after)
    bar.close()
    if not main_rank:
        return 0
    if result.steps < config.optim.max_steps:
        print(f"stopped at step {result.steps}/{config.optim.max_steps}; checkpoint in {result.output_dir}")
        return 0
    print(f"perplexity before: {result.ppl_before:.3f}   after ({config.dkm.bits}-bit DKM): {result.ppl_after:.3f}")
    if result.export_path:
        s = result.sizes
        print(f"exported {result.export_path}: {s['file'] / 2**20:.1f} MiB "
              f"(fp16 model: {s['fp16'] / 2**20:.1f} MiB, {s['fp16'] / s['file']:.2f}x smaller)")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch

    from edkm.evaluate import perplexity
    from edkm.hub.models import load_llama, load_smollm2
    from edkm.hub.text import build_windows, load_corpus, split_corpus
    from edkm.train.config import load_config
    from edkm.hub.tokenizer import ByteTokenizer

    config = load_config(args.config, args.overrides)
    src = args.model
    if src.endswith(".safetensors"):
        from edkm.export import load_compressed

        model = load_compressed(src)
        tok_src = args.tokenizer or ("bytes" if model.config.vocab_size == 256 else "smollm2")
        if tok_src == "bytes":
            tokenizer = ByteTokenizer()
        elif tok_src == "smollm2":
            tokenizer = load_smollm2().tokenizer
        else:
            tokenizer = load_llama(tok_src).tokenizer
    elif src == "smollm2":
        model, tokenizer = load_smollm2()
    else:
        model, tokenizer = load_llama(src)
    d = config.data
    split = split_corpus(load_corpus(d.corpus, text_key=d.text_key), heldout_fraction=d.heldout_fraction)
    windows = build_windows(split, tokenizer, d.seq_len, max_train_windows=1,
                            max_heldout_windows=d.heldout_windows or None)
    with torch.no_grad():
        ppl = perplexity(model, windows.heldout)
    print(json.dumps({"model": src, "perplexity": ppl, "heldout_tokens": windows.heldout.numel()}))
    return 0


def _lowrank(args: argparse.Namespace) -> int:
    import dataclasses

    from edkm.lowrank import lowrank_model
    from edkm.lowrank.persist import save_lowrank
    from edkm.train.config import load_config
    from edkm.train.data import load_model_and_windows

    config = load_config(args.config, args.overrides)
    if config.lowrank is None:
        raise ValueError(f"{args.config} has no 'lowrank' section; add one or pass lowrank.rank_reduction=0.25")
    if args.calib_windows < 1:
        raise ValueError(f"--calib-windows must be >= 1, got {args.calib_windows}")
    model, windows = load_model_and_windows(config)
    calib = windows.train[: args.calib_windows]
    batches = [calib[i : i + config.optim.batch_size] for i in range(0, calib.shape[0], config.optim.batch_size)]
    report = lowrank_model(model, batches, config.lowrank)
    print(report.summary())
    out = save_lowrank(model, dataclasses.asdict(config.model), args.out)
    print(f"wrote {out}; cluster it with: edkm train --config {args.config} model.source={out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from edkm.train.checkpoint import latest_checkpoint, load_checkpoint
    from edkm.export import export_compressed
    from edkm.preparation import finalize, prepare
    from edkm.train.config import TrainConfig
    from edkm.train.data import load_model

    path = Path(args.checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if args.format == "coreml" and (path.is_file() or (path / "model.edkm.safetensors").is_file()):
        from edkm.deploy.formats import write_format
        from edkm.export import load_compressed

        print(write_format(load_compressed(path), None, "coreml", args.out, args.prefill_len, args.context))
        return 0
    ckpt = path if (path / "manifest.json").exists() else latest_checkpoint(path)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint found in {str(path)!r}")
    state, manifest = load_checkpoint(ckpt)
    config = TrainConfig.from_dict(manifest["meta"]["config"])
    model, tokenizer = load_model(config)
    prepare(model, config.dkm)
    model.load_state_dict(state["model"])
    finalize(model.eval())
    if args.format != "edkm":
        from edkm.deploy.formats import write_format

        print(write_format(model, tokenizer, args.format, args.out, args.prefill_len, args.context))
        return 0
    sizes = export_compressed(model, args.out)
    print(f"exported {args.out}: {sizes['file'] / 2**20:.2f} MiB (fp16 model {sizes['fp16'] / 2**20:.2f} MiB, "
          f"{sizes['fp16'] / sizes['file']:.2f}x smaller)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
