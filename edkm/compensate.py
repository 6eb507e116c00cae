"""Error-compensated LUT assignment at init (GPTQ's column sweep, with the LUTs as the grid).

Rounding every weight to its nearest centroid ignores that a layer's inputs are correlated:
the output error of a weight error ``D`` is ``tr(D H D^T)`` with ``H = E[x x^T]`` the
second moment of the layer's inputs, not ``|D|^2``. `compensate` rounds one input column
at a time (columns with the largest ``H_jj`` first) and folds each column's rounding error
into the columns not yet rounded through the inverse Hessian (the optimal-brain-surgeon
update of GPTQ, Frantar et al. 2022), so later columns cancel what earlier ones lost. The
grid is each row's own LUT (the centroids `edkm.prepare` fitted), not a uniform one: each
master weight is set to the centroid it is rounded to, so the hard (eval / export) weights
of the layer are the compensated ones from step 0, and DKM training starts from there.

The text matters: measured on SmolLM2-135M (4 bits, LUT per 4 rows, Fisher-weighted
k-means, hard weights, no training; trainer's 16 windows per domain, commit eb83c7a), plain
rounding gives Wikipedia 1.308x fp (KL 0.374) and KJV 1.421x (KL 0.476). Compensating with
the Hessians of 32 KJV windows: KJV 1.244x (KL 0.254) but Wikipedia 1.343x (KL 0.369), it
fits the calibration text; with 128 windows sampled from the float model
(`edkm.hub.teacher_text`): Wikipedia 1.212x (KL 0.237) and KJV 1.244x (KL 0.305).

    hessians = edkm.input_hessians(model, windows)          # the float model, before prepare
    edkm.prepare(model, config, importance=imp)
    edkm.compensate(model, hessians)

Layers that read one input (q / k / v, gate / up) are stacked into one sweep, and groups of
equal shapes (the decoder blocks) run as one batch: one Python loop over the columns for all.

Limits: ``nn.Linear`` layers with ``cluster_dim`` 1 (the default); clustered embeddings and
the LM head tied to them are left as they are (their "input" is a one-hot token). A layer
missing from ``hessians`` is an error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor, nn

from edkm._checks import check_int, check_number
from edkm.config import DKMConfig
from edkm.functional.packing import nearest
from edkm.layers import DKMWeight, clustered_layers
from edkm.lowrank.calibrate import collect_input_stats
from edkm.preparation import selected_layers

log = logging.getLogger(__name__)

__all__ = ["Compensation", "compensate", "compensate_weight", "input_hessians"]

BLOCK = 128  # columns per lazy-update block (GPTQ's batching; the result does not depend on it)
SWEEP_BYTES = 1 << 29  # layers of equal shape swept in one batch up to ~512 MB of Hessian factors


def input_hessians(model: nn.Module, windows: Tensor, config: DKMConfig | None = None,
                   batch_size: int = 4) -> dict[str, Tensor]:
    """``E[x x^T]`` of the inputs of every ``nn.Linear`` that `edkm.prepare` would cluster.

    Args:
        model: A Hugging Face causal LM (``model(input_ids=...)``), not yet prepared.
        windows: (n, L) int64 token windows of calibration text (never the evaluation text).
        config: Which layers (as `prepare`); None takes every ``nn.Linear``.
        batch_size: Windows per forward pass.
    Returns:
        ``{module name: (in, in) float32}`` (each batch's product in float32, summed in
        float64); layers that read the same
        input tensor (q / k / v, gate / up) share one matrix object. Memory: one matrix per
        distinct input, 0.4 GB for SmolLM2-135M's 30 blocks (~22 GB for LLaMA-7B's 32).
    """
    if windows.ndim != 2 or windows.shape[0] == 0:
        raise ValueError(f"windows must be (n >= 1, L) token ids, got shape {tuple(windows.shape)}")
    check_int("batch_size", batch_size)
    layers = ([(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)] if config is None
              else [(n, m) for n, m in selected_layers(model, config) if isinstance(m, nn.Linear)])
    if not layers:
        raise ValueError("input_hessians: no nn.Linear layer selected")
    batches = [windows[i: i + batch_size] for i in range(0, windows.shape[0], batch_size)]
    stats = collect_input_stats(model, batches, [n for n, _ in layers], product_dtype=torch.float32,
                                stop_early=True)  # the LM head over the vocabulary need not run
    matrices = {leader: m.matrix().float() for leader, m in stats.moments.items()}  # summed in fp64
    log.info("input Hessians of %d layers (%d distinct inputs) from %d windows (%d tokens)", len(layers),
             len(matrices), windows.shape[0], windows.numel())
    return {name: matrices[group[0]] for group in stats.groups for name in group}


@dataclass
class Compensation:
    """What `compensate` did to one layer.

    Attributes:
        nearest_error: ``tr(D H D^T) / tr(W H W^T)`` for plain nearest-centroid rounding.
        error: The same for the compensated assignment.
    """

    nearest_error: float
    error: float


def compensate_weight(weight: Tensor, lut: Tensor, hessian: Tensor, damp: float = 0.01,
                      act_order: bool = True, round_dtype: torch.dtype | None = None) -> Tensor:
    """The error-compensated rounding of one (out, in) weight to per-row LUT values.

    Args:
        weight: (out, in) weight.
        lut: (out, K) the values row r may take (its LUT group's centroids).
        hessian: (in, in) symmetric positive semi-definite input second moment.
        damp: Added to the diagonal, as a fraction of its mean (GPTQ's percdamp), so the
            inverse exists for inputs that never vary.
        act_order: Round the columns with the largest ``H_jj`` first (else left to right).
        round_dtype: Cast each column to this dtype before choosing its nearest value (the
            layer's ``cluster_dtype``, as its hard forward does); None: as it is.
    Returns:
        (out, in) float32 weight whose every entry is an entry of its row of ``lut``
        (nearest ties go to the lower LUT index).
    """
    out, n = weight.shape
    if lut.dim() != 2 or lut.shape[0] != out:
        raise ValueError(f"lut must be (out={out}, K), got shape {tuple(lut.shape)}")
    if tuple(hessian.shape) != (n, n):
        raise ValueError(f"hessian must be ({n}, {n}) for a weight of shape {tuple(weight.shape)}, got "
                         f"{tuple(hessian.shape)}")
    check_number("damp", damp, inclusive=True)
    H = hessian.detach().double()
    if not torch.isfinite(H).all():
        raise ValueError("hessian contains NaN or Inf")
    return _sweep(weight.detach().float()[None], lut.detach().float()[None], H[None], damp, act_order, round_dtype)[0]


def _sweep(W: Tensor, C: Tensor, H: Tensor, damp: float, act_order: bool,
           round_dtype: torch.dtype | None) -> Tensor:
    """`compensate_weight` of B independent problems at once: W (B, out, n), C (B, out, K),
    H (B, n, n) float64 -> (B, out, n). One Python loop over the columns serves all B."""
    B, out, n = W.shape
    W, H = W.clone(), H.clone()
    diag = H.diagonal(dim1=1, dim2=2)  # a view: writes go to H
    dead = diag <= 0  # an input that is always 0: its column cannot matter
    diag.masked_fill_(dead, 1.0)
    W.masked_fill_(dead[:, None, :], 0.0)
    perm = (torch.argsort(diag, dim=1, descending=True, stable=True) if act_order
            else torch.arange(n, device=W.device).expand(B, n))
    W = W.gather(2, perm[:, None, :].expand(B, out, n))
    H = H.gather(1, perm[:, :, None].expand(B, n, n)).gather(2, perm[:, None, :].expand(B, n, n))
    diag = H.diagonal(dim1=1, dim2=2)
    diag.add_(damp * diag.mean(1, keepdim=True))
    U = _inverse_factor(H, damp).float().contiguous()
    # Columns as contiguous rows: Wt[:, j] is input column j of every output row.
    Wt = W.transpose(1, 2).contiguous()
    Qt = torch.empty_like(Wt)
    use_c = _c_sweep_applies(Wt, C, round_dtype)
    Ct = C.transpose(1, 2).contiguous() if use_c else None  # (B, K, out): row r's LUT in Ct[b, :, r]
    for b0 in range(0, n, BLOCK):
        b1 = min(b0 + BLOCK, n)
        if use_c:  # _block in C, the same fp32 operations (tests/test_compensate.py)
            from edkm import ckernels

            E = ckernels.c_obs_block(Wt, U, Ct, Qt, b0, b1, round_dtype is torch.bfloat16)
        else:
            E = _block(Wt[:, b0:b1], U[:, b0:b1, b0:b1], C, Qt[:, b0:b1], round_dtype)
        Wt[:, b1:] -= U[:, b0:b1, b1:].transpose(1, 2) @ E
    Q = Qt.transpose(1, 2)
    return Q.gather(2, torch.argsort(perm, dim=1)[:, None, :].expand(B, out, n))


def _block(Wb: Tensor, Ub: Tensor, C: Tensor, Qb: Tensor, round_dtype: torch.dtype | None) -> Tensor:
    """One lazy block of the sweep in torch: Wb (B, bs, out) the block's columns (updated),
    Ub (B, bs, bs) its part of the factor, C (B, out, K), Qb (B, bs, out) receives the chosen
    values. Returns the (B, bs, out) errors ``(w - q) / U_jj``."""
    E = torch.empty_like(Wb)
    for j in range(Wb.shape[1]):
        w = Wb[:, j]  # (B, out)
        key = w if round_dtype is None else w.to(round_dtype).float()
        q = C.gather(2, (key[:, :, None] - C).abs().min(2, keepdim=True).indices)[:, :, 0]  # first minimum
        Qb[:, j] = q
        e = (w - q) / Ub[:, j, j, None]
        Wb[:, j + 1:] -= Ub[:, j, j + 1:, None] * e[:, None, :]
        E[:, j] = e
    return E


def _c_sweep_applies(Wt: Tensor, C: Tensor, round_dtype: torch.dtype | None) -> bool:
    """Whether `edkm.ckernels.c_obs_block` runs the sweep: CPU, rounding as is or to bf16,
    at most 256 LUT entries, and the C kernels built."""
    if Wt.device.type != "cpu" or round_dtype not in (None, torch.bfloat16) or C.shape[2] > 256:
        return False
    from edkm import ckernels

    return ckernels.available()


def _inverse_factor(H: Tensor, damp: float) -> Tensor:
    """The upper Cholesky factor U of H^-1 (U^T U = H^-1), (B, n, n), from one Cholesky and
    one triangular inverse: with J the reversal, J H J = L L^T gives H^-1 = M^T M for the
    upper triangular M = J L^-1 J (GPTQ's Cholesky of the explicit inverse costs twice as much)."""
    flipped = H.flip(1, 2)
    L, info = torch.linalg.cholesky_ex(flipped)
    if bool((info != 0).any()):
        raise ValueError(f"hessian is not positive definite after damp={damp}; raise damp "
                         f"(leading minor {int(info[info != 0][0])} of the reversed matrix)")
    eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device).expand_as(H)
    return torch.linalg.solve_triangular(L, eye, upper=False).flip(1, 2)


def _plain_rounding(param: DKMWeight, weight: Tensor) -> Tensor:
    """``weight`` rounded as the layer's hard forward rounds it (nearest centroid of its points)."""
    c = param.centroids[:, :, 0]  # (G, K)
    return c.gather(1, nearest(param.points(weight), param.centroids)).reshape(weight.shape)


@torch.no_grad()
def compensate(model: nn.Module, hessians: Mapping[str, Tensor], damp: float = 0.01,
               act_order: bool = True) -> dict[str, Compensation]:
    """Re-round every clustered ``nn.Linear`` of a prepared model with `compensate_weight`.

    Each layer's master weight (``parametrizations.weight.original``) becomes its
    compensated rounding: every entry a centroid of its LUT group, so its hard weight is
    that value. Centroids, importance and tau are unchanged. Call it after `edkm.prepare`
    and before training.

    Args:
        model: A model `edkm.prepare` clustered.
        hessians: `input_hessians` of the same model before `prepare` (keys: module names).
        damp, act_order: As `compensate_weight`.
    Returns:
        ``{layer name: Compensation}`` of every layer compensated. Raises ``ValueError``
        when the model has no clustered layer, a clustered linear has no Hessian, or a
        layer has ``cluster_dim`` > 1.
    """
    check_number("damp", damp, inclusive=True)
    layers = list(clustered_layers(model))
    if not layers:
        raise ValueError("compensate takes a model edkm.prepare clustered; it has no clustered layer")
    tied = {id(p) for _, m, p in layers if isinstance(m, nn.Embedding)}
    groups: dict[int, list[tuple[str, nn.Module, DKMWeight]]] = {}  # layers reading one input: one sweep
    seen: set[int] = set()
    for name, module, param in layers:
        if not isinstance(module, nn.Linear) or id(param) in tied or id(param) in seen:
            continue  # embeddings and an LM head tied to one: no input Hessian
        seen.add(id(param))
        if param.config.cluster_dim != 1:
            raise ValueError(f"compensate: layer {name!r} has cluster_dim={param.config.cluster_dim}; only 1 is "
                             "supported")
        H = hessians.get(name)
        if H is None:
            raise ValueError(f"compensate: no Hessian for the clustered layer {name!r} (hessians has "
                             f"{len(hessians)} layers, e.g. {list(hessians)[:3]})")
        groups.setdefault(id(H), []).append((name, module, param))
    jobs = [job for members in groups.values() for job in _group_jobs(members, hessians[members[0][0]])]
    buckets: dict[tuple, list[_Job]] = {}  # equal shapes (the decoder blocks): swept together
    for job in jobs:
        buckets.setdefault((tuple(job.W.shape), job.lut.shape[1], job.cast, job.W.device), []).append(job)
    done: dict[str, Compensation] = {}
    for bucket in buckets.values():
        n = bucket[0].W.shape[1]
        per = max(1, SWEEP_BYTES // (n * n * 12))  # the float64 Hessians and float32 factors of a batch
        for i in range(0, len(bucket), per):
            chunk = bucket[i: i + per]
            Q = _sweep(torch.stack([j.W for j in chunk]), torch.stack([j.lut for j in chunk]),
                       torch.stack([j.H.double() for j in chunk]), damp, act_order, chunk[0].cast)
            for job, q in zip(chunk, Q):
                done.update(_apply(job, q))
    if done:
        gain = sorted(c.error / c.nearest_error for c in done.values() if c.nearest_error > 0)
        log.info("compensated %d layers: output error / nearest rounding's, median %.3f (min %.3f, max %.3f)",
                 len(done), gain[len(gain) // 2], gain[0], gain[-1])
    return done


@dataclass
class _Job:
    """One sweep: the stacked rows of layers that read one input (rows do not interact, so
    the result is each layer's own sweep)."""

    members: list[tuple[str, Tensor, DKMWeight]]  # (name, master weight, its parametrization)
    W: Tensor  # (rows, in) float32
    lut: Tensor  # (rows, K) padded to one width
    H: Tensor  # (in, in)
    cast: torch.dtype | None


def _group_jobs(members: list[tuple[str, nn.Module, DKMWeight]], H: Tensor) -> list[_Job]:
    casts = {p.config.cluster_dtype for _, _, p in members}
    if len(casts) > 1:  # layers of one input clustered in other dtypes: one sweep each
        return [job for m in members for job in _group_jobs([m], H)]
    cast = None if casts == {"weight"} else getattr(torch, casts.pop())
    rows = [(name, module.parametrizations.weight.original, param) for name, module, param in members]
    luts = [p.centroids[:, :, 0].float().repeat_interleave(m.shape[0] // p.groups, dim=0)  # (out, K): row r's
            for _, m, p in rows]
    width = max(lut.shape[1] for lut in luts)  # other bits: repeat the last entry (the same values)
    padded = [torch.cat([lut, lut[:, -1:].expand(-1, width - lut.shape[1])], 1) for lut in luts]
    W = torch.cat([m.detach().float() for _, m, _ in rows])
    return [_Job(rows, W, torch.cat(padded), H.to(W.device), cast)]


def _apply(job: _Job, Q: Tensor) -> dict[str, Compensation]:
    """Write a sweep's result into its layers' master weights; each layer's errors."""
    H32, out, start = job.H.float(), {}, 0
    for name, master, param in job.members:
        w, q = job.W[start: start + master.shape[0]], Q[start: start + master.shape[0]]
        start += master.shape[0]
        scale = (w @ H32 * w).sum().double().clamp_min(1e-300)

        def err(rounded: Tensor) -> float:  # tr(D H D^T) / tr(W H W^T)
            D = rounded - w
            return float((D @ H32 * D).sum().double() / scale)

        out[name] = Compensation(nearest_error=err(_plain_rounding(param, w)), error=err(q))
        master.copy_(q.to(master.dtype))
    return out
