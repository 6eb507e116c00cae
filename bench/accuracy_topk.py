"""What storing only the teacher's top-k logits loses against full-vocabulary distillation.

For a clustered student (edkm's k-means init, finalized, ``--bits``, one LUT per
``--group-size`` rows of every decoder linear) and its float teacher, on held-out KJV
windows, per k:

    mass      mean teacher probability inside its top k (what the top-k loss sees)
    loss      `edkm.topk_distill_loss` with the teacher's top k, vs `edkm.distill_loss` (full)
    cosine    cosine between the top-k and the full loss's gradients w.r.t. the student's
              logits, over all positions (1 = the same training signal)

    python -m bench.accuracy_topk --ks 8,32,128,1024           # SmolLM2-135M, 4-bit
    python -m bench.accuracy_topk --model tiny --ks 4,16        # smoke test
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

# the repo root first, and not bench/ itself (bench/kernels.py would hide HF's kernels)
sys.path[:] = [str(Path(__file__).resolve().parents[1]),
               *(p for p in sys.path if p != str(Path(__file__).resolve().parent))]

import edkm  # noqa: E402
from bench.accuracy_peers import select_linears  # noqa: E402
from bench.harness import env_info, format_table, write_rows  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ks", default="8,32,128,1024", help="comma-separated top-k sizes (default 8,32,128,1024)")
    p.add_argument("--bits", type=int, default=4, help="student's index width (default 4)")
    p.add_argument("--group-size", type=int, default=16, help="output channels per LUT (default 16)")
    p.add_argument("--windows", type=int, default=8, help="held-out windows (default 8)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per window (default 128)")
    p.add_argument("--model", default="smollm2", choices=("smollm2", "tiny"), help="tiny: random 2-layer LLaMA")
    p.add_argument("--out", help="append the rows as JSON lines to this file")
    args = p.parse_args(argv)
    args.ks = [int(k) for k in args.ks.split(",")]
    if any(k < 1 for k in args.ks):
        p.error(f"--ks must be >= 1, got {args.ks}")
    for name in ("bits", "group_size", "windows", "seq_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def measure(student_logits: torch.Tensor, teacher_logits: torch.Tensor, ks: list[int]) -> list[dict]:
    """Rows of (k, mass, loss, full_loss, cosine) for (..., V) student / teacher logits."""
    s = student_logits.detach().float().requires_grad_(True)
    full = edkm.distill_loss(s, teacher_logits)
    (g_full,) = torch.autograd.grad(full, s)
    mass_all = F.softmax(teacher_logits.float(), -1)
    rows = []
    for k in ks:
        k = min(k, teacher_logits.shape[-1])
        values, ids = teacher_logits.topk(k, -1)
        loss = edkm.topk_distill_loss(s, values, ids)
        (g,) = torch.autograd.grad(loss, s)
        rows.append({"k": k, "mass": float(mass_all.gather(-1, ids).sum(-1).mean()), "loss": loss.item(),
                     "full_loss": full.item(), "cosine": F.cosine_similarity(g.flatten(), g_full.flatten(), 0).item()})
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    if args.model == "tiny":
        from edkm.hub.models import tiny_llama

        teacher = tiny_llama(hidden=64, layers=2)
        windows = torch.randint(0, 256, (args.windows, args.seq_len), generator=torch.Generator().manual_seed(0))
    else:
        from edkm.hub.models import load_smollm2
        from edkm.hub.text import build_windows, load_corpus, split_corpus

        teacher, tok = load_smollm2()
        windows = build_windows(split_corpus(load_corpus("kjv")), tok, args.seq_len, max_train_windows=1,
                                max_heldout_windows=args.windows).heldout
    import copy

    student = copy.deepcopy(teacher)
    names = select_linears(student)
    edkm.prepare(student, edkm.DKMConfig(bits=args.bits, granularity="per_grouped_channel",
                                         group_size=args.group_size, include=tuple(names), min_weight_numel=0))
    edkm.finalize(student)
    with torch.no_grad():
        s = student(input_ids=windows, use_cache=False).logits
        t = teacher(input_ids=windows, use_cache=False).logits
    rows = measure(s, t, args.ks)
    tags = {**env_info(torch.device("cpu")), "bench": "accuracy_topk", "model": args.model, "bits": args.bits,
            "group_size": args.group_size, "tokens": windows.numel()}
    if args.out:
        write_rows(args.out, [{**tags, **r} for r in rows])
    print(format_table(rows, ["k", "mass", "loss", "full_loss", "cosine"]))
    print(f"\nstudent: {args.model} k-means init, {args.bits}-bit, LUT per {args.group_size} rows; "
          f"{windows.numel()} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
