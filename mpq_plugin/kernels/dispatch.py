"""Pick the fake-quant implementation per op: Triton (fused kernels), compiled, or the eager reference.

Ops (each one method's quantizer, the reference is the pure core function of the same name):
``fake_quantize`` (LSQ, per-tensor and per-channel), ``sdq_select`` / ``sdq_interpolate`` (SDQ's
pair of adjacent bit-widths), ``uniform_fake_quant`` / ``pow2_fake_quant`` (learned range),
``bitplane_weight`` / ``pact_quantize`` (CSQ weights / activations).

``MPQ_KERNELS`` (looked up on every call, parsed only when its value changes) forces a path:
``triton``, ``compiled`` or ``eager``; unset or ``auto`` picks the best that applies:

* ``triton`` -- a CUDA tensor, arguments the op's Triton kernel covers (float32, per-tensor or
  per-channel parameters, float bounds; see ``triton_supports``), and triton importable;
* ``compiled`` -- a CPU tensor with at least :data:`COMPILE_MIN_NUMEL` elements (below that the
  one-off compile cannot pay off; after the second shape inductor compiles shape-generic, so a
  training loop compiles each op about twice per process), or :data:`OP_COMPILE_MIN_NUMEL` for
  ops whose compiled form matches eager to float tolerance only (CSQ's plane sum);
* ``eager`` -- everything else, and always while tracing (``torch.compile``/export, FX,
  ``torch.jit.trace``), so an outer tracer sees the plain reference ops.

A forced ``triton`` also runs CPU tensors when ``TRITON_INTERPRET=1`` was set before the first
dispatch; for arguments (or ops) its kernels do not cover it falls back to ``compiled``. Each
(op, path) pair in use is logged once at INFO.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch

from mpq_plugin.kernels import compiled, reference

log = logging.getLogger(__name__)

BACKENDS = ("triton", "compiled", "eager")
ENV = "MPQ_KERNELS"
COMPILE_MIN_NUMEL = 1 << 16
#: per-op thresholds overriding :data:`COMPILE_MIN_NUMEL`: CSQ's compiled synthesis is exact to
#: float tolerance only, so it stays eager on the (small) weights of ordinary layers
OP_COMPILE_MIN_NUMEL: Dict[str, int] = {"bitplane_weight": 1 << 20}
_logged: set = set()
_env_cache: Tuple[Optional[str], str] = ("", "auto")  # (raw MPQ_KERNELS, parsed) of the last lookup

#: op -> (module under mpq_plugin.kernels, function) of its Triton implementation
TRITON_OPS: Dict[str, Tuple[str, str]] = {
    "fake_quantize": ("triton_lsq", "fake_quantize"),
    "sdq_select": ("triton_sdq", "sdq_select"),
    "uniform_fake_quant": ("triton_learned_range", "uniform_fake_quant"),
    "bitplane_weight": ("triton_csq", "bitplane_weight"),
}


def requested() -> str:
    """The path forced by ``MPQ_KERNELS`` (``auto`` when unset); raises on an unknown value."""
    global _env_cache
    raw = os.environ.get(ENV, "")
    if raw == _env_cache[0]:
        return _env_cache[1]
    value = raw.strip().lower() or "auto"
    if value not in BACKENDS + ("auto",):
        raise ValueError(f"{ENV}={value!r} is not a kernel path; use one of {BACKENDS + ('auto',)} or unset it")
    _env_cache = (raw, value)
    return value


def triton_available() -> bool:
    """True when triton can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _triton_fn(op: str) -> Callable:
    """The Triton implementation of ``op`` (imports triton: only on first Triton dispatch)."""
    mod, attr = TRITON_OPS[op]
    return getattr(importlib.import_module(f"mpq_plugin.kernels.{mod}"), attr)


def _triton_module():
    """The LSQ Triton module (kept for the benchmark and older callers)."""
    return importlib.import_module("mpq_plugin.kernels.triton_lsq")


def _f32(*ts: Any) -> bool:
    return all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in ts)


def _num(*vs: Any) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vs)


def channel_axis(x: torch.Tensor, scale: torch.Tensor) -> Optional[int]:
    """Axis of a per-channel ``scale`` broadcast against ``x`` (``-1``: per-tensor; ``None``: other)."""
    if scale.numel() == 1:
        return -1
    if scale.dim() == 1 and x.dim() >= 1 and scale.shape[0] == x.shape[-1]:
        return x.dim() - 1
    if scale.dim() != x.dim():
        return None
    big = [i for i, (a, b) in enumerate(zip(scale.shape, x.shape)) if a != 1]
    if len(big) == 1 and scale.shape[big[0]] == x.shape[big[0]]:
        return big[0]
    return None


def triton_supports(x: torch.Tensor, scale: torch.Tensor, zero_point, qmin, qmax) -> bool:
    """Whether the LSQ Triton kernel covers these arguments (device aside)."""
    return _f32(x, scale) and _num(zero_point, qmin, qmax) and channel_axis(x, scale) is not None


def op_triton_supports(op: str, args: Tuple[Any, ...]) -> bool:
    """Whether ``op``'s Triton kernel covers ``args`` (device aside)."""
    if op not in TRITON_OPS:
        return False
    if op == "fake_quantize":
        return triton_supports(*args[:5])
    if op == "sdq_select":
        x, z, zg, s_hi, s_lo = args[:5]
        return (_f32(x, zg, s_hi, s_lo) and z.numel() == 1 and zg.numel() == 1 and _num(*args[5:9])
                and s_hi.shape == s_lo.shape and channel_axis(x, s_hi) is not None)
    if op == "uniform_fake_quant":
        x, d, q = args[:3]
        return _f32(x, d, q) and d.numel() == 1 and q.numel() == 1
    if op == "bitplane_weight":
        p, n, masks, s, temp = args[:5]
        return (_f32(p, n, masks, s, temp) and p.shape == n.shape and p.dim() >= 1
                and masks.shape == (p.shape[-1],) and s.numel() == 1 and temp.numel() == 1
                and not temp.requires_grad)
    return False


def _tracing(x: torch.Tensor) -> bool:
    return (type(x) is not torch.Tensor and not isinstance(x, torch.nn.Parameter)) \
        or torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting()


def select_path(x: torch.Tensor, triton_ok: Union[bool, Callable[[], bool]], force: Optional[str] = None,
                min_numel: Optional[int] = None) -> str:
    """Path for an op on ``x`` whose Triton kernel covers its arguments when ``triton_ok``.

    ``triton_ok`` may be a callable, evaluated only where the answer matters (a CUDA tensor or a
    forced ``triton``), which keeps the per-call cost of CPU dispatch low. ``min_numel``: the
    compile threshold (default :data:`COMPILE_MIN_NUMEL`).
    """
    want = force or requested()
    if want == "eager" or _tracing(x):
        return "eager"
    if want == "triton":
        if not triton_available():
            raise ValueError(f"{ENV}=triton but triton is not installed; pip install triton or unset {ENV}")
        return "triton" if _truth(triton_ok) else "compiled"
    if want == "compiled":
        return "compiled"
    if x.is_cuda:
        return "triton" if _truth(triton_ok) and triton_available() else "eager"
    if x.numel() >= (COMPILE_MIN_NUMEL if min_numel is None else min_numel):
        return "compiled"
    return "eager"


def _truth(v: Union[bool, Callable[[], bool]]) -> bool:
    return v() if callable(v) else bool(v)


def select(x: torch.Tensor, scale: torch.Tensor, zero_point=0.0, qmin=None, qmax=None,
           force: Optional[str] = None) -> str:
    """Name of the path :func:`fake_quantize` would run for these arguments."""
    return select_path(x, lambda: triton_supports(x, scale, zero_point, qmin, qmax), force)


def select_op(op: str, *args: Any, force: Optional[str] = None) -> str:
    """Name of the path :func:`run` would take for ``op`` on ``args``."""
    return select_path(args[0], lambda: op_triton_supports(op, args), force, OP_COMPILE_MIN_NUMEL.get(op))


def run(op: str, *args: Any) -> torch.Tensor:
    """Run ``op`` (a reference function name) on the best available path: same bits as eager."""
    name = select_op(op, *args)
    key = (op, name)
    if key not in _logged and not torch.compiler.is_compiling():  # a log call while tracing breaks the graph
        _logged.add(key)
        log.info("mpq_plugin fake-quant kernels: %s path in use for %s (%s=%s)", name, op, ENV, requested())
    if name == "triton":
        return _triton_fn(op)(*args)
    if name == "compiled":
        return compiled.run(op, *args)
    return getattr(reference, op)(*args)


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: Union[torch.Tensor, float],
    qmin: Union[torch.Tensor, float],
    qmax: Union[torch.Tensor, float],
    rounding: str = "half_even",
) -> torch.Tensor:
    """:func:`mpq_plugin.core.affine.fake_quantize` on the best available path (same bits)."""
    return run("fake_quantize", x, scale, zero_point, qmin, qmax, rounding)
