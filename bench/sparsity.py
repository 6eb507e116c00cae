"""How much of DKM's soft-assignment map is exactly zero: the work a windowed pass could skip.

For every clustered layer of a preset's model, prepared as the trainer prepares it (the
k-means init, Fisher-weighted when the preset says so), this runs the DKM iterations on the
table of distinct values and looks at the final map ``a = softmax(-(v - C_{T-1})^2 / tau)``
(one row per distinct value of a LUT group, K centroids):

    zero_fraction   entries that are exactly 0 in fp32 (the exponent underflows)
    nonzero_per_row mean number of centroids a row puts mass on
    window          the fewest consecutive centroids, in sorted order, that hold every
                    non-zero entry of a row; max over the rows of a layer (``window_max``)
    K               centroids per LUT (each layer's own: ``dkm.layers`` may give some layers
                    other bits; the largest of a row's layers)

For scalar LUTs the logit ``-(v - c)^2 / tau`` is concave in ``c``, so a row's non-zero
entries are always consecutive in sorted centroid order: a pass that visits ``window_max``
centroids per row instead of K does K / window_max times less exp and softmax work with the
same values (the skipped entries are exact zeros). The table passes are bound by that work
(`python -m bench.step` profile). Measured rows are in bench/README.md.

    python -m bench.sparsity [--config PRESET] [--bits B] [--tau T] [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import defaultdict

import torch

from bench.harness import env_info, format_table, write_rows
from bench.step import DEFAULT_CONFIG, QUICK_OVERRIDES

log = logging.getLogger("bench.sparsity")
COLUMNS = ["layer", "layers", "rows", "zero_fraction", "nonzero_per_row", "window_mean", "window_max", "K"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="preset YAML (default: the 4-bit SmolLM2 one)")
    p.add_argument("--bits", type=int, help="override dkm.bits")
    p.add_argument("--tau", type=float, help="override dkm.tau")
    p.add_argument("--group-size", type=int, help="override dkm.group_size")
    p.add_argument("--quick", action="store_true", help="the tiny random LLaMA (CI smoke test)")
    p.add_argument("--out", help="append one JSON object per layer kind and one 'all' row to this file")
    return p.parse_args(argv)


def map_stats(values: torch.Tensor, counts: torch.Tensor, c_prev: torch.Tensor, tau: float) -> dict[str, torch.Tensor]:
    """Zero count, non-zeros and window of every real row of the map ``softmax(-(v - c_prev)^2 / tau)``.

    Args:
        values: (G, U, 1) table rows. counts: (G, U) multiplicities (0 = padding).
        c_prev: (G, K, 1) the centroids the final map is taken against. tau: Temperature.
    Returns:
        ``{"nonzero": (R,), "window": (R,)}`` int64 over the R rows with a count > 0.
    """
    if values.shape[-1] != 1:
        raise ValueError(f"map_stats takes scalar LUTs (d = 1), got d = {values.shape[-1]}")
    from edkm.functional.passes import _assign, _group_blocks

    c = c_prev.sort(dim=1).values  # (G, K, 1): sorted centroid order per group (d = 1)
    nz, win = [], []
    for b in _group_blocks(*values.shape[:2], c.shape[1], 1):
        a = _assign(values[b].unsqueeze(1), c[b], tau)[0].transpose(1, 2)  # the torch path's map, (b, U, K)
        live = a[counts[b] > 0] > 0  # (r, K) rows with points
        k = torch.arange(live.shape[1])
        first = torch.where(live, k, live.shape[1]).min(1).values
        last = torch.where(live, k, -1).max(1).values
        nz.append(live.sum(1))
        win.append(last - first + 1)
    return {"nonzero": torch.cat(nz), "window": torch.cat(win)}


def layer_kind(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``q_proj``."""
    return name.rsplit(".", 1)[-1]


def measure(config) -> list[dict]:
    """One row per layer kind and an ``all`` row for the preset's model (see the module docstring)."""
    from edkm import fisher_importance, prepare
    from edkm.functional import passes
    from edkm.functional.autograd import TORCH_OPS, _build
    from edkm.preparation import clustered_layers
    from edkm.train.data import load_model_and_windows

    model, windows = load_model_and_windows(config)
    n_imp = config.data.importance_windows
    importance = fisher_importance(model, windows.train[:n_imp], config.dkm) if n_imp else None
    prepare(model, config.dkm, importance=importance)
    kinds: dict[str, dict] = defaultdict(lambda: {"nonzero": [], "window": [], "layers": [], "entries": 0, "K": 0})
    with torch.no_grad():
        for name, module, p in clustered_layers(model):
            points = p.points(module.parametrizations.weight.original)
            table, _, mass = _build(TORCH_OPS, points, p._importance())  # as the forward builds and weighs it
            c_hist, _ = passes.table_iterate(table.values, mass, p.centroids, p.tau, config.dkm.max_iters)
            stats = map_stats(table.values, table.counts, c_hist[:, -2], p.tau)
            K = p.centroids.shape[1]  # the layer's own (dkm.layers may give it other bits)
            for kind in (layer_kind(name), "all"):
                kinds[kind]["nonzero"].append(stats["nonzero"])
                kinds[kind]["window"].append(stats["window"])
                kinds[kind]["layers"].append(name)
                kinds[kind]["entries"] += stats["nonzero"].numel() * K  # map entries of this layer's rows
                kinds[kind]["K"] = max(kinds[kind]["K"], K)
    rows = []
    for kind, s in sorted(kinds.items(), key=lambda kv: (kv[0] == "all", kv[0])):
        nz, win = torch.cat(s["nonzero"]).double(), torch.cat(s["window"]).double()
        rows.append({"layer": kind, "layers": len(s["layers"]), "rows": int(nz.numel()),
                     "zero_fraction": float(1 - nz.sum() / s["entries"]), "nonzero_per_row": float(nz.mean()),
                     "window_mean": float(win.mean()), "window_max": int(win.max()), "K": s["K"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the measurement, print the table, append the JSON rows to ``--out``."""
    from edkm.train.config import load_config

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    over = list(QUICK_OVERRIDES) if args.quick else []
    for flag, key in (("bits", "dkm.bits"), ("tau", "dkm.tau"), ("group_size", "dkm.group_size")):
        if getattr(args, flag) is not None:
            over.append(f"{key}={getattr(args, flag)}")
    config = load_config(args.config, over)
    if config.dkm.cluster_dim != 1:
        raise SystemExit(f"bench.sparsity measures scalar LUTs (dkm.cluster_dim=1), got {config.dkm.cluster_dim}")
    rows = measure(config)
    tags = {"bench": "sparsity", "config": args.config, "quick": args.quick, "bits": config.dkm.bits,
            "tau": config.dkm.tau, "granularity": config.dkm.granularity, "group_size": config.dkm.group_size,
            "max_iters": config.dkm.max_iters, "cluster_dtype": config.dkm.cluster_dtype,
            **env_info(torch.device("cpu"))}
    print(f"final DKM map of every clustered layer at init: {config.dkm.bits} bits, tau {config.dkm.tau:g}, "
          f"{config.dkm.granularity} (group {config.dkm.group_size}), {config.dkm.max_iters} iterations")
    print(format_table(rows, COLUMNS))
    if args.out:
        write_rows(args.out, [{**tags, **r} for r in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
