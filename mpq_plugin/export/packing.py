"""Packed bit-streams: integer codes at their exact bit-width, for weight memories.

Layout: codes in C order (row-major over the weight shape), each as a ``bits``-wide two's
complement field (offset-free: the low ``bits`` bits of the value), concatenated LSB first
into a byte stream (field ``i`` occupies stream bits ``[i*bits, (i+1)*bits)``, stream bit ``j``
is bit ``j % 8`` of byte ``j // 8``); the last byte is zero-padded. Bipolar codes (±1) pack as
1 bit: 1 for +1, 0 for -1.
"""
from __future__ import annotations

import numpy as np


def pack_codes(codes: np.ndarray, bits: int, signed: bool = True, bipolar: bool = False) -> bytes:
    """Pack integer ``codes`` into ``bits``-wide fields (see the module docstring)."""
    c = np.asarray(codes, dtype=np.int64).reshape(-1)
    if bipolar:
        if not np.all(np.abs(c) == 1):
            raise ValueError("bipolar packing needs codes in {-1, +1}")
        c, bits, signed = (c > 0).astype(np.int64), 1, False
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    if c.size and (c.min() < lo or c.max() > hi):
        raise ValueError(f"codes span [{c.min()}, {c.max()}], outside the {bits}-bit range [{lo}, {hi}]")
    u = (c & ((1 << bits) - 1)).astype(np.uint64)
    fields = ((u[:, None] >> np.arange(bits, dtype=np.uint64)) & 1).astype(np.uint8)  # (n, bits), LSB first
    return np.packbits(fields.reshape(-1), bitorder="little").tobytes()


def unpack_codes(data: bytes, bits: int, count: int, signed: bool = True, bipolar: bool = False) -> np.ndarray:
    """Inverse of :func:`pack_codes`: ``count`` int64 codes."""
    if bipolar:
        return unpack_codes(data, 1, count, signed=False) * 2 - 1
    stream = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")[: count * bits]
    fields = stream.reshape(count, bits).astype(np.int64)
    v = (fields << np.arange(bits, dtype=np.int64)).sum(axis=1)
    if signed:
        v = np.where(v >= 2 ** (bits - 1), v - 2**bits, v)
    return v
