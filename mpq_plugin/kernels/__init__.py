"""Fake-quant kernels: fused Triton (GPU), ``torch.compile`` (CPU) and the eager reference.

``fake_quantize`` is the entry point; :mod:`.dispatch` picks the path (``MPQ_KERNELS`` forces
one). Importing this package does not import triton. See ``docs/kernels.md``.
"""
from mpq_plugin.kernels.dispatch import BACKENDS, fake_quantize, requested, select

__all__ = ["BACKENDS", "fake_quantize", "requested", "select"]
