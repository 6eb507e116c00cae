"""The shared argument checks (`edkm._checks`) and the bad values they now catch at their call sites."""

import math
import re

import pytest
import torch

from edkm import DKMConfig
from edkm._checks import check_int, check_number, check_patterns, is_finite_number
from edkm.compensate import compensate_weight
from edkm.deploy.generate import generate_ids
from edkm.distill import distill_loss
from edkm.hub.teacher_text import sample_teacher_windows
from edkm.lowrank import LowRankConfig


@pytest.mark.parametrize("value, ok", [(1, True), (0.5, True), (-2, True), (True, False), (False, False),
                                       (math.nan, False), (math.inf, False), (-math.inf, False), ("1", False),
                                       (None, False)])
def test_is_finite_number(value, ok):
    assert is_finite_number(value) is ok


@pytest.mark.parametrize("value, inclusive, message", [
    (0, False, "x must be a finite number > 0, got 0"),
    (-1.5, True, "x must be a finite number >= 0, got -1.5"),
    (math.nan, True, "x must be a finite number >= 0, got nan"),
    (math.inf, False, "x must be a finite number > 0, got inf"),
    (True, False, "x must be a finite number > 0, got True"),
    ("3", False, "x must be a finite number > 0, got '3'"),
])
def test_check_number_names_the_argument_and_the_value(value, inclusive, message):
    with pytest.raises(ValueError) as err:
        check_number("x", value, inclusive=inclusive)
    assert str(err.value) == message


def test_check_number_accepts_the_bounds_it_states():
    check_number("x", 1e-30)
    check_number("x", 0, inclusive=True)
    check_number("x", 0.0, inclusive=True)
    with pytest.raises(ValueError, match=r"x must be a finite number > 0 or null, got -1"):
        check_number("x", -1, also="or null")


@pytest.mark.parametrize("value, low, high, message", [
    (0, 1, None, "n must be an integer >= 1, got 0"),
    (2.0, 1, None, "n must be an integer >= 1, got 2.0"),
    (True, 0, None, "n must be an integer >= 0, got True"),
    (9, 1, 8, "n must be an integer in [1, 8], got 9"),
    (5, None, 4, "n must be an integer <= 4, got 5"),
    ("x", None, None, "n must be an integer, got 'x'"),
])
def test_check_int_names_the_argument_and_the_value(value, low, high, message):
    with pytest.raises(ValueError) as err:
        check_int("n", value, low, high)
    assert str(err.value) == message


def test_check_int_accepts_the_bounds_it_states():
    check_int("n", 1)
    check_int("n", 0, 0)
    check_int("n", 8, 1, 8)
    check_int("n", -5, None)


# Values the call sites let through before they shared these checks.
def test_dkm_config_rejects_a_bool_tau_and_eps():
    with pytest.raises(ValueError, match="tau must be a finite number > 0, got True"):
        DKMConfig(tau=True)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0, got False"):
        DKMConfig(eps=False)


def test_compensate_rejects_a_bool_damp():
    w, lut, h = torch.randn(2, 3), torch.randn(2, 4), torch.eye(3)
    with pytest.raises(ValueError, match="damp must be a finite number >= 0, got True"):
        compensate_weight(w, lut, h, damp=True)


def test_teacher_sampler_rejects_an_infinite_temperature_before_any_work():
    # inf passed `temperature > 0` and sampled uniformly over the vocabulary without a word
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got inf"):
        sample_teacher_windows(torch.nn.Linear(2, 2), n_windows=1, seq_len=4, temperature=math.inf)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 2.5"):
        sample_teacher_windows(torch.nn.Linear(2, 2), n_windows=1, seq_len=4, batch_size=2.5)


def test_distill_loss_rejects_an_infinite_temperature():
    logits = torch.randn(2, 5)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got inf"):
        distill_loss(logits, logits, temperature=math.inf)


def test_teacher_sampler_rejects_a_fractional_or_bool_top_k():
    # 2.5 and True passed `top_k < 1` and reached logits.topk
    for bad in (2.5, True, 0):
        with pytest.raises(ValueError, match=rf"top_k must be an integer >= 1 or None, got {bad!r}"):
            sample_teacher_windows(torch.nn.Linear(2, 2), n_windows=1, seq_len=4, top_k=bad)


@pytest.mark.parametrize("temperature", [math.nan, math.inf])
def test_generate_rejects_a_non_finite_temperature_before_the_prefill(temperature):
    calls = []

    class Model(torch.nn.Module):
        def forward(self, *args, **kwargs):  # would be the prefill
            calls.append(1)
            raise AssertionError("the model ran")

    with pytest.raises(ValueError, match=rf"temperature must be a finite number \(<= 0: greedy\), got {temperature!r}"):
        next(generate_ids(Model().eval(), [1], max_new_tokens=2, temperature=temperature))
    assert not calls


def test_check_patterns_takes_one_pattern_or_a_list_and_names_the_whole_value():
    assert check_patterns("include", "*.q_proj") == ("*.q_proj",)
    assert check_patterns("include", ["a", "b"]) == ("a", "b")
    assert check_patterns("exclude", ()) == ()
    for bad in (5, [""], ["a", 3], None):
        with pytest.raises(ValueError, match=rf"include must be a non-empty pattern or a list of non-empty patterns, "
                                             rf"got {re.escape(repr(bad))}"):
            check_patterns("include", bad)
    with pytest.raises(ValueError, match=r"freeze must be .* list of distinct non-empty patterns, got \['a', 'a'\]"):
        check_patterns("freeze", ["a", "a"], distinct=True)


def test_configs_reject_a_pattern_list_that_is_not_one():
    # DKMConfig(include=5) raised a bare TypeError ('int' object is not iterable)
    with pytest.raises(ValueError, match="include must be a non-empty pattern or a list of non-empty patterns, got 5"):
        DKMConfig(include=5)
    with pytest.raises(ValueError, match=r"exclude must be .* got \[''\]"):
        LowRankConfig(exclude=[""])
