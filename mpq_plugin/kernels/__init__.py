"""Fake-quant kernels: fused Triton (GPU), ``torch.compile`` (CPU) and the eager reference.

One dispatched entry point per method's quantizer (``fake_quantize`` for LSQ, ``sdq_select`` /
``sdq_interpolate``, ``uniform_fake_quant`` / ``pow2_fake_quant``, ``bitplane_weight`` /
``pact_quantize``); :mod:`.dispatch` picks the path (``MPQ_KERNELS`` forces one). Importing this
package does not import triton. See ``docs/kernels.md``.
"""
from mpq_plugin.kernels.dispatch import BACKENDS, fake_quantize, requested, run, select, select_op
from mpq_plugin.kernels.ops import (
    bitplane_weight,
    pact_quantize,
    pow2_fake_quant,
    sdq_interpolate,
    sdq_select,
    uniform_fake_quant,
)

__all__ = ["BACKENDS", "bitplane_weight", "fake_quantize", "pact_quantize", "pow2_fake_quant", "requested",
           "run", "sdq_interpolate", "sdq_select", "select", "select_op", "uniform_fake_quant"]
