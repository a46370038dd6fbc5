"""Torch-only quantization math: pure functions, no module swapping, no host library."""
from mpq_plugin.core.ste import ROUNDING_MODES, ceil_ste, floor_ste, grad_scale, round_nograd, round_ste
from mpq_plugin.core.affine import (
    fake_quantize,
    float_range,
    int_range,
    pow2_round_ste,
    quantize_codes,
    reshape_for_axis,
)
from mpq_plugin.core.state import QuantState

__all__ = [
    "ROUNDING_MODES",
    "QuantState",
    "ceil_ste",
    "fake_quantize",
    "float_range",
    "grad_scale",
    "round_nograd",
    "floor_ste",
    "int_range",
    "pow2_round_ste",
    "quantize_codes",
    "reshape_for_axis",
    "round_ste",
]
