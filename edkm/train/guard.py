"""The divergence guard: is the state after an optimizer step fit to keep?

After every optimizer step the loop asks `DivergenceGuard.check` about the step's loss,
its gradient norm and the model: the loss and the gradient norm must be finite, every
trainable parameter and every DKM centroid table finite and (for parameters) within
``run.max_weight_abs``, and the loss at most ``run.loss_spike`` times the mean of the
last ``window`` accepted losses. The first failure is returned as a sentence naming the
value and the first bad layer. A step's loss is measured before its update, so before a
checkpoint `DivergenceGuard.check_heldout` also vets the held-out score of the weights
about to be written. The loop never writes a state that fails (see `edkm.train.loop`).
The checks cost one max-abs reduction per parameter and one scalar read per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from edkm.preparation import clustered_layers

PARAM_SUFFIX = ".parametrizations.weight.original"


class DivergenceError(RuntimeError):
    """Training diverged; the message names the step, the value and the first bad layer."""


@dataclass
class DivergenceGuard:
    """Running state of the checks (a short loss history) and their thresholds.

    Args:
        loss_spike: Loss above this factor times the recent mean is divergence (0 = off).
        max_weight_abs: Largest allowed ``|parameter|`` (0 = only the finite check).
        window: Number of recent losses averaged.
        heldout_reference: The held-out loss the held-out check compares with, when the
            training loss is no held-out-comparable cross-entropy (distillation: a KL,
            near 0): the float model's ``log ppl``. None: the recent training losses.
    """

    loss_spike: float = 10.0
    max_weight_abs: float = 65504.0
    window: int = 10
    losses: list[float] = field(default_factory=list)
    heldout_reference: float | None = None

    def check(self, loss: float, grad_norm: float | None, model: nn.Module, bad_grad: str | None = None) -> str | None:
        """Why the state after this step must not be kept, or None when it is fine.

        Args:
            loss: The step's mean training loss.
            grad_norm: Global gradient norm before clipping, or None if not measured.
            model: The (unwrapped) model after the optimizer step.
            bad_grad: Name of the first parameter with a non-finite gradient, if known.
        Returns:
            A sentence, or None. An accepted loss joins the running mean.
        """
        if not math.isfinite(loss):
            return f"the training loss is {loss}"
        if grad_norm is not None and not math.isfinite(grad_norm):
            where = f" (first non-finite gradient: {bad_grad})" if bad_grad else ""
            return f"the gradient norm is {grad_norm}{where}"
        bad = first_bad_tensor(model, self.max_weight_abs)
        if bad is not None:
            return bad
        if self.loss_spike and self.losses:
            mean = sum(self.losses) / len(self.losses)
            if loss > self.loss_spike * mean:
                return (f"the training loss {loss:.4g} is more than run.loss_spike={self.loss_spike:g} times the mean "
                        f"of the last {len(self.losses)} losses ({mean:.4g})")
        self.losses = (self.losses + [loss])[-self.window :]
        return None

    def check_heldout(self, ppl: float) -> str | None:
        """Why a state scored ``ppl`` on held-out text must not be kept, or None.

        The training loss of a step is measured before its update, so the held-out score
        taken before a checkpoint is what vouches for the weights being written: it must
        be finite and its loss (``log ppl``) within ``loss_spike`` times the recent mean
        (times ``heldout_reference`` when that is set).
        """
        if not math.isfinite(ppl):
            return f"the held-out perplexity is {ppl}"
        if self.loss_spike and self.heldout_reference is not None:
            loss = math.log(ppl)
            if loss > self.loss_spike * max(self.heldout_reference, 1e-6):
                return (f"the held-out loss {loss:.4g} (perplexity {ppl:.4g}) is more than run.loss_spike="
                        f"{self.loss_spike:g} times the float model's ({self.heldout_reference:.4g})")
            return None
        if self.loss_spike and self.losses:
            mean, loss = sum(self.losses) / len(self.losses), math.log(ppl)
            if loss > self.loss_spike * mean:
                return (f"the held-out loss {loss:.4g} (perplexity {ppl:.4g}) is more than run.loss_spike="
                        f"{self.loss_spike:g} times the mean of the last {len(self.losses)} training losses "
                        f"({mean:.4g})")
        return None

    def state_dict(self) -> dict[str, Any]:
        """The loss history, for checkpoints."""
        return {"losses": list(self.losses)}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore `state_dict` output (None: checkpoints written before the guard)."""
        self.losses = list((state or {}).get("losses", []))


def first_bad_tensor(model: nn.Module, max_abs: float) -> str | None:
    """The first trainable parameter that is non-finite or above ``max_abs`` in magnitude,
    or the first non-finite DKM centroid table, as a sentence; None if all are fine."""
    named = [(_short(n), p.detach()) for n, p in model.named_parameters() if p.requires_grad]
    named += [(f"{n} (DKM centroids)", p.centroids) for n, _, p in clustered_layers(model)]
    if not named:
        return None
    peaks = torch.stack([_full(torch.linalg.vector_norm(t, float("inf"))).float().cpu() for _, t in named]).tolist()
    n_params = len(named) - sum(1 for _ in clustered_layers(model))
    for i, ((name, _), peak) in enumerate(zip(named, peaks)):
        if not math.isfinite(peak):
            return f"{name} holds non-finite values (max |value| {peak})"
        if i < n_params and max_abs and peak > max_abs:
            return f"{name} has max |value| {peak:.4g} > run.max_weight_abs={max_abs:g}"
    return None


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor: an FSDP2 shard's norm (a DTensor) reduced over the ranks (collective)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def first_bad_grad(named: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """Name of the first non-finite gradient among ``(name, grad)`` pairs."""
    for name, g in named:
        if g is not None and not bool(torch.isfinite(g).all()):
            return _short(name)
    return None


def _short(name: str) -> str:
    """``module.a.q_proj.parametrizations.weight.original`` -> ``a.q_proj.weight``."""
    return name.removeprefix("module.").replace(PARAM_SUFFIX, ".weight")
