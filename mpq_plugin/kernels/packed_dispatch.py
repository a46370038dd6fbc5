"""Pick the packed-linear implementation: the Triton kernel, compiled, or the torch reference.

Reads the same ``MPQ_KERNELS`` variable as the fake-quant dispatcher (:mod:`.dispatch`), on every
call: ``triton`` forces the Triton kernel (raises if triton is not installed; CPU tensors need
``TRITON_INTERPRET=1`` set before the first dispatch), ``eager`` runs the torch reference,
``compiled`` the compiled path below; unset or ``auto`` picks Triton for CUDA tensors when
triton is importable, ``compiled`` for CPU weights of at least :data:`COMPILE_MIN_NUMEL` codes, the reference otherwise, and always the reference while tracing.
``compiled`` is ``torch.compile`` of the reference unpack + dequantize (one fused pass writing the
float weight, bit-exact with the reference) followed by ``F.linear``; it is built on first use and
costs a compile per new weight shape. Each path in use is logged once at INFO.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from typing import Optional

import torch
import torch.nn.functional as F

from mpq_plugin.kernels import packed_ref

log = logging.getLogger(__name__)

ENV = "MPQ_KERNELS"
_CHOICES = ("triton", "compiled", "eager", "auto")
COMPILE_MIN_NUMEL = 1 << 20
_logged: set = set()
_triton_mod = None
_compiled_dequant = None


def _requested() -> str:
    value = os.environ.get(ENV, "").strip().lower() or "auto"
    if value not in _CHOICES:
        raise ValueError(f"{ENV}={value!r} is not a kernel path; use one of {_CHOICES} or unset it")
    return value


def triton_available() -> bool:
    """True when triton can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _triton():
    global _triton_mod
    if _triton_mod is None:
        from mpq_plugin.kernels import triton_packed  # imports triton: first Triton dispatch only

        _triton_mod = triton_packed
    return _triton_mod


def _compiled_linear(x: torch.Tensor, packed: torch.Tensor, bits: int, k: int, qmin: int,
                     zero_point: torch.Tensor, scale: torch.Tensor,
                     bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    global _compiled_dequant
    if _compiled_dequant is None:
        _compiled_dequant = torch.compile(packed_ref.dequantize_packed, dynamic=False)
    w = _compiled_dequant(packed, bits, k, qmin, zero_point, scale).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def select(x: torch.Tensor, weight_numel: int = 0) -> str:
    """``"triton"``, ``"compiled"`` or ``"reference"``: the path :func:`packed_linear` takes."""
    want = _requested()
    tracing = torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting()
    if want == "triton":
        if not triton_available():
            raise ValueError(f"{ENV}=triton but triton is not installed; pip install triton or unset {ENV}")
        return "reference" if tracing else "triton"
    if tracing or want == "eager":
        return "reference"
    if want == "compiled":
        return "compiled"
    if x.is_cuda and triton_available():
        return "triton"
    return "compiled" if not x.is_cuda and weight_numel >= COMPILE_MIN_NUMEL else "reference"


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bits: int, k: int, qmin: int,
                  zero_point: torch.Tensor, scale: torch.Tensor,
                  bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ W^T + bias`` from packed weights on the selected path (see the module docstring)."""
    name = select(x, packed.shape[0] * k)
    if name not in _logged:
        _logged.add(name)
        log.info("mpq_plugin packed linear: %s path in use (%s=%s)", name, ENV, _requested())
    impl = {"triton": lambda: _triton().packed_linear, "compiled": lambda: _compiled_linear,
            "reference": lambda: packed_ref.packed_linear}[name]()
    return impl(x, packed, bits, k, qmin, zero_point, scale, bias)
