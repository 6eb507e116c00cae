"""The trainer's config tree: typed YAML parsing, errors that name file, key, value and
expected type, YAML syntax errors with file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from edkm.train.config import ConfigError, TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"


def _yaml(tmp_path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_numbers_in_yaml_files_are_numbers(tmp_path):
    cfg = load_config(_yaml(tmp_path, "optim:\n  lr: 1e-3\n  weight_decay: 0\n  tau_start: 1e-2\n"))
    assert cfg.optim.lr == 1e-3 and cfg.optim.weight_decay == 0.0 and cfg.optim.tau_start == 1e-2
    assert isinstance(cfg.optim.weight_decay, float)
    assert load_config(TINY, ["optim.lr=1e-4"]).optim.lr == 1e-4  # YAML 1.1 alone reads a string


@pytest.mark.parametrize("text, message", [
    ("optim:\n  weight_decay: abc\n", "c.yaml: optim.weight_decay = 'abc' (str): expected a number"),
    ("model:\n  source: 5\n", "c.yaml: model.source = 5 (int): expected a string"),
    ("optim:\n  max_steps: 2.5\n", "c.yaml: optim.max_steps = 2.5 (float): expected an integer"),
    ("run:\n  export: 'yes'\n", "c.yaml: run.export = 'yes' (str): expected true or false"),
    ("optim:\n  tau_start: abc\n", "c.yaml: optim.tau_start = 'abc' (str): expected a number or null"),
    ("dkm:\n  include: [1, 2]\n", "c.yaml: dkm.include = [1, 2] (list): expected a string or a list of strings"),
    ("optim:\n  - 1\n", "c.yaml: config section 'optim' must be a mapping of key: value, got list [1]"),
    ("- 1\n", "c.yaml: top level must be a mapping of sections, got list"),
    ("optim:\n  lr: 1e-3\n   x: [\n", "c.yaml:3: YAML syntax error: mapping values are not allowed here"),
])
def test_wrong_types_and_syntax_name_file_key_value_and_type(tmp_path, text, message):
    with pytest.raises(ConfigError) as info:
        load_config(_yaml(tmp_path, text))
    assert str(info.value).endswith(message) and str(tmp_path) in str(info.value), str(info.value)


def test_override_errors_name_the_override():
    with pytest.raises(ConfigError, match=r"^override 'optim.lr=abc': optim.lr = 'abc' \(str\): expected a number$"):
        load_config(TINY, ["optim.lr=abc"])
    with pytest.raises(ConfigError, match=r"override 'dkm.bits=9': bits must be an integer in \[1, 8\], got 9"):
        load_config(TINY, ["dkm.bits=9"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(TINY, ["bits=3"])


def test_unknown_keys_and_sections_and_round_trip():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['optim.lrr'\]"):
        load_config(TINY, ["optim.lrr=1"])
    with pytest.raises(ValueError, match="bogus"):
        TrainConfig.from_dict({"bogus": {}})
    with pytest.raises(ConfigError, match="config file '/nonexistent.yaml' does not exist"):
        load_config("/nonexistent.yaml")
    cfg = load_config(TINY)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    for name in ("smollm2-135m-4bit", "smollm2-135m-3bit", "llama-7b-3bit"):
        load_config(ROOT / "configs" / f"{name}.yaml")


@pytest.mark.parametrize("override, message", [
    ("run.on_divergence=retry", "run.on_divergence must be one of ('stop', 'rollback'), got 'retry'"),
    ("run.loss_spike=0.5", "run.loss_spike must be 0 (off) or a finite number > 1, got 0.5"),
    ("run.eval_every=-1", "run.eval_every must be an integer >= 0, got -1"),
    ("dkm.tau=1e-40", "tau must be >= 5.04e-29"),
    ("data.compensate_windows=-2", "data.compensate_windows must be an integer >= 0, got -2"),
    ("data.compensate_text=wiki", "data.compensate_text must be one of ('teacher', 'train'), got 'wiki'"),
    ("data.compensate_damp=-0.5", "data.compensate_damp must be a finite number >= 0, got -0.5"),
    ("data.compensate_damp=inf", "data.compensate_damp must be a finite number >= 0, got inf"),
    ("data.teacher_temperature=0", "data.teacher_temperature must be a finite number > 0, got 0"),
    ("data.teacher_temperature=nan", "data.teacher_temperature must be a finite number > 0, got nan"),
    ("data.teacher_top_k=-1", "data.teacher_top_k must be an integer >= 0, got -1"),
    ("optim.weight_decay=nan", "optim.weight_decay must be a finite number >= 0, got nan"),
    ("optim.grad_clip=nan", "optim.grad_clip must be a finite number >= 0, got nan"),
    ("optim.grad_clip=-1", "optim.grad_clip must be a finite number >= 0, got -1.0"),
    ("optim.lr=inf", "optim.lr must be a finite number > 0, got inf"),
    ("optim.tau_start=0", "optim.tau_start must be a finite number > 0 or null, got 0.0"),
])
def test_run_and_guard_keys_are_validated(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(TINY, [override])
