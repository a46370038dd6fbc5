"""Packed low-bit weights: the layout, and the CPU reference unpack + matmul.

Layout (one format for 1..8 bits, chosen so a GPU kernel finds any code with one load, one shift
and one mask): a weight ``(N, K)`` (``N`` output rows, ``K`` inputs) is stored as unsigned codes
``u = code - qmin`` in ``[0, 2^bits)``, ``cpw = 32 // bits`` codes per int32 word along ``K``:
code ``(n, k)`` is bits ``[(k % cpw) * bits, (k % cpw + 1) * bits)`` of word ``(n, k // cpw)``
(LSB first), giving a ``(N, ceil(K / cpw))`` int32 tensor; unused high bits and the padding of the
last word are zero. 1, 2, 4 and 8 bits fill words exactly; 3 bits holds 10 codes per word (30 of
32 bits used, 6.25 % overhead), 5/6/7 bits hold 6/5/4 codes. The dense byte stream of
:mod:`mpq_plugin.export.packing` (codes straddling bytes) is the bundle format for hardware; it
is not used here because a straddling 3-bit code needs two loads in a kernel.

Dequantization replays :meth:`mpq_plugin.core.state.QuantState.dequantize` op for op,
``((u + qmin).float() - zero_point) * scale`` in float32, so it is bit-exact with the fake-quant
weight. Everything here is torch-only and runs on any device.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

MAX_BITS = 8


def codes_per_word(bits: int) -> int:
    """Codes stored in one int32 word at ``bits`` bits (``32 // bits``)."""
    if not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"packed weights support 1..{MAX_BITS} bits, got {bits!r}; keep this layer unpacked")
    return 32 // bits


def packed_words(k: int, bits: int) -> int:
    """Number of int32 words per row for ``k`` codes."""
    cpw = codes_per_word(bits)
    return (k + cpw - 1) // cpw


def pack_rows(codes: torch.Tensor, bits: int, qmin: int) -> torch.Tensor:
    """Pack integer ``codes`` ``(N, K)`` in ``[qmin, qmin + 2^bits)`` into ``(N, W)`` int32 words."""
    cpw = codes_per_word(bits)
    if codes.dim() != 2:
        raise ValueError(f"pack_rows wants a 2-D (out, in) code tensor, got shape {tuple(codes.shape)}")
    u = codes.to(torch.int64) - qmin  # (N, K) unsigned codes
    if u.numel() and (int(u.min()) < 0 or int(u.max()) >= 1 << bits):
        raise ValueError(f"codes span [{int(codes.min())}, {int(codes.max())}], outside the {bits}-bit "
                         f"range [{qmin}, {qmin + (1 << bits) - 1}]")
    n, k = u.shape
    w = packed_words(k, bits)
    u = F.pad(u, (0, w * cpw - k)).reshape(n, w, cpw)  # (N, W, cpw), padding codes are 0
    shifts = torch.arange(cpw, device=u.device, dtype=torch.int64) * bits
    words = (u << shifts).sum(dim=-1)  # (N, W) in [0, 2^32): fields do not overlap
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def unpack_rows(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Unsigned codes ``(N, K)`` (int32, ``[0, 2^bits)``) of :func:`pack_rows` words."""
    cpw = codes_per_word(bits)
    shifts = torch.arange(cpw, device=packed.device, dtype=torch.int32) * bits
    # arithmetic shift of a negative word sign-extends, but the mask keeps only the field's bits
    u = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # (N, W, cpw) int32
    return u.reshape(packed.shape[0], -1)[:, :k]


def dequantize_packed(packed: torch.Tensor, bits: int, k: int, qmin: int,
                      zero_point: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float32 weight ``(N, K)``: ``((u + qmin) - zero_point[n]) * scale[n]`` (per-row or scalar)."""
    c = (unpack_rows(packed, bits, k) + qmin).to(torch.float32)  # (N, K) signed codes
    zp = zero_point.to(torch.float32).reshape(-1, 1) if zero_point.dim() else zero_point.to(torch.float32)
    s = scale.reshape(-1, 1) if scale.dim() else scale
    return (c - zp) * s


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bits: int, k: int, qmin: int,
                  zero_point: torch.Tensor, scale: torch.Tensor,
                  bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference ``x @ W^T + bias`` with ``W`` unpacked from ``packed`` (weight-only quantization)."""
    w = dequantize_packed(packed, bits, k, qmin, zero_point, scale).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def _fits_int8(t: torch.Tensor) -> bool:
    return t.numel() == 0 or (int(t.min()) >= -128 and int(t.max()) <= 127)


def int_linear(x_codes: torch.Tensor, x_zero_point: int, x_scale: torch.Tensor,
               packed: torch.Tensor, bits: int, k: int, qmin: int,
               zero_point: torch.Tensor, scale: torch.Tensor,
               bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Integer path: ``(x_codes - zx) @ (w_codes - zw)^T`` accumulated exactly, then rescaled.

    Codes are at most 8-bit, so every product fits 16 bits. When both offset operands fit int8
    the product runs as ``torch._int_mm`` (int8 x int8 -> int32 accumulators); otherwise (e.g.
    unsigned 8-bit activations) in int64, checked to fit int32 like an int32 accumulator. The
    float result is ``acc * (x_scale * scale[n]) + bias``.

    Raises:
        ValueError: a zero point is not an integer, or the accumulator would overflow int32.
    """
    zw = zero_point.to(torch.float64)
    if not torch.equal(zw, zw.round()):
        raise ValueError("the integer path needs integer weight zero points (e.g. not SDQ's 1-bit ±s "
                         "encoding); use the weight-only path for this layer")
    xi = x_codes.to(torch.int64) - int(x_zero_point)  # (..., K)
    wi = unpack_rows(packed, bits, k).to(torch.int64) + qmin - zero_point.to(torch.int64).reshape(-1, 1)  # (N, K)
    bound = int(xi.abs().max()) * int(wi.abs().sum(dim=1).max()) if xi.numel() and wi.numel() else 0
    if bound >= 1 << 31:
        raise ValueError(f"int32 accumulator would overflow (worst case {bound}); use the weight-only path")
    lead = xi.shape[:-1]
    x2 = xi.reshape(-1, k)  # (M, K)
    if _fits_int8(x2) and _fits_int8(wi) and hasattr(torch, "_int_mm"):
        acc = torch._int_mm(x2.to(torch.int8), wi.to(torch.int8).t())  # (M, N) int32 accumulators
    else:
        acc = (x2 @ wi.t()).to(torch.int32)  # (M, N) exact integer sums
    s = (x_scale.to(torch.float32) * scale.to(torch.float32)).reshape(-1)  # (N,) or (1,)
    y = acc.to(torch.float32) * s
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.reshape(*lead, -1)
