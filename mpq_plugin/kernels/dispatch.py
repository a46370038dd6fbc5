"""Pick the fake-quant implementation: Triton (fused kernels), compiled, or the eager reference.

``MPQ_KERNELS`` (read on every call) forces a path: ``triton``, ``compiled`` or ``eager``;
unset or ``auto`` picks the best that applies:

* ``triton`` -- a CUDA float32 tensor, a per-tensor scale, a float zero point and bounds, and
  triton importable;
* ``compiled`` -- a CPU tensor with at least :data:`COMPILE_MIN_NUMEL` elements (below that the
  ~1 s compile per new shape cannot pay off);
* ``eager`` -- everything else, and always while tracing (``torch.compile``/export, FX,
  ``torch.jit.trace``), so an outer tracer sees the plain reference ops.

A forced ``triton`` also runs CPU tensors when ``TRITON_INTERPRET=1`` was set before the first
dispatch; for arguments its kernel does not cover (per-channel scales, tensor zero points,
other dtypes) it falls back to ``compiled``. Each path in use is logged once at INFO.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from typing import Callable, Optional, Union

import torch

from mpq_plugin.kernels import compiled, reference

log = logging.getLogger(__name__)

BACKENDS = ("triton", "compiled", "eager")
ENV = "MPQ_KERNELS"
COMPILE_MIN_NUMEL = 1 << 20
_logged: set = set()
_triton_mod = None


def requested() -> str:
    """The path forced by ``MPQ_KERNELS`` (``auto`` when unset); raises on an unknown value."""
    value = os.environ.get(ENV, "").strip().lower() or "auto"
    if value not in BACKENDS + ("auto",):
        raise ValueError(f"{ENV}={value!r} is not a kernel path; use one of {BACKENDS + ('auto',)} or unset it")
    return value


def triton_available() -> bool:
    """True when triton can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _triton_module():
    global _triton_mod
    if _triton_mod is None:
        from mpq_plugin.kernels import triton_lsq  # imports triton: only on first Triton dispatch

        _triton_mod = triton_lsq
    return _triton_mod


def _is_plain(v: object) -> bool:
    return isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1 and v.dim() == 0)


def triton_supports(x: torch.Tensor, scale: torch.Tensor, zero_point, qmin, qmax) -> bool:
    """Whether the per-tensor Triton kernel covers these arguments (device aside)."""
    return (x.dtype == torch.float32 and scale.dtype == torch.float32 and scale.numel() == 1
            and isinstance(zero_point, (int, float)) and isinstance(qmin, (int, float))
            and isinstance(qmax, (int, float)))


def _tracing(x: torch.Tensor) -> bool:
    return (type(x) is not torch.Tensor and not isinstance(x, torch.nn.Parameter)) \
        or torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting()


def select(x: torch.Tensor, scale: torch.Tensor, zero_point=0.0, qmin=None, qmax=None,
           force: Optional[str] = None) -> str:
    """Name of the path :func:`fake_quantize` would run for these arguments."""
    want = force or requested()
    if want == "eager" or _tracing(x):
        return "eager"
    ok = triton_supports(x, scale, zero_point, qmin, qmax)
    if want == "triton":
        if not triton_available():
            raise ValueError(f"{ENV}=triton but triton is not installed; pip install triton or unset {ENV}")
        return "triton" if ok else "compiled"
    if want == "compiled":
        return "compiled"
    if x.is_cuda and ok and triton_available():
        return "triton"
    if not x.is_cuda and x.numel() >= COMPILE_MIN_NUMEL:
        return "compiled"
    return "eager"


def _impl(name: str) -> Callable:
    if name == "triton":
        return _triton_module().fake_quantize
    return compiled.fake_quantize if name == "compiled" else reference.fake_quantize


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: Union[torch.Tensor, float],
    qmin: Union[torch.Tensor, float],
    qmax: Union[torch.Tensor, float],
    rounding: str = "half_even",
) -> torch.Tensor:
    """:func:`mpq_plugin.core.affine.fake_quantize` on the best available path (same bits)."""
    name = select(x, scale, zero_point, qmin, qmax)
    if name not in _logged:
        _logged.add(name)
        log.info("mpq_plugin fake-quant kernels: %s path in use (%s=%s)", name, ENV, requested())
    return _impl(name)(x, scale, zero_point, qmin, qmax, rounding)
