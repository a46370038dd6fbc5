"""Affine fake quantization and its helpers, written as pure functions.

Bit-widths enter as tensors (``qmin``/``qmax`` tensors), so a bit-width that changes during a
search never triggers a ``torch.compile`` recompile.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from mpq_plugin.core.ste import round_nograd, round_ste

TensorOrFloat = Union[torch.Tensor, float]


def int_range(bits: torch.Tensor | int, signed: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Integer code range of a ``bits``-bit two's-complement (signed) or unsigned integer.

    Signed: ``[-2^(b-1), 2^(b-1) - 1]``; unsigned: ``[0, 2^b - 1]``. ``bits`` may be a tensor.
    """
    b = torch.as_tensor(bits, dtype=torch.float32)
    if signed:
        return -(2.0 ** (b - 1)), 2.0 ** (b - 1) - 1
    return torch.zeros_like(b), 2.0**b - 1


def float_range(bits: int, signed: bool) -> Tuple[float, float]:
    """:func:`int_range` as Python floats (same values). Integer ``bits`` are computed in plain
    Python: no tensor ops per forward pass, and ``torch.compile`` folds them into constants instead
    of breaking the graph on a host read."""
    if isinstance(bits, int) and not isinstance(bits, bool):
        if signed:
            return -float(2 ** (bits - 1)), float(2 ** (bits - 1) - 1)
        return 0.0, float(2**bits - 1)
    qmin, qmax = int_range(bits, signed)
    return float(qmin), float(qmax)


def reshape_for_axis(p: torch.Tensor, x: torch.Tensor, axis: Optional[int]) -> torch.Tensor:
    """View a per-channel parameter ``p`` (shape ``(C,)``) so it broadcasts along ``axis`` of ``x``."""
    if axis is None or p.numel() == 1:
        return p.reshape(()) if p.numel() == 1 else p
    shape = [1] * x.dim()
    shape[axis] = -1
    return p.reshape(shape)


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: TensorOrFloat,
    qmin: TensorOrFloat,
    qmax: TensorOrFloat,
    rounding: str = "half_even",
) -> torch.Tensor:
    """``(clamp(round(x / s) + z, qmin, qmax) - z) * s`` with straight-through rounding.

    The clamp is applied before rounding (``round(clamp(x/s, qmin - z, qmax - z)) + z``: the
    same values for integer ``z``), so autograd gives exactly the LSQ gradients: ``dx = 1``
    inside the range and 0 outside; ``ds = round(x/s) - x/s`` inside and ``qmin - z`` /
    ``qmax - z`` outside. ``scale``/``zero_point`` must already broadcast against ``x``
    (see :func:`reshape_for_axis`).
    """
    v = torch.clamp(x / scale, qmin - zero_point, qmax - zero_point)
    q = round_ste(v, rounding) + zero_point  # same shape as x, integers in [qmin, qmax]
    return (q - zero_point) * scale


def quantize_codes(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: TensorOrFloat,
    qmin: TensorOrFloat,
    qmax: TensorOrFloat,
    rounding: str = "half_even",
) -> torch.Tensor:
    """Integer codes of :func:`fake_quantize` (int64), with no gradient."""
    with torch.no_grad():
        v = torch.clamp(x / scale, qmin - zero_point, qmax - zero_point)
        q = round_nograd(v, rounding) + zero_point
    return q.to(torch.int64)


def pow2_round_ste(x: torch.Tensor) -> torch.Tensor:
    """``2^round(log2 x)`` for ``x > 0``; backward ``2^round(log2 x) / x`` (STE on the exponent)."""
    return torch.pow(2.0, round_ste(torch.log2(x)))


def pow2_exponent(x: torch.Tensor) -> torch.Tensor:
    """Integer exponent ``e`` with ``2^e == pow2_round(x)`` (int64, no gradient)."""
    with torch.no_grad():
        return torch.round(torch.log2(x)).to(torch.int64)
