"""Per-layer settings resolved from an MPQConfig.

Precedence (highest first): ``exclude`` (name or regex) > ``layer_overrides`` exact name >
``layer_overrides`` regex (first full match, in insertion order) > ``include`` filter > defaults.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Tuple

from mpq_plugin.config import BitRange, MPQConfig


@dataclass(frozen=True)
class LayerSettings:
    """Resolved settings of one layer; ``None`` from :func:`resolve_layer` means keep it float."""

    weight_bits: BitRange
    act_bits: Optional[BitRange]


def _matches(pattern: str, name: str) -> bool:
    return pattern == name or re.fullmatch(pattern, name) is not None


def resolve_layer(name: str, config: MPQConfig) -> Optional[LayerSettings]:
    """Settings for the module called ``name``, or ``None`` if it stays float."""
    if any(_matches(p, name) for p in config.exclude):
        return None
    override = config.layer_overrides.get(name)
    if override is None:
        override = next((ov for pat, ov in config.layer_overrides.items() if _matches(pat, name)), None)
    if config.include and override is None and not any(_matches(p, name) for p in config.include):
        return None
    weight_bits: Tuple[int, int] = config.weight_bits
    act_bits = config.act_bits
    if override is not None:
        if override.get("skip"):
            return None
        weight_bits = override.get("weight_bits", weight_bits)
        act_bits = override.get("act_bits", act_bits)
    return LayerSettings(weight_bits, act_bits)  # type: ignore[arg-type]
