"""Where a DKM training step spends its time: torch.profiler events attributed to DKM phases.

`profile_phases` runs one call under ``torch.profiler`` with Python stacks
(``with_stack=True``: every Python frame becomes an event, so each aten op has a chain of
parents up to the script) and adds up the *self* CPU time of every event by phase:

    table build           the table of distinct values (sort / histogram, counts, masses)
    iterations            the forward k-means iterations on the table, and the soft value
                          of every row (the last iteration's map is the final map)
    soft weights          the gather of the row values back to the weights
    backward replay       segment sums of the upstream gradient and the table backward
                          (back through the iterations, and the Jacobian of the soft value)
    per-element gradient  dW_i = G_i J + s_i r
    casts and glue        everything else in the DKM region: the fp32 <-> bf16 casts
                          (``edkm::cast``) and their backward, reshapes, bookkeeping
    model                 what is not DKM: the layers' matmuls, attention, loss, optimizer

The DKM region is what runs inside a `DKMWeight` forward (the parametrization, matched by
its ``nn.Module: DKMWeight`` event or its source frame) and, in backward, every autograd
node whose forward ran there (linked by the autograd sequence number), with everything
nested under it (the reentrant replay). Inside the region the phase comes from, first,
the outermost ``torch.profiler.record_function`` label named in `LABELS` (the durable
way: labels survive renames of the functional code), else the outermost function frame of
edkm/functional (or ``torch.autograd.grad``) named in `FORWARD_FRAMES` /
`BACKWARD_FRAMES`; unmatched work directly inside the autograd Function's
forward / backward counts as soft weights / backward replay.

Threads that run no aten op are left out (``idle_threads_s``): the Python tracer records
every thread, and a helper thread blocked in ``threading.wait`` (seen loading SmolLM2:
15 s of "self time" in a 15 s step) would otherwise count as work.

Limits: CPU time only (CUDA kernels are not attributed; on GPU this gives the host-side
launch cost). The Python tracer inflates Python-heavy phases, so compare shares within one
profile, not profiled seconds with timed ones.
"""

from __future__ import annotations

import importlib.util
import re
from collections import defaultdict
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

DKM_PHASES = ("table build", "iterations", "soft weights", "backward replay", "per-element gradient",
              "casts and glue")
PHASES = (*DKM_PHASES, "model")
# record_function labels the functional code may carry; they win over the frame names.
LABELS = {
    "edkm::table_build": "table build",
    "edkm::iterations": "iterations",
    "edkm::soft_weights": "soft weights",
    "edkm::backward_replay": "backward replay",
    "edkm::element_grad": "per-element gradient",
    "edkm::cast": "casts and glue",
}
FORWARD_FRAMES = {
    "build_table": "table build", "table_from_histogram": "table build", "histogram": "table build",
    "importance_mass": "table build", "pattern_rowmap": "table build", "pattern_index": "table build",
    "pattern_histogram": "table build",
    "dkm_iterations": "iterations", "table_iterate": "iterations", "table_forward": "iterations",
    "gather": "soft weights", "gather_rows": "soft weights", "table_rows": "soft weights",
}
BACKWARD_FRAMES = {
    "pattern_rowmap": "table build", "pattern_index": "table build",
    "segment_sum": "backward replay", "dkm_iterations": "backward replay", "soft_assign": "backward replay",
    "table_bwd": "backward replay", "grad": "backward replay",
    "soft_value_jacobian": "per-element gradient", "element_grad": "per-element gradient",
}
_FRAME = re.compile(r"^(?P<file>.*)\((?P<line>\d+)\): (?P<func>\S+)$")
_NODE = "autograd::engine::evaluate_function: "
TOP_OPS = 3


@lru_cache(maxsize=1 << 16)  # event names repeat: a profile of SmolLM2 has ~10^6 events, ~10^3 names
def _frame(name: str) -> tuple[str, str] | None:
    """``(file, function)`` of a Python-frame event name, or None for other events.

    The twins' and launchers' prefixes are dropped (``torch_histogram`` -> ``histogram``).
    """
    m = _FRAME.match(name)
    if not m:
        return None
    func = m["func"]
    for prefix in ("torch_", "triton_"):
        if func.startswith(prefix):
            func = func[len(prefix):]
    return m["file"], func


@lru_cache(maxsize=None)
def _source_dirs() -> tuple[str, ...]:
    """Directories of edkm.functional and edkm.kernels (found without importing triton)."""
    dirs = []
    for name in ("edkm.functional", "edkm.kernels"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            dirs += [str(Path(d).resolve()) + "/" for d in spec.submodule_search_locations]
    return tuple(dirs)


@lru_cache(maxsize=1 << 16)
def _is_dkm_weight(name: str) -> bool:
    if name.startswith("nn.Module: DKMWeight"):
        return True
    f = _frame(name)
    return f is not None and f[0].endswith("edkm/layers/parametrization.py") and f[1] == "forward"


def _functional(file: str) -> bool:
    return file.startswith(_source_dirs()) or "edkm/functional/" in file


def _ancestors(e) -> list:
    """``e`` and its parents, innermost first."""
    out = []
    while e is not None:
        out.append(e)
        e = e.cpu_parent
    return out


def classify(events) -> dict[int, str]:
    """Phase of every event (by ``id``), see the module header."""
    chains = {id(e): _ancestors(e) for e in events}
    fwd_seq = set()
    for e in events:  # forward ops inside a DKMWeight forward: their backward nodes are DKM too
        if e.sequence_nr >= 0 and any(_is_dkm_weight(a.name) for a in chains[id(e)][1:]):
            fwd_seq.add(e.sequence_nr)
    out = {}
    for e in events:
        chain = chains[id(e)]
        root = None  # index in chain of the region's root event
        for i, a in enumerate(chain):
            if _is_dkm_weight(a.name):
                root, backward = i, False
                break
            if a.name.startswith(_NODE) and a.sequence_nr in fwd_seq:
                root, backward = i, True  # keep looking outward: a nested node's own root may be further up
        if root is None:
            out[id(e)] = "model"
            continue
        region = chain[:root + 1][::-1]  # outermost first
        phase = next((LABELS[a.name] for a in region if a.name in LABELS), None)
        if phase is not None:
            out[id(e)] = phase
            continue
        frames = BACKWARD_FRAMES if backward else FORWARD_FRAMES
        inside_fn = False
        for a in region:
            f = _frame(a.name)
            if f is None:
                continue
            file, func = f
            if _functional(file) and func == ("backward" if backward else "forward"):
                inside_fn = True
            elif (_functional(file) or (func == "grad" and file.endswith("torch/autograd/__init__.py"))) \
                    and func in frames and (inside_fn or func == "grad"):
                phase = frames[func]
                break
        if phase is None:
            phase = ("backward replay" if backward else "soft weights") if inside_fn else "casts and glue"
        out[id(e)] = phase
    return out


def summarize(events) -> dict:
    """Seconds of self CPU time per phase, aten op counts and the top events of each phase.

    Returns:
        ``{"total_s", "dkm_s", "idle_threads_s", "phases": {phase: {"s", "share_of_dkm", "aten_ops", "aten_s",
        "top_ops", "top_other"}}}``: ``aten_s`` is the self time of aten ops alone, ``top_ops``
        the costliest aten ops and ``top_other`` the costliest other events (Python frames,
        autograd nodes), as ``[name, seconds]``; ``share_of_dkm`` is None for ``model``.
    """
    events = list(events)
    working = {e.thread for e in events if e.name.startswith("aten::")}
    idle = sum(e.self_cpu_time_total for e in events if e.thread not in working) / 1e6
    events = [e for e in events if e.thread in working]
    phase_of = classify(events)
    secs: dict[str, float] = defaultdict(float)
    nops: dict[str, int] = defaultdict(int)
    ops: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    other: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for e in events:
        p = phase_of[id(e)]
        s = e.self_cpu_time_total / 1e6
        secs[p] += s
        if e.name.startswith("aten::"):
            nops[p] += 1
            ops[p][e.name] += s
        else:  # Python frames, autograd nodes, profiler work: where time outside ops goes
            other[p][e.name] += s
    dkm = sum(secs[p] for p in DKM_PHASES)
    phases = {}
    for p in PHASES:
        top = sorted(ops[p].items(), key=lambda kv: -kv[1])[:TOP_OPS]
        top_other = sorted(other[p].items(), key=lambda kv: -kv[1])[:TOP_OPS]
        phases[p] = {"s": secs[p], "share_of_dkm": (secs[p] / dkm if dkm else 0.0) if p != "model" else None,
                     "aten_ops": nops[p], "aten_s": sum(ops[p].values()), "top_ops": [[n, s] for n, s in top],
                     "top_other": [[n, s] for n, s in top_other]}
    return {"total_s": sum(secs.values()), "dkm_s": dkm, "idle_threads_s": idle, "phases": phases}


def profile_phases(fn: Callable[[], object]) -> dict:
    """Run ``fn`` once under the profiler (CPU activity, Python stacks) and `summarize` it."""
    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        fn()
    return summarize(prof.events())


def phase_rows(summary: dict, dkm_extra_s: float | None = None) -> list[dict]:
    """Rows for `bench.harness.format_table`: phase, profiled seconds (all / in aten ops), share, ops, top op.

    Args:
        summary: From `summarize`.
        dkm_extra_s: Timed DKM cost per step (dkm_s - plain_s); if given, each DKM phase
            also gets ``est_s`` = its share of it.
    """
    rows = []
    for p, v in summary["phases"].items():
        share = v["share_of_dkm"]
        rows.append({"phase": p, "profiled_s": v["s"], "aten_s": v["aten_s"], "share_of_dkm": share,
                     "est_s": share * dkm_extra_s if share is not None and dkm_extra_s is not None else None,
                     "aten_ops": v["aten_ops"], "top_op": v["top_ops"][0][0] if v["top_ops"] else None})
    return rows


def has_python_stacks() -> bool:
    """Whether this torch records Python frames as profiler events (needed for the frame rules)."""
    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        torch.ones(1).add_(1)
    return any(_frame(e.name) for e in prof.events())
