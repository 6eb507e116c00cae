"""The ``edkm`` command line: a thin shell that builds configs and calls library functions.

    edkm train  --config configs/NAME.yaml [--output-dir DIR] [--max-steps N] [--resume] [k=v ...]
    edkm eval   --model PATH          perplexity, ratio to fp, KL, top-1 on each data.eval_domains text
    edkm export --checkpoint DIR --out FILE [--which best|latest] [--format edkm|folder|coreml]
    edkm generate --model FILE|DIR --prompt TEXT [--max-new-tokens N] [--temperature T --top-k K --seed S]
    edkm lowrank --config configs/NAME.yaml --out DIR   (LoRD; train then clusters DIR)

Exit codes: 0 done, 1 runtime error, 2 usage error (arguments, config), 130 interrupted;
errors print as one line ``edkm: error: ...`` unless ``--debug`` is given.
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
    """Entry point of the ``edkm`` console script.

    Returns:
        The exit code: 0 done, 1 runtime error, 2 usage error (bad arguments or config),
        130 interrupted. Errors print as one line ``edkm: error: ...`` (``--debug``:
        the traceback instead).
    """
    parser = _parser()
    args = parser.parse_args(argv)  # argparse itself exits 2 on bad arguments
    logging.basicConfig(level=logging.INFO if not args.quiet else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("edkm: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # the CLI boundary: every error becomes one line
        if args.debug:
            raise
        from edkm.train.config import ConfigError

        print(f"edkm: error: {_one_line(err)}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1


def _one_line(err: BaseException) -> str:
    """The error's message on one line; the type name too when it is not self-explaining."""
    msg = " ".join(str(err).split())
    if not msg or not isinstance(err, (ValueError, OSError, RuntimeError)):
        msg = f"{type(err).__name__}: {msg or '(no message)'} (run with --debug for the traceback)"
    return msg


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edkm", description="Train-time weight clustering (DKM) for LLaMA models.")
    p.add_argument("--quiet", action="store_true", help="Only warnings and errors from the library log.")
    p.add_argument("--debug", action="store_true", help="Show full tracebacks instead of one-line errors.")
    common = argparse.ArgumentParser(add_help=False)  # the same flags after the subcommand
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, parents=[common])

    t = add("train", "Cluster a model with DKM while fine-tuning it, then evaluate and export.")
    t.add_argument("--config", help="YAML config (see configs/). Defaults to the built-in SmolLM2 4-bit setup.")
    t.add_argument("--output-dir", help="Run directory (overrides run.output_dir).")
    t.add_argument("--max-steps", type=int, help="Optimizer steps (overrides optim.max_steps).")
    t.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                   help="Continue from the run directory's latest checkpoint.")
    t.add_argument("--stop-after", type=int, help="Stop after this many steps in this process (testing resumes).")
    t.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. dkm.bits=3 optim.lr=1e-4")
    t.set_defaults(func=_train)

    e = add("eval", "Perplexity, ratio to the float model, KL(teacher||student) and top-1 agreement of a model "
            "on every data.eval_domains text (default: the corpus's held-out split and out-of-domain wiki).")
    e.add_argument("--model", required=True,
                   help="An edkm export (.edkm.safetensors), a local HF directory, a .gguf file, or 'smollm2'.")
    e.add_argument("--config", help="YAML config whose data section picks corpus, windows and eval_domains, and "
                   "whose model section is the float model to compare with (default: SmolLM2).")
    e.add_argument("--tokenizer", help="Tokenizer source for exports: 'smollm2', 'bytes', or an HF directory.")
    e.add_argument("overrides", nargs="*", help="section.key=value overrides for the data section.")
    e.set_defaults(func=_eval)

    lr = add("lowrank", "LoRD: decompose a model's linear layers into low-rank factors and save it.")
    lr.add_argument("--config", required=True, help="YAML config with model, data and lowrank sections.")
    lr.add_argument("--out", required=True, help="Output directory; `edkm train ... model.source=DIR` clusters it.")
    lr.add_argument("--calib-windows", type=int, default=16, help="Training windows used as calibration data.")
    lr.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. lowrank.rank_reduction=0.25")
    lr.set_defaults(func=_lowrank)

    x = add("export", "Write packed LUT indices + LUTs of a training checkpoint.")
    x.add_argument("--checkpoint", required=True, help="Run directory or one of its step-* checkpoint directories.")
    x.add_argument("--out", required=True,
                   help="Output .edkm.safetensors file (its directory is created); folder: a directory; "
                   "coreml: a .mlpackage.")
    x.add_argument("--which", choices=("best", "latest"), default="best",
                   help="For a run directory: the best scored checkpoint (default; run.best_by: held-out KL "
                        "for kd runs, KL + ce_weight x NLL for kd+ce, perplexity for ce) or the latest one.")
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
                  f"peak {row['peak_mem_bytes'] / 2**30:.2f} GiB drift {row['centroid_drift']:.2e}"
                  + (f" held-out ppl {row['heldout_ppl']:.3f}" if "heldout_ppl" in row else "")
                  + (f" KL {row['heldout_kl']:.4f}" if "heldout_kl" in row else "")
                  + "".join(f" | {name} x{d['ppl_ratio']:.3f} KL {d['kl']:.3f} top-1 {d['top1_agreement']:.3f}"
                            for name, d in row.get("domains", {}).items()))

    try:
        result = train(config, resume=args.resume, on_step=on_step, stop_after=args.stop_after)
    finally:
        bar.close()
    if not main_rank:
        return 0
    if result.steps < config.optim.max_steps:
        print(f"stopped at step {result.steps}/{config.optim.max_steps}; checkpoint in {result.output_dir}")
        return 0
    widths = f"{config.dkm.bits}-bit DKM" + (", other widths per dkm.layers" if config.dkm.layers else "")
    print(f"perplexity before: {result.ppl_before:.3f}   after ({widths}): {result.ppl_after:.3f}")
    from edkm.train.domains import format_report

    for line in format_report(result.domains):
        print(f"  {line}")
    if result.rollbacks:
        print(f"the run rolled back {result.rollbacks} time(s) after divergence (see metrics.jsonl)")
    if result.export_path:
        s = result.sizes
        if result.export_step != result.steps:
            print(f"the final model (step {result.steps}) scored worse on held-out text than step "
                  f"{result.export_step}: exporting step {result.export_step}, the best checkpoint")
        print(f"exported step {result.export_step} to {result.export_path}: {s['file'] / 2**20:.1f} MiB "
              f"(fp16 model: {s['fp16'] / 2**20:.1f} MiB, {s['fp16'] / s['file']:.2f}x smaller)")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from edkm.train.commands import evaluate_source
    from edkm.train.config import load_config

    print(json.dumps(evaluate_source(args.model, load_config(args.config, args.overrides), args.tokenizer)))
    return 0


def _lowrank(args: argparse.Namespace) -> int:
    from edkm.train.commands import lowrank_run
    from edkm.train.config import load_config

    report, out = lowrank_run(load_config(args.config, args.overrides), args.out, args.calib_windows)
    print(report.summary())
    print(f"wrote {out}; cluster it with: edkm train --config {args.config} model.source={out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from edkm.train.commands import export_checkpoint

    path = Path(args.checkpoint)
    if args.format == "coreml" and (path.is_file() or (path / "model.edkm.safetensors").is_file()):
        from edkm.deploy.formats import write_format
        from edkm.export import load_compressed

        print(write_format(load_compressed(path), None, "coreml", args.out, args.prefill_len, args.context))
        return 0
    r = export_checkpoint(args.checkpoint, args.out, args.which, fmt=args.format, prefill_len=args.prefill_len,
                          context=args.context)
    score = "not scored" if r["score"] is None else f"held-out {r['score_by']} {r['score']:.4g}"
    if args.format != "edkm":
        print(f"exported step {r['step']} ({score}) from {r['checkpoint']}: {r['summary']}")
        return 0
    s = r["sizes"]
    print(f"exported step {r['step']} ({score}) from {r['checkpoint']} to {r['out']}: {s['file'] / 2**20:.2f} MiB "
          f"(fp16 model {s['fp16'] / 2**20:.2f} MiB, {s['fp16'] / s['file']:.2f}x smaller)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
