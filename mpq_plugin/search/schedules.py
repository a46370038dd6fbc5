"""Schedules: small serializable callables of training progress ``p`` in [0, 1].

Progress is ``step / total_steps`` (see :func:`progress_of`), so one schedule works for any loop
length. Temperature and candidate decay live inside the quantizers (``set_progress``); this
module provides what the search itself needs (the penalty warm-up and ramp) and the building
blocks the methods may reuse, e.g. CSQ's temperature ``T = 200^p`` is ``exponential(1, 200)``.

Every schedule has ``state_dict()``; :func:`schedule_from_dict` rebuilds it, so a schedule can be
stored in a checkpoint or a config file.

Example:
    >>> s = linear_ramp(0.0, 1.0, warmup=0.1, duration=0.2)   # 0 until p=0.1, 1 from p=0.3
    >>> s(0.05), round(s(0.2), 6), s(0.5)
    (0.0, 0.5, 1.0)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Protocol, Sequence, Type, runtime_checkable

__all__ = [
    "Constant",
    "Cosine",
    "Exponential",
    "LinearRamp",
    "Schedule",
    "StepDecay",
    "Warmup",
    "constant",
    "cosine",
    "exponential",
    "linear_ramp",
    "progress_of",
    "schedule_from_dict",
    "step_decay",
    "step_ramp",
    "warmup",
]


@runtime_checkable
class Schedule(Protocol):
    """A value as a function of training progress ``p`` in [0, 1]."""

    def __call__(self, progress: float) -> float: ...

    def state_dict(self) -> Dict[str, Any]: ...


def progress_of(step: int, total_steps: int) -> float:
    """``step / total_steps`` clamped to [0, 1] (the progress the search passes to quantizers)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps={total_steps} must be a positive number of optimizer steps")
    return min(max(step / total_steps, 0.0), 1.0)


def step_ramp(step: int, warmup_steps: int, ramp_steps: int) -> float:
    """Penalty weight in exact integer steps: 0 for ``step < warmup_steps``, then linear from 0
    to 1 over ``ramp_steps`` (``(step - warmup_steps) / ramp_steps``), then 1."""
    if warmup_steps < 0 or ramp_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps} and ramp_steps={ramp_steps} must be >= 0")
    if step < warmup_steps:
        return 0.0
    if ramp_steps == 0:
        return 1.0
    return min(1.0, (step - warmup_steps) / ramp_steps)


def _check_progress(p: float) -> float:
    if p != p:
        raise ValueError("progress is NaN; pass step / total_steps in [0, 1]")
    return min(max(float(p), 0.0), 1.0)


_REGISTRY: Dict[str, Type["_Base"]] = {}


class _Base:
    kind = ""

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        _REGISTRY[cls.kind] = cls

    def state_dict(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"type": self.kind}
        d.update(asdict(self))  # type: ignore[call-overload]
        return d


@dataclass(frozen=True)
class Constant(_Base):
    """Always ``value``."""

    kind = "constant"
    value: float = 1.0

    def __call__(self, progress: float) -> float:
        _check_progress(progress)
        return float(self.value)


@dataclass(frozen=True)
class LinearRamp(_Base):
    """``start`` until ``warmup``, linear to ``end`` over ``duration``, then ``end``.

    ``duration=None`` ramps until ``p = 1``; ``duration=0`` jumps at ``warmup``.
    """

    kind = "linear_ramp"
    start: float = 0.0
    end: float = 1.0
    warmup: float = 0.0
    duration: Optional[float] = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.warmup <= 1.0:
            raise ValueError(f"warmup={self.warmup} must be a fraction of training in [0, 1]")
        if self.duration is not None and self.duration < 0:
            raise ValueError(f"duration={self.duration} must be >= 0 (a fraction of training)")

    def __call__(self, progress: float) -> float:
        p = _check_progress(progress)
        if p < self.warmup:
            return float(self.start)
        dur = (1.0 - self.warmup) if self.duration is None else self.duration
        frac = 1.0 if dur <= 0.0 else (p - self.warmup) / dur
        if frac >= 1.0 - 1e-12:  # float noise at the ramp's end (0.2 + 0.4 != 0.6)
            return float(self.end)
        return float(self.start + (self.end - self.start) * frac)


@dataclass(frozen=True)
class Exponential(_Base):
    """Geometric interpolation ``start * (end / start)^p`` (CSQ: ``exponential(1, 200)`` = ``200^p``)."""

    kind = "exponential"
    start: float = 1.0
    end: float = 200.0

    def __post_init__(self) -> None:
        if not (self.start > 0 and self.end > 0):
            raise ValueError(f"exponential needs positive start and end, got {self.start}, {self.end}")

    def __call__(self, progress: float) -> float:
        p = _check_progress(progress)
        return float(self.start * (self.end / self.start) ** p)


@dataclass(frozen=True)
class Cosine(_Base):
    """Half-cosine from ``start`` (p=0) to ``end`` (p=1)."""

    kind = "cosine"
    start: float = 1.0
    end: float = 0.0

    def __call__(self, progress: float) -> float:
        p = _check_progress(progress)
        return float(self.end + 0.5 * (self.start - self.end) * (1.0 + math.cos(math.pi * p)))


@dataclass(frozen=True)
class StepDecay(_Base):
    """``start * factor^k`` where ``k`` counts the milestones (fractions) already reached."""

    kind = "step_decay"
    start: float = 1.0
    factor: float = 0.1
    milestones: List[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        ms = [float(m) for m in self.milestones]
        if any(not 0.0 <= m <= 1.0 for m in ms) or ms != sorted(ms):
            raise ValueError(f"milestones={self.milestones} must be increasing fractions of training in [0, 1]")
        object.__setattr__(self, "milestones", ms)

    def __call__(self, progress: float) -> float:
        p = _check_progress(progress)
        k = sum(1 for m in self.milestones if p >= m)
        return float(self.start * self.factor**k)


@dataclass(frozen=True)
class Warmup(_Base):
    """``value`` during the first ``fraction`` of training, then ``inner`` on the remaining
    progress rescaled to [0, 1] (so an inner ramp starts where the warm-up ends)."""

    kind = "warmup"
    inner: Any = None
    fraction: float = 0.0
    value: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.inner, Mapping):
            object.__setattr__(self, "inner", schedule_from_dict(self.inner))
        if not isinstance(self.inner, Schedule):
            raise TypeError(f"Warmup.inner must be a Schedule, got {type(self.inner).__name__}")
        if not 0.0 <= self.fraction < 1.0:
            raise ValueError(f"warm-up fraction={self.fraction} must be in [0, 1)")

    def __call__(self, progress: float) -> float:
        p = _check_progress(progress)
        if p < self.fraction:
            return float(self.value)
        return float(self.inner((p - self.fraction) / (1.0 - self.fraction)))

    def state_dict(self) -> Dict[str, Any]:
        return {"type": self.kind, "inner": self.inner.state_dict(), "fraction": self.fraction, "value": self.value}


def schedule_from_dict(d: Mapping[str, Any]) -> Schedule:
    """Rebuild a schedule from its ``state_dict()``."""
    d = dict(d)
    kind = d.pop("type", None)
    if kind not in _REGISTRY:
        raise ValueError(f"unknown schedule type {kind!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[kind](**d)  # type: ignore[return-value]


# -- short constructors ----------------------------------------------------------------------
def constant(value: float = 1.0) -> Constant:
    return Constant(value)


def linear_ramp(start: float = 0.0, end: float = 1.0, warmup: float = 0.0,
                duration: Optional[float] = None) -> LinearRamp:
    return LinearRamp(start, end, warmup, duration)


def exponential(start: float = 1.0, end: float = 200.0) -> Exponential:
    return Exponential(start, end)


def cosine(start: float = 1.0, end: float = 0.0) -> Cosine:
    return Cosine(start, end)


def step_decay(start: float = 1.0, factor: float = 0.1, milestones: Sequence[float] = ()) -> StepDecay:
    return StepDecay(start, factor, list(milestones))


def warmup(inner: Schedule, fraction: float, value: float = 0.0) -> Warmup:
    return Warmup(inner, fraction, value)

