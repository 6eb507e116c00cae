"""Calibration statistics for LoRD: input second moments, input sharing, output-gradient moments.

`collect_input_stats` runs the model over calibration batches with hooks on the named
``nn.Linear`` layers and keeps, per layer, only float64 sums (never the activations):

- ``S = sum x x^T`` of the layer's inputs (forward pre-hook). Layers whose hook receives
  the very same input tensor object in one forward (q/k/v, gate/up) are recorded as a
  group and share one accumulator.
- with a ``loss_fn``: ``G = sum g g^T`` of the gradient of the loss with respect to the
  layer's output, per token (``torch.autograd.grad`` on the captured outputs, so no
  parameter ``.grad`` is touched). ``G`` and ``S`` together give the Kronecker-factored
  (K-FAC) Fisher estimate of the loss increase from a weight error ``D``:
  ``tr(G D S D^T) / n``; `edkm.lowrank.budget` uses it to split a parameter budget.

Limits: one pass over the dense model; the gradient pass costs a backward per batch
(51 s for 2,048 tokens on SmolLM2-135M on the loaded 2-core CI box, vs 22 s forward-only).
"""

from __future__ import annotations

import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from edkm.lowrank.factor import SecondMoment

__all__ = ["CalibrationStats", "causal_lm_loss", "collect_input_stats"]

LossFn = Callable[[nn.Module, Any], Tensor]


@dataclass
class CalibrationStats:
    """What calibration measured on a model's layers.

    Attributes:
        moments: Group leader name -> `SecondMoment` of its inputs.
        groups: Tuples of layer names that read the same input tensor, first caller
            first (singletons included), in call order.
        grads: Layer name -> `SecondMoment` of the loss gradient w.r.t. its output
            (empty unless collected with a ``loss_fn``).
        uid: Identifies these statistics (keys `lowrank_model`'s factorisation cache).
    """

    moments: dict[str, SecondMoment]
    groups: list[tuple[str, ...]]
    grads: dict[str, SecondMoment] = field(default_factory=dict)
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)

    def moment(self, name: str) -> SecondMoment:
        """The second moment of layer ``name``'s inputs (its group's)."""
        for group in self.groups:
            if name in group:
                return self.moments[group[0]]
        raise KeyError(f"no calibration statistics for layer {name!r}")


def causal_lm_loss(model: nn.Module, batch: Any) -> Tensor:
    """Next-token loss of a Hugging Face causal LM on a batch of token ids (or a Mapping of inputs)."""
    if isinstance(batch, Mapping):
        return model(**batch, labels=batch["input_ids"]).loss
    return model(input_ids=batch, labels=batch).loss


def collect_input_stats(
    model: nn.Module, batches: Iterable[Any], names: Sequence[str], *, loss_fn: LossFn | None = None,
    product_dtype: torch.dtype = torch.float64, stop_early: bool = False,
) -> CalibrationStats:
    """Accumulate each named layer's input second moment (and output-gradient moment).

    Args:
        model: The (dense) model; run in eval mode, put back in its previous mode.
        batches: Each is a Tensor (``model(batch)``), a Mapping (``model(**batch)``) or a
            tuple/list (``model(*batch)``); tensors are moved to the model's device.
        names: Module names (from ``model.named_modules()``) to hook.
        loss_fn: ``loss_fn(model, batch) -> scalar``; when given, the forward runs with
            gradients and ``G`` is collected too (e.g. `causal_lm_loss`).
        product_dtype: Dtype of each batch's ``x^T x`` for ``S`` (`SecondMoment.add`).
        stop_early: Without ``loss_fn``, end each forward once every named layer has taken
            its input (the rest of the model, e.g. the LM head over the vocabulary, does not
            run). Only for layers called once per forward.
    Returns:
        The statistics. Raises ``ValueError`` if a layer saw no inputs, or if layers share
        an input tensor in one batch but not in another.
    """
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"no modules named {missing} in the model")
    leader: dict[str, str] = {}  # layer -> group leader (fixed by the first batch)
    moments: dict[str, SecondMoment] = {}
    grads: dict[str, SecondMoment] = {}
    outputs: list[tuple[str, Tensor]] = []  # this batch's layer outputs, for the gradient pass
    live: list[tuple[weakref.ref, str]] = []  # inputs seen in this forward -> leader that took them
    state = {"first": True}
    called: set[str] = set()  # layers that took their input in this batch
    wanted, stop = set(names), stop_early and loss_fn is None

    def pre_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            take(name, args[0])
            called.add(name)
            if stop and len(called) == len(wanted):
                raise _AllInputsTaken

        def take(name: str, x: Tensor) -> None:
            live[:] = [(r, k) for r, k in live if r() is not None]
            seen = next((k for r, k in live if r() is x), None)
            if state["first"] and name not in leader:
                leader[name] = seen if seen is not None else name
            if seen is not None:  # a group member: its leader already accumulated x
                if leader[name] != seen:
                    raise ValueError(f"layer {name!r} shared its input with {leader[name]!r} in one batch "
                                     f"and with {seen!r} in another; set groups=False")
                return
            if leader.get(name, name) != name:
                raise ValueError(f"layer {name!r} shared its input with {leader[name]!r} in the first batch "
                                 "but not later; set groups=False")
            if name not in moments:
                moments[name] = SecondMoment.zeros(x.shape[-1], x.device)
            with torch.no_grad():
                moments[name].add(x, product_dtype)
            live.append((weakref.ref(x), name))

        return hook

    def out_hook(name: str):
        def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
            if out.requires_grad:
                outputs.append((name, out))

        return hook

    handles = [modules[n].register_forward_pre_hook(pre_hook(n)) for n in names]
    if loss_fn is not None:
        handles += [modules[n].register_forward_hook(out_hook(n)) for n in names]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n_batches = 0
    try:
        for p in frozen:  # outputs must carry a graph; autograd.grad never writes .grad
            p.requires_grad_(loss_fn is not None)
        for batch in batches:
            batch = _to(batch, device)
            called.clear()
            if loss_fn is None:
                with torch.no_grad():
                    try:
                        _call(model, batch)
                    except _AllInputsTaken:
                        pass
            else:
                with torch.enable_grad():
                    _gradient_pass(model, batch, loss_fn, outputs, grads)
            live.clear()
            state["first"] = False
            n_batches += 1
    finally:
        for h in handles:
            h.remove()
        for p in frozen:
            p.requires_grad_(False)
        model.train(was_training)
    unseen = [n for n in names if n not in leader]
    if unseen:
        raise ValueError(f"layers {unseen} received no calibration inputs over {n_batches} batches")
    groups: dict[str, list[str]] = {}
    for n in leader:  # dict order = first call order
        groups.setdefault(leader[n], []).append(n)
    return CalibrationStats(moments, [tuple(g) for g in groups.values()], grads)


class _AllInputsTaken(Exception):
    """Raised by the last hooked layer's pre-hook to end a forward early (``stop_early``)."""


def _gradient_pass(
    model: nn.Module, batch: Any, loss_fn: LossFn, outputs: list[tuple[str, Tensor]], grads: dict[str, SecondMoment]
) -> None:
    outputs.clear()
    loss = loss_fn(model, batch)
    if not outputs:
        raise ValueError("no hooked layer output carries a gradient; cannot collect output gradients")
    gs = torch.autograd.grad(loss, [y for _, y in outputs], allow_unused=True)
    for (name, y), g in zip(outputs, gs):
        if g is None:
            g = torch.zeros_like(y)
        if name not in grads:
            grads[name] = SecondMoment.zeros(y.shape[-1], y.device)
        grads[name].add(g)
    outputs.clear()


def _to(batch: Any, device: torch.device) -> Any:
    move = lambda v: v.to(device) if isinstance(v, Tensor) else v  # noqa: E731
    if isinstance(batch, Tensor):
        return move(batch)
    if isinstance(batch, Mapping):
        return {k: move(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(move(v) for v in batch)
    raise TypeError(f"calibration batches must be Tensor, Mapping or tuple, got {type(batch).__name__}")


def _call(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, Tensor):
        model(batch)
    elif isinstance(batch, Mapping):
        model(**batch)
    else:
        model(*batch)
