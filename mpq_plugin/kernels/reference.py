"""The eager reference path: the pure core functions, unchanged (every other path is tested against them)."""
from __future__ import annotations

from mpq_plugin.core.affine import fake_quantize
from mpq_plugin.core.bitplane import bitplane_weight, pact_quantize
from mpq_plugin.core.mixture import sdq_interpolate, sdq_select
from mpq_plugin.core.range_quant import pow2_fake_quant, uniform_fake_quant

__all__ = ["bitplane_weight", "fake_quantize", "pact_quantize", "pow2_fake_quant", "sdq_interpolate",
           "sdq_select", "uniform_fake_quant"]
