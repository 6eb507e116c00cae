"""Tests of `bench/phases.py`: profiler events are attributed to the right DKM phase.

Two levels: hand-built event trees (the rules: region by DKMWeight / autograd sequence
number, labels over frames, outermost frame, the grad replay, casts), and a real profile
of one prepared linear layer (every phase is found, and no event under the functional
code is left in ``model``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import edkm.functional
from bench.phases import DKM_PHASES, PHASES, classify, summarize
from edkm import DKMConfig, prepare

FN = str(Path(edkm.functional.__file__).resolve().parent)  # frames must point at the real functional dir


@dataclass(eq=False)
class Ev:
    """The slice of `torch.autograd.profiler_util.FunctionEvent` that phases.py reads."""

    name: str
    cpu_parent: "Ev | None" = None
    sequence_nr: int = -1
    self_cpu_time_total: float = 1.0  # microseconds
    thread: int = 1
    children: list = field(default_factory=list)


def tree(*names: str, seq: int = -1, parent: Ev | None = None, us: float = 1.0) -> list[Ev]:
    """A chain of events, outermost first; the last (the leaf op) gets ``seq`` and ``us``."""
    out, p = [], parent
    for n in names:
        p = Ev(n, p)
        out.append(p)
    out[-1].sequence_nr, out[-1].self_cpu_time_total = seq, us
    for e in out[:-1]:
        e.self_cpu_time_total = 0.0
    return out


def fr(file: str, func: str) -> str:
    return f"{file}(10): {func}"


def test_rules_on_hand_built_events() -> None:
    fwd = fr(f"{FN}/autograd.py", "forward")
    bwd = fr(f"{FN}/autograd.py", "backward")
    dkm_w = "nn.Module: DKMWeight_0"
    cases = {
        "table": (tree(dkm_w, fwd, fr(f"{FN}/table.py", "build_table"), "aten::sort", seq=7), "table build"),
        "iters": (tree(dkm_w, fwd, fr(f"{FN}/iterations.py", "dkm_iterations"),
                       fr(f"{FN}/iterations.py", "soft_assign"), "aten::_softmax"), "iterations"),
        "rows": (tree(dkm_w, fwd, "aten::einsum"), "soft weights"),
        "twin": (tree(dkm_w, fwd, fr(f"{FN}/twins.py", "torch_gather_rows"), "aten::index"), "soft weights"),
        "cast": (tree(dkm_w, "aten::_to_copy", seq=8), "casts and glue"),
        "label": (tree(dkm_w, fwd, "edkm::iterations", fr(f"{FN}/table.py", "build_table"), "aten::mul"),
                  "iterations"),
        "model": (tree("aten::mm", seq=9), "model"),
    }
    node = "autograd::engine::evaluate_function: "
    b = tree(node + "_UniqueDKMBackward", "_UniqueDKMBackward", bwd, us=0.0)
    bcases = {
        "seg": (tree(fr(f"{FN}/table.py", "segment_sum"), "aten::index_add_", parent=b[-1]), "backward replay"),
        "grad": (tree(fr("torch/autograd/__init__.py", "grad"), node + "SoftmaxBackward0", "aten::bmm", seq=99,
                      parent=b[-1]), "backward replay"),
        "jac": (tree(fr(f"{FN}/iterations.py", "soft_value_jacobian"), fr(f"{FN}/iterations.py", "soft_assign"),
                     "aten::_softmax", parent=b[-1]), "per-element gradient"),
        "elem": (tree(fr(f"{FN}/table.py", "element_grad"), "aten::mul", parent=b[-1]), "per-element gradient"),
        "shared": (tree("aten::div", parent=b[-1]), "backward replay"),
        "castbwd": (tree(node + "ToCopyBackward0", "aten::_to_copy", seq=-1), "casts and glue"),
        "mmbwd": (tree(node + "MmBackward0", "aten::mm"), "model"),
    }
    b[0].sequence_nr = 7  # the Function's backward node carries the forward op's sequence number
    bcases["castbwd"][0][0].sequence_nr = 8
    bcases["mmbwd"][0][0].sequence_nr = 9
    waiting = Ev("threading.py(331): wait", self_cpu_time_total=5.0, thread=2)  # a blocked helper thread
    events = [e for chain, _ in [*cases.values(), *bcases.values()] for e in chain] + b + [waiting]
    phase = classify(events)
    for name, (chain, want) in {**cases, **bcases}.items():
        assert phase[id(chain[-1])] == want, f"{name}: {chain[-1].name} -> {phase[id(chain[-1])]}, want {want}"

    s = summarize(events)
    assert set(s["phases"]) == set(PHASES)
    assert s["phases"]["model"]["share_of_dkm"] is None and s["phases"]["model"]["s"] == pytest.approx(2e-6)
    assert s["phases"]["per-element gradient"]["s"] == pytest.approx(2e-6)
    assert s["phases"]["per-element gradient"]["aten_ops"] == 2
    assert s["dkm_s"] == pytest.approx(12e-6) and s["total_s"] == pytest.approx(14e-6)
    assert s["idle_threads_s"] == pytest.approx(5e-6)  # a thread that runs no op is not work
    assert sum(s["phases"][p]["share_of_dkm"] for p in DKM_PHASES) == pytest.approx(1.0)


def test_real_profile_of_a_prepared_linear() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 8))
    prepare(model, DKMConfig(bits=3, granularity="per_grouped_channel", group_size=8, cluster_dtype="bfloat16",
                             min_weight_numel=64))
    model.train()
    x = torch.randn(16, 64)
    model(x).square().mean().backward()  # warm-up
    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        model(x).square().mean().backward()
    events = list(prof.events())
    phase = classify(events)
    for e in events:  # nothing the functional code runs may land in "model"
        a, under_fn = e, False
        while a is not None:
            under_fn |= FN in a.name
            a = a.cpu_parent
        if under_fn:
            assert phase[id(e)] != "model", f"{e.name} under the functional code counted as model"
    s = summarize(events)
    for p in DKM_PHASES[:5]:
        assert s["phases"][p]["s"] > 0 and s["phases"][p]["aten_ops"] > 0, f"phase {p!r} found nothing: {s}"
    assert s["phases"]["model"]["aten_ops"] > 0  # the matmuls, relu and loss
