"""Activation-aware low-rank factorisation of a linear weight: the math, no modules.

A layer ``y = W x + b`` with W (out, in) becomes ``y = B (A x) + b`` with B (out, r) and
A (r, in). For calibration inputs X (n, in) with second moment ``S = X^T X / n`` the output
error of a replacement ``W'`` is

    E(W') = ||X (W - W')^T||_F^2 / n = tr((W - W') S (W - W')^T) = ||(W - W') L||_F^2

for any L with ``S = L L^T``. So the best rank-r ``W'`` is the truncated SVD of ``M = W L``
mapped back (Eckart-Young in the S metric):

    W L = U diag(s) V^T,    B = U_r diag(s_r),    A = V_r^T L^{-1},    E = sum_{i>r} s_i^2

Plain SVD of W is the special case ``S = I``. ``A`` is one triangular solve against
``L^T``, never an explicit inverse; everything runs in float64 (see `factorize` for how
the SVD is taken).

Damping: the factorisation uses ``S_d = S + damping * mean(diag S) * I`` (relative, like
GPTQ's ``percdamp``). It keeps L well conditioned and pulls directions the calibration set
never excites toward the plain-SVD answer, so A does not blow up along them. L is the
Cholesky factor of ``S_d``; if that fails (damping 0 and rank-deficient inputs) L comes
from ``eigh`` with eigenvalues clamped at ``1e-12 * max``.

Parity: factors hold ``r * (out + in)`` weights against ``out * in`` dense, so they save
parameters only for ``r < out * in / (out + in)``; a rank at or beyond that point is an
error unless explicitly allowed (then a warning).

Limits: one S per layer (or per group of layers reading the same input), from inputs of
the dense model; the error is measured on calibration data, not held-out data.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from edkm._checks import check_number

__all__ = [
    "DEFAULT_DAMPING",
    "Factorization",
    "SecondMoment",
    "check_rank",
    "factorize",
    "output_error_terms",
    "parity_rank",
    "relative_output_error",
]

# Relative damping of S. Measured on SmolLM2-135M (bench/lowrank.py --quick --eval-windows 12
# --dampings ..., 2,048 calibration tokens, 25% of the MLP weights removed, held-out
# perplexity, dense 31.8): 149.2 / 150.1 / 148.7 / 149.5 / 153.5 at 0 / 1e-4 / 1e-3 / 1e-2 / 1e-1.
# Flat up to 1e-2, so 1e-2: free insurance for rank-deficient S (fewer tokens than inputs).
DEFAULT_DAMPING = 1e-2
_EIG_FLOOR = 1e-12  # eigenvalue clamp (relative to the largest) of the eigh fallback


@dataclass
class SecondMoment:
    """Running ``sum x x^T`` over calibration inputs, in float64.

    Attributes:
        sum: (in, in) float64 sum of outer products of the input rows.
        count: Number of input rows summed.
    """

    sum: Tensor
    count: int = 0

    @classmethod
    def zeros(cls, in_features: int, device: torch.device | str | None = None) -> "SecondMoment":
        """An empty accumulator for ``in_features``-dimensional inputs."""
        return cls(torch.zeros(in_features, in_features, dtype=torch.float64, device=device), 0)

    @classmethod
    def from_inputs(cls, inputs: Tensor) -> "SecondMoment":
        """Second moment of ``inputs`` (..., in): every leading index is one input row."""
        if inputs.dim() == 0 or inputs.shape[-1] == 0:
            raise ValueError(f"inputs must be (..., in) with in >= 1, got shape {tuple(inputs.shape)}")
        moment = cls.zeros(inputs.shape[-1], inputs.device)
        moment.add(inputs)
        return moment

    @property
    def in_features(self) -> int:
        """Input dimension."""
        return self.sum.shape[0]

    def add(self, inputs: Tensor, product_dtype: torch.dtype = torch.float64) -> None:
        """Accumulate ``inputs`` (..., in) in place; ``product_dtype`` is the dtype of this
        batch's ``x^T x`` (float32 is several times faster on a CPU; the sum stays float64)."""
        x = inputs.detach().reshape(-1, inputs.shape[-1]).to(product_dtype)  # (n, in)
        if x.shape[1] != self.in_features:
            raise ValueError(f"inputs have {x.shape[1]} features, the accumulator expects {self.in_features}")
        if not torch.isfinite(x).all():
            raise ValueError(f"calibration inputs of shape {tuple(inputs.shape)} contain NaN or Inf")
        if product_dtype == torch.float64:
            self.sum.addmm_(x.T, x)
        else:
            self.sum += x.T @ x
        self.count += x.shape[0]

    def matrix(self) -> Tensor:
        """``S = sum x x^T / count``, (in, in) float64."""
        if self.count == 0:
            raise ValueError("second moment of zero input rows; the layer saw no calibration inputs")
        return self.sum / self.count


def parity_rank(out_features: int, in_features: int) -> float:
    """Rank at which two factors hold as many weights as the dense matrix: ``out*in/(out+in)``."""
    return out_features * in_features / (out_features + in_features)


def check_rank(
    rank: int, out_features: int, in_features: int, *, name: str = "layer", allow_beyond_parity: bool = False
) -> None:
    """Validate ``rank`` for an (out, in) weight; errors name the rank, the shape and the limit.

    Args:
        rank: Requested rank.
        out_features: Rows of the (possibly stacked) weight.
        in_features: Columns of the weight.
        name: Layer name for messages.
        allow_beyond_parity: Warn instead of raising when the rank saves no parameters.
    Raises:
        ValueError: Rank not an integer in ``[1, min(out, in)]``, or (unless allowed) at
            or beyond the parity point.
    """
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise ValueError(f"rank for {name} must be an integer, got {rank!r}")
    full = min(out_features, in_features)
    if not 1 <= rank <= full:
        raise ValueError(
            f"rank for {name} ({out_features}x{in_features}) must be in [1, min(out, in)={full}], got {rank}"
        )
    parity = parity_rank(out_features, in_features)
    if rank * (out_features + in_features) >= out_features * in_features:
        msg = (
            f"rank {rank} for {name} ({out_features}x{in_features}) is at or beyond the parity point "
            f"r = {out_features}*{in_features}/({out_features}+{in_features}) = {parity:.2f}: the factors "
            f"hold {rank * (out_features + in_features)} weights vs {out_features * in_features} dense"
        )
        if not allow_beyond_parity:
            raise ValueError(msg + "; use a lower rank or allow_beyond_parity=True")
        warnings.warn(msg, stacklevel=3)


@dataclass
class Factorization:
    """Full-rank factorisation ``W = B A`` in the S metric, directions by decreasing energy.

    Attributes:
        b: (out, k) columns ``U diag(s)`` (k = min(out, in)), float64.
        s: (k,) singular values of ``W L``, descending; ``s_i^2`` is the output energy of
            direction i on the calibration inputs (damped metric).
        a: (k, in) rows ``V^T L^{-1}`` (plain SVD: ``V^T``), float64.
        activation_aware: Whether S was used (False: plain SVD, S = I).
        damping: Relative damping that was added to S.
    """

    b: Tensor
    s: Tensor
    a: Tensor
    activation_aware: bool
    damping: float

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the factorised weight."""
        return self.b.shape[0], self.a.shape[1]

    def factors(self, rank: int) -> tuple[Tensor, Tensor]:
        """Rank-``rank`` factors ``(B (out, r), A (r, in))`` in float64, ``W ~ B @ A``."""
        if not 1 <= rank <= self.s.numel():
            raise ValueError(f"rank must be in [1, {self.s.numel()}], got {rank}")
        return self.b[:, :rank], self.a[:rank]

    def tail_fraction(self) -> Tensor:
        """(k + 1,) relative output error in the damped metric after keeping r = 0..k directions."""
        e = self.s.square().flip(0).cumsum(0).flip(0)  # e[r] = sum_{i >= r} s_i^2
        total = e[0].clamp_min(torch.finfo(torch.float64).tiny)
        return torch.cat([e, e.new_zeros(1)]) / total


def factorize(
    weight: Tensor, moment: SecondMoment | None, *, activation_aware: bool = True, damping: float = DEFAULT_DAMPING
) -> Factorization:
    """Factorise a (out, in) weight for the output error on the inputs behind ``moment``.

    The SVD of ``M = W L`` is taken through the eigendecomposition of the smaller Gram
    matrix (2-4x faster than ``torch.linalg.svd`` on the 2-core CI CPU for SmolLM2's
    shapes, measured). For out >= in: ``M^T M = V diag(s^2) V^T``, then ``B = M V`` and
    ``A = V^T L^{-1}``, with no division by ``s``: ``B A = W L V V^T L^{-1}`` is a
    projection, exact at full rank whatever the conditioning. For out < in:
    ``M M^T = U diag(s^2) U^T``, ``B = U diag(s)`` and ``A = diag(1/s) U^T W``.

    Args:
        weight: (out, in) weight, any float dtype (math in float64 on its device).
        moment: Second moment of the layer's inputs; ignored (may be None) for plain SVD.
        activation_aware: Minimise output error under S (True) or ``||W - BA||_F`` (False).
        damping: Relative damping ``S + damping * mean(diag S) * I``, >= 0.
    Returns:
        The full factorisation; `Factorization.factors` truncates it.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    check_number("damping", damping, inclusive=True)
    w = weight.detach().to(torch.float64)
    if not torch.isfinite(w).all():
        raise ValueError(f"weight of shape {tuple(weight.shape)} contains NaN or Inf")
    out_f, in_f = w.shape
    chol = q = root = None
    if not activation_aware:
        m = w
    else:
        if moment is None:
            raise ValueError("activation-aware factorisation needs the inputs' second moment")
        if moment.in_features != in_f:
            raise ValueError(f"inputs have {moment.in_features} features but the weight has {in_f} inputs")
        s_mat = moment.matrix().to(w.device)  # (in, in)
        s_mat = s_mat + (damping * s_mat.diagonal().mean()) * torch.eye(in_f, dtype=torch.float64, device=w.device)
        chol, info = torch.linalg.cholesky_ex(s_mat)
        if int(info) == 0:
            m = w @ chol  # (out, in)
        else:  # S_d not positive definite: L = Q diag(sqrt(lambda)) with clamped eigenvalues
            chol = None
            evals, q = torch.linalg.eigh(s_mat)
            floor = _EIG_FLOOR * float(evals.max().clamp_min(0.0)) + torch.finfo(torch.float64).tiny
            root = evals.clamp_min(floor).sqrt()
            m = (w @ q) * root
    if out_f >= in_f:
        evals, v = torch.linalg.eigh(m.T @ m)  # ascending, (in,), (in, in)
        evals, v = evals.flip(0), v.flip(1)
        b = m @ v  # (out, in) = U diag(s)
        if chol is not None:  # A^T = L^{-T} V: one triangular solve with the upper factor L^T
            a = torch.linalg.solve_triangular(chol.T, v, upper=True).T
        elif q is not None:  # V^T L^{-1} = V^T diag(1/sqrt(lambda)) Q^T
            a = (v.T / root) @ q.T
        else:
            a = v.T
    else:
        evals, u = torch.linalg.eigh(m @ m.T)  # (out,), (out, out)
        evals, u = evals.flip(0), u.flip(1)
        sv = evals.clamp_min(0.0).sqrt()
        b = u * sv  # (out, out)
        # V^T L^{-1} = diag(1/s) U^T M L^{-1} = diag(1/s) U^T W; s clamped for rank-deficient W.
        a = (u.T @ w) / sv.clamp_min(1e-12 * float(sv[0]) + torch.finfo(torch.float64).tiny).unsqueeze(1)
    s = evals.clamp_min(0.0).sqrt()
    used_damping = float(damping) if activation_aware else 0.0
    return Factorization(b, s, a, activation_aware=activation_aware, damping=used_damping)


def relative_output_error(weight: Tensor, approx: Tensor, moment: SecondMoment) -> float:
    """``tr(D S D^T) / tr(W S W^T)`` with ``D = W - approx``: relative output error (bias excluded).

    Args:
        weight: (out, in) reference weight.
        approx: (out, in) replacement.
        moment: Second moment of the inputs (undamped).
    Returns:
        Mean squared output error over mean squared reference output, on those inputs.
    """
    num, den = output_error_terms(weight, approx, moment.matrix())
    return num / max(den, torch.finfo(torch.float64).tiny)


def output_error_terms(weight: Tensor, approx: Tensor, s_mat: Tensor) -> tuple[float, float]:
    """``(tr(D S D^T), tr(W S W^T))`` for ``D = W - approx``, in float64; sums over row blocks add."""
    s_mat = s_mat.to(weight.device)
    w = weight.detach().to(torch.float64)
    d = w - approx.detach().to(torch.float64)
    return float(((d @ s_mat) * d).sum()), float(((w @ s_mat) * w).sum())
