"""User-facing configuration: MPQConfig, Budget, BitPlan, and the method-options base.

Configs are frozen dataclasses validated at construction: a bad value fails where it was
written, with a message that says how to fix it.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence, Tuple, Union

MIN_BITS, MAX_BITS = 1, 16
BitRange = Tuple[int, int]


def as_bit_range(value: Union[int, Sequence[int]], what: str) -> BitRange:
    """Normalize ``4`` or ``(2, 8)`` to a validated ``(min_bits, max_bits)`` tuple."""
    if isinstance(value, bool) or not isinstance(value, (int, tuple, list)):
        raise TypeError(f"{what} must be an int or a (min_bits, max_bits) pair, got {value!r}")
    lo, hi = (value, value) if isinstance(value, int) else tuple(value)  # type: ignore[misc]
    if not (isinstance(lo, int) and isinstance(hi, int)):
        raise TypeError(f"{what} must hold integers, got {value!r}")
    if lo > hi:
        raise ValueError(f"{what}: min_bits={lo} > max_bits={hi}; swap them or lower min_bits")
    if lo < MIN_BITS or hi > MAX_BITS:
        raise ValueError(f"{what}={value!r} is outside {MIN_BITS}..{MAX_BITS} bits; choose bits in that range")
    return (lo, hi)


@dataclass(frozen=True)
class MethodOptions:
    """Base of each method's own options (a frozen dataclass per method).

    ``from_mapping`` rejects unknown keys with the list of allowed ones.
    """

    @classmethod
    def from_mapping(cls, options: Optional[Mapping[str, Any]]) -> "MethodOptions":
        options = dict(options or {})
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} for {cls.__name__}; allowed: {sorted(allowed)}"
            )
        return cls(**options)

    def to_dict(self) -> Dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class Budget:
    """Size constraints for a bit-width search; any subset may be set.

    Attributes:
        avg_weight_bits: parameter-weighted average weight bit-width.
        weight_kb: total weight memory in KB (1 KB = 1024 B), biases counted.
        act_kb_sum: sum over quantized activations of their per-sample memory in KB.
        act_kb_max: largest single quantized activation in KB.
        bops: bit operations per sample (MACs x weight bits x activation bits).
    """

    avg_weight_bits: Optional[float] = None
    weight_kb: Optional[float] = None
    act_kb_sum: Optional[float] = None
    act_kb_max: Optional[float] = None
    bops: Optional[float] = None

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"Budget.{f.name} must be a number, got {v!r}")
            if not v > 0 or v != v:
                raise ValueError(f"Budget.{f.name}={v!r} must be a positive number")
        if self.avg_weight_bits is not None and not (MIN_BITS <= self.avg_weight_bits <= MAX_BITS):
            raise ValueError(f"Budget.avg_weight_bits={self.avg_weight_bits} is outside {MIN_BITS}..{MAX_BITS}")

    def items(self) -> Iterator[Tuple[str, float]]:
        """The constraints that are set, as ``(name, limit)``."""
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None:
                yield f.name, float(v)

    def to_dict(self) -> Dict[str, float]:
        return dict(self.items())

    @classmethod
    def from_dict(cls, d: Optional[Mapping[str, Any]]) -> Optional["Budget"]:
        if d is None:
            return None
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - allowed)
        if unknown:
            raise ValueError(f"unknown budget key(s) {unknown}; allowed: {sorted(allowed)}")
        return cls(**d)


LayerOverride = Mapping[str, Any]
_OVERRIDE_KEYS = {"weight_bits", "act_bits", "skip"}


@dataclass(frozen=True)
class MPQConfig:
    """How to quantize a model: method, bit ranges, budget and which layers.

    Args:
        method: a registered method name (``mpq_plugin.list_methods()``).
        weight_bits: ``(min, max)`` bits a weight may take (an int fixes it).
        act_bits: activation bits: an int (fixed), a ``(min, max)`` pair (learned where the
            method learns activation bits), or ``None`` for float activations.
        budget: the :class:`Budget` the search must meet.
        per_channel: per-output-channel weight scales (methods that support it).
        quantize_embeddings: also quantize ``nn.Embedding`` weights.
        include: regexes of module names to quantize (empty: every supported layer).
        exclude: exact names or regexes of modules to keep float.
        layer_overrides: ``{name or regex: {"weight_bits": .., "act_bits": .., "skip": bool}}``.
            Precedence: exact name > regex (first match in order) > default.
        options: method-specific options, validated against the method's options class.

    Example:
        >>> MPQConfig(method="sdq", weight_bits=(2, 8), budget=Budget(avg_weight_bits=3.0))  # doctest: +ELLIPSIS
        MPQConfig(method='sdq', ...)
    """

    method: str = "sdq"
    weight_bits: BitRange = (2, 8)
    act_bits: Optional[Union[int, BitRange]] = 8
    budget: Optional[Budget] = None
    per_channel: bool = False
    quantize_embeddings: bool = False
    include: Tuple[str, ...] = ()
    exclude: Tuple[str, ...] = ()
    layer_overrides: Mapping[str, LayerOverride] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from mpq_plugin.registry import get_method

        if not isinstance(self.method, str):
            raise TypeError(f"method must be a string, got {self.method!r}")
        spec = get_method(self.method)
        object.__setattr__(self, "weight_bits", as_bit_range(self.weight_bits, "weight_bits"))
        if self.act_bits is not None:
            object.__setattr__(self, "act_bits", as_bit_range(self.act_bits, "act_bits"))
        if self.budget is not None and not isinstance(self.budget, Budget):
            if isinstance(self.budget, Mapping):
                object.__setattr__(self, "budget", Budget.from_dict(self.budget))
            else:
                raise TypeError(f"budget must be a Budget or a dict, got {type(self.budget).__name__}")
        if self.budget is not None and self.budget.avg_weight_bits is not None:
            lo, hi = self.weight_bits
            if self.budget.avg_weight_bits < lo:
                raise ValueError(
                    f"budget avg_weight_bits={self.budget.avg_weight_bits} is below the minimum "
                    f"weight_bits={lo}; no bit assignment can meet it: raise the budget or lower min bits"
                )
        for name in ("include", "exclude"):
            v = getattr(self, name)
            if isinstance(v, str):
                v = (v,)
            v = tuple(v)
            for pat in v:
                _compile(pat, name)
            object.__setattr__(self, name, v)
        overrides = {}
        for key, ov in dict(self.layer_overrides).items():
            _compile(key, "layer_overrides")
            bad = sorted(set(ov) - _OVERRIDE_KEYS)
            if bad:
                raise ValueError(f"layer_overrides[{key!r}] has unknown key(s) {bad}; allowed: {sorted(_OVERRIDE_KEYS)}")
            ov = dict(ov)
            if "weight_bits" in ov:
                ov["weight_bits"] = as_bit_range(ov["weight_bits"], f"layer_overrides[{key!r}].weight_bits")
            if ov.get("act_bits") is not None:
                ov["act_bits"] = as_bit_range(ov["act_bits"], f"layer_overrides[{key!r}].act_bits")
            overrides[key] = ov
        object.__setattr__(self, "layer_overrides", overrides)
        object.__setattr__(self, "options", dict(self.options))
        spec.options_cls.from_mapping(self.options)  # validate now, fail at construction

    @property
    def method_options(self) -> MethodOptions:
        """The method's own options object."""
        from mpq_plugin.registry import get_method

        return get_method(self.method).options_cls.from_mapping(self.options)

    def replace(self, **changes: Any) -> "MPQConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "method": self.method,
            "weight_bits": list(self.weight_bits),
            "act_bits": list(self.act_bits) if self.act_bits is not None else None,  # type: ignore[arg-type]
            "budget": self.budget.to_dict() if self.budget else None,
            "per_channel": self.per_channel,
            "quantize_embeddings": self.quantize_embeddings,
            "include": list(self.include),
            "exclude": list(self.exclude),
            "layer_overrides": {k: {kk: (list(vv) if isinstance(vv, tuple) else vv) for kk, vv in v.items()}
                                for k, v in self.layer_overrides.items()},
            "options": dict(self.options),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MPQConfig":
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - allowed)
        if unknown:
            raise ValueError(f"unknown MPQConfig key(s) {unknown}; allowed: {sorted(allowed)}")
        d = dict(d)
        for k in ("weight_bits", "act_bits"):
            if isinstance(d.get(k), list):
                d[k] = tuple(d[k])
        if "budget" in d:
            d["budget"] = Budget.from_dict(d["budget"])
        for k in ("include", "exclude"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def __hash__(self) -> int:  # dict fields: hash the canonical JSON
        return hash(self.to_json())


def _compile(pattern: str, where: str) -> "re.Pattern[str]":
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{where}: {pattern!r} is not a valid regex ({e})") from None


@dataclass(frozen=True)
class LayerBits:
    """Frozen bit-widths of one layer (``act_bits`` is ``None`` for float activations)."""

    weight_bits: int
    act_bits: Optional[int] = None
    weight_params: int = 0

    def to_dict(self) -> Dict[str, Any]:
        return {"weight_bits": self.weight_bits, "act_bits": self.act_bits, "weight_params": self.weight_params}


@dataclass
class BitPlan(Mapping[str, LayerBits]):
    """The learned plan: per-layer bit-widths, what search emits and export reads.

    ``to_dict()`` is the flat per-layer mapping ``{"layer1.0.conv1": {"weight_bits": 4, ...}}``;
    ``to_json()`` also stores the method and the achieved cost.
    """

    layers: Dict[str, LayerBits]
    method: str = ""
    cost: Dict[str, float] = field(default_factory=dict)
    budget: Optional[Budget] = None

    def __getitem__(self, key: str) -> LayerBits:
        return self.layers[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def avg_weight_bits(self) -> float:
        n = sum(lb.weight_params for lb in self.layers.values())
        return sum(lb.weight_bits * lb.weight_params for lb in self.layers.values()) / max(n, 1)

    def to_dict(self) -> Dict[str, Dict[str, Any]]:
        return {name: lb.to_dict() for name, lb in self.layers.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BitPlan":
        if "layers" in d and isinstance(d["layers"], Mapping):
            return cls(
                {k: LayerBits(**v) for k, v in d["layers"].items()},
                method=d.get("method", ""),
                cost=dict(d.get("cost", {})),
                budget=Budget.from_dict(d.get("budget")),
            )
        return cls({k: LayerBits(**v) for k, v in d.items()})

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps({"method": self.method, "cost": self.cost,
                           "budget": self.budget.to_dict() if self.budget else None,
                           "layers": self.to_dict()}, indent=indent, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "BitPlan":
        return cls.from_dict(json.loads(text))

    def save(self, path: Union[str, Path]) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: Union[str, Path]) -> "BitPlan":
        return cls.from_json(Path(path).read_text())
