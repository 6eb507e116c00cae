"""Memory plan for a whole LLaMA-2-7B DKM fine-tune, built from `bench.scale`'s per-layer rows.

Model: 32 decoder layers like the measured one, untied input embedding and LM head
(32,000 x 4,096 each) and a final norm; one 1 x 512 sequence per GPU. Terms per GPU:

- measured (per layer, this run): ``A`` = bytes a layer's forward leaves alive for
  backward (``held_after_forward``: saved activations plus, under DKM, the soft weight
  ``F.linear`` saves and DKM's own saved state), and ``T`` = the extra transient peak of
  one layer's backward over ``A`` and the layer's own weight gradient;
- counted (exact): parameter counts ``P_layer`` (measured layer), ``P`` (whole model),
  bytes per parameter by dtype (fp32 masters 4, fp32 gradients 4, AdamW 8, 8-bit AdamW 2,
  bf16 importance 2), logits ``3 x 512 x 32,000 x 4`` bytes (logits, log-softmax, grad);
- scaled: ``32 x A`` (every layer's forward state is alive at the start of backward),
  and FSDP2's transient unsharded parameters (two layers in flight with prefetch, plus one
  layer's unsharded gradient before its reduce-scatter, plus the root's embeddings).

A CPU-measured ``A`` is an upper bound for CUDA: CPU attention saves more than flash
attention. `bench.gpu_suite` measures the same layer on CUDA. Activation checkpointing is
left out on purpose: `DKMWeight` updates its centroids in the forward, so recomputing a
layer in backward would apply the update twice (not supported yet).
"""

from __future__ import annotations

LAYERS = 32
VOCAB = 32000
GIB = 2**30
GPU_BYTES = 80 * 10**9  # an "80 GB" card (A100 / H100 80GB), decimal


def _row(rows: list[dict], case: str) -> dict | None:
    return next((r for r in rows if r.get("case") == case and "error" not in r), None)


def memory_plan(rows: list[dict], dims: dict, scaled_from_quick: bool = False) -> list[dict]:
    """Plan rows (one per setup) from the per-layer rows of `bench.scale`.

    Args:
        rows: `bench.scale` rows; needs the ``plain`` row and at least one DKM row.
        dims: The measured layer's ``hidden`` / ``seq`` (the plan scales to 32 layers).
        scaled_from_quick: The rows come from tiny shapes (CI): the plan is shape-only.
    Returns:
        Dicts with ``setup``, ``per_gpu_gib``, ``host_gib``, ``fits_80gb``, ``terms``
        (GiB per term), ``measured`` and ``scaled`` (which terms are which); [] when the
        needed rows are missing.
    """
    plain = _row(rows, "plain")
    dkm_rows = [r for r in (_row(rows, "per_tensor"), _row(rows, "per_grouped_channel")) if r]
    if plain is None or not dkm_rows:
        return []
    dkm = max(dkm_rows, key=lambda r: r["held_after_forward"])  # the costlier granularity
    p_layer, hidden = plain["n_params"], dims["hidden"]
    p_embed = 2 * VOCAB * hidden
    p_total = LAYERS * p_layer + p_embed + hidden
    logits = 3 * dims["seq"] * VOCAB * 4

    def per_layer(r: dict) -> tuple[int, int]:
        held = r["held_after_forward"]
        return held, max(0, r["peak_backward"] - held - 4 * p_layer)

    a_plain, t_plain = per_layer(plain)
    a_dkm, t_dkm = per_layer(dkm)
    label = f"DKM {dkm['bits']}-bit {dkm['case']}"
    measured = f"A, T of one layer ({label}; {plain.get('memory_method')})"
    plain_measured = f"A, T of one plain layer ({plain.get('memory_method')})"
    plan = []

    def add(setup: str, terms: dict, host: dict | None = None, scaled: str = "32 x A") -> None:
        gpu = sum(terms.values())
        all_terms = {**terms, **{f"host {k}": v for k, v in (host or {}).items()}}
        plan.append({"setup": setup, "per_gpu_gib": gpu / GIB, "fits_80gb": gpu <= GPU_BYTES,
                     "host_gib": None if host is None else sum(host.values()) / GIB,
                     "terms": {k: v / GIB for k, v in all_terms.items()},
                     "measured": measured if "DKM" in setup else plain_measured,
                     "scaled": scaled, "shape_only": scaled_from_quick})

    act = lambda a, t: {"32 x A": LAYERS * a, "T": t, "logits": logits}  # noqa: E731
    add("1 GPU, plain layer, fp32 AdamW", {"params+grads+AdamW 16P": 16 * p_total, **act(a_plain, t_plain)})
    add(f"1 GPU, {label}, fp32 AdamW", {"params+grads+AdamW 16P": 16 * p_total, **act(a_dkm, t_dkm)})
    add(f"1 GPU, {label}, 8-bit AdamW (bitsandbytes, 2 B/param)",
        {"params+grads 8P": 8 * p_total, "AdamW8bit 2P": 2 * p_total, **act(a_dkm, t_dkm)})
    in_flight = {"2 unsharded layers 8P_layer": 8 * p_layer, "1 layer's unsharded grad 4P_layer": 4 * p_layer,
                 "root embeddings+grads 8P_embed": 8 * p_embed}
    add(f"1 GPU, {label}, FSDP2 CPUOffloadPolicy", {**in_flight, **act(a_dkm, t_dkm)},
        host={"params+grads+AdamW 16P": 16 * p_total, "importance 2P (optional)": 2 * p_total},
        scaled="32 x A; FSDP2 in-flight layers (2 prefetched)")
    for world in (8,):
        sharded = {f"params+grads+AdamW 16P/{world}": 16 * p_total // world,
                   f"importance 2P/{world} (optional)": 2 * p_total // world}
        add(f"{world} GPUs, {label}, FSDP2 (DKM on the gathered weight)", {**sharded, **in_flight, **act(a_dkm, t_dkm)},
            scaled=f"32 x A (replicated on every rank); 16P / {world}; FSDP2 in-flight layers")
    return plan
