"""Schedules: values at known progress points, validation, serialization."""
import math

import pytest

from mpq_plugin.search.schedules import (
    Schedule,
    constant,
    cosine,
    exponential,
    linear_ramp,
    progress_of,
    schedule_from_dict,
    step_decay,
    step_ramp,
    warmup,
)


def test_constant():
    s = constant(0.3)
    assert s(0.0) == s(0.7) == s(1.0) == 0.3


def test_linear_ramp_warmup_and_duration():
    s = linear_ramp(0.0, 2.0, warmup=0.2, duration=0.4)
    assert s(0.0) == 0.0 and s(0.19) == 0.0
    assert s(0.2) == 0.0  # the ramp starts from `start`
    assert s(0.4) == pytest.approx(1.0)
    assert s(0.6) == 2.0 and s(1.0) == 2.0


def test_linear_ramp_defaults_and_jump():
    assert linear_ramp(1.0, 3.0)(0.5) == pytest.approx(2.0)  # ramps over the whole run
    jump = linear_ramp(0.0, 1.0, warmup=0.5, duration=0.0)
    assert jump(0.49) == 0.0 and jump(0.5) == 1.0


def test_exponential_is_csq_temperature():
    t = exponential(1.0, 200.0)
    assert t(0.0) == pytest.approx(1.0)
    assert t(0.5) == pytest.approx(math.sqrt(200.0))
    assert t(1.0) == pytest.approx(200.0)


def test_cosine_endpoints_and_middle():
    c = cosine(1.0, 0.1)
    assert c(0.0) == pytest.approx(1.0)
    assert c(0.5) == pytest.approx(0.55)
    assert c(1.0) == pytest.approx(0.1)


def test_step_decay_counts_reached_milestones():
    s = step_decay(1.0, 0.5, [0.25, 0.75])
    assert [s(p) for p in (0.0, 0.24, 0.25, 0.5, 0.75, 1.0)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]


def test_warmup_rescales_inner_progress():
    w = warmup(linear_ramp(0.0, 1.0), 0.5, value=-1.0)
    assert w(0.25) == -1.0
    assert w(0.5) == 0.0
    assert w(0.75) == pytest.approx(0.5)
    assert w(1.0) == 1.0


def test_progress_is_clamped_and_validated():
    assert constant(2.0)(1.5) == 2.0  # clamped to 1
    assert linear_ramp(0.0, 1.0)(-0.5) == 0.0
    with pytest.raises(ValueError, match="NaN"):
        linear_ramp()(float("nan"))


def test_step_ramp_is_exact_in_steps():
    assert [step_ramp(s, 3, 4) for s in range(9)] == [0.0, 0.0, 0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert step_ramp(0, 0, 0) == 1.0 and step_ramp(2, 3, 0) == 0.0 and step_ramp(3, 3, 0) == 1.0
    with pytest.raises(ValueError):
        step_ramp(0, -1, 0)


def test_progress_of():
    assert progress_of(5, 10) == 0.5
    assert progress_of(20, 10) == 1.0
    with pytest.raises(ValueError, match="total_steps"):
        progress_of(1, 0)


@pytest.mark.parametrize("sched", [
    constant(0.5), linear_ramp(0.1, 0.9, 0.2, 0.3), exponential(1.0, 200.0), cosine(2.0, 0.0),
    step_decay(1.0, 0.1, [0.3, 0.6]), warmup(exponential(1.0, 10.0), 0.25),
    warmup(warmup(cosine(), 0.1), 0.2, value=3.0),
])
def test_state_dict_round_trip(sched):
    assert isinstance(sched, Schedule)
    again = schedule_from_dict(sched.state_dict())
    assert type(again) is type(sched)
    for p in (0.0, 0.1, 0.33, 0.5, 0.61, 0.9, 1.0):
        assert again(p) == sched(p)


@pytest.mark.parametrize("make, match", [
    (lambda: linear_ramp(warmup=1.5), "warmup"),
    (lambda: linear_ramp(duration=-0.1), "duration"),
    (lambda: exponential(0.0, 1.0), "positive"),
    (lambda: step_decay(milestones=[0.5, 0.2]), "milestones"),
    (lambda: warmup(constant(), 1.0), "fraction"),
    (lambda: warmup(lambda p: p, 0.1), "Schedule"),
    (lambda: schedule_from_dict({"type": "nope"}), "unknown schedule"),
])
def test_invalid_arguments_raise(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()
