"""Integer arithmetic of the export: rounding shifts, dyadic multipliers, smallest dtypes.

Everything here works on Python ints / int64 numpy arrays only, so the integer executor and a
hardware implementation can follow it step by step. A real multiplier ``r`` is represented as
``m * 2^-k`` (``m`` a signed integer of at most ``mult_bits`` bits, ``k`` an integer); a power of
two has ``m = 1``.
"""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np

#: rounding modes understood by the integer requantizer (names as in ``mpq_plugin.core.ste``)
ROUNDING = ("half_even", "half_away")


def round_shift(n: np.ndarray, k: int, mode: str) -> np.ndarray:
    """``round(n / 2^k)`` for int64 ``n``, integer-only, with the tie rule ``mode``.

    ``k <= 0`` is an exact left shift. ``half_even``: ties to the even integer (``torch.round``,
    ``np.round``, ONNX/qonnx ``ROUND``, hls4ml ``AP_RND_CONV``); ``half_away``: ties away from 0
    (C ``round``; nnabla, the learned-range method's default).
    """
    n = np.asarray(n, dtype=np.int64)
    if mode not in ROUNDING:
        raise ValueError(f"rounding mode {mode!r}; use one of {ROUNDING}")
    if k <= 0:
        return n << np.int64(-k)
    k64 = np.int64(k)
    floor = n >> k64  # arithmetic shift: floor division by 2^k
    rem = n - (floor << k64)  # in [0, 2^k)
    half = np.int64(1) << np.int64(k - 1)
    up = rem > half
    tie = rem == half
    if mode == "half_even":
        up |= tie & ((floor & 1) == 1)
    else:  # half_away: a tie rounds up for n >= 0 (floor + 1), stays at floor for n < 0
        up |= tie & (n >= 0)
    return floor + up.astype(np.int64)


def pow2_exponent_of(x: float) -> int | None:
    """``e`` with ``x == 2^e`` exactly, else ``None``."""
    if not (x > 0 and math.isfinite(x)):
        return None
    m, e = math.frexp(x)  # x = m * 2^e, m in [0.5, 1)
    return e - 1 if m == 0.5 else None


def dyadic(r: float, mult_bits: int = 24) -> Tuple[int, int]:
    """``(m, k)`` with ``m * 2^-k`` the closest value to ``r`` with ``|m| < 2^(mult_bits-1)``.

    Exact (``m = ±1``, ``k = -e``) when ``|r| = 2^e``; ``r = 0`` gives ``(0, 0)``.
    """
    if r == 0:
        return 0, 0
    if not math.isfinite(r):
        raise ValueError(f"cannot express the non-finite multiplier {r!r} as m*2^-k")
    e = pow2_exponent_of(abs(r))
    sign = 1 if r > 0 else -1
    if e is not None:
        return sign, -e
    frac, exp = math.frexp(abs(r))  # |r| = frac * 2^exp, frac in [0.5, 1)
    k = (mult_bits - 1) - exp
    m = round(abs(r) * 2.0**k)
    if m >= 2 ** (mult_bits - 1):  # rounding carried into a new bit
        m, k = m // 2, k - 1
    while m % 2 == 0 and m:  # canonical form: odd mantissa
        m, k = m // 2, k - 1
    return sign * m, k


def dyadic_value(m: int, k: int) -> float:
    return float(m) * 2.0 ** (-k)


def signed_bits_for(lo: int, hi: int) -> int:
    """Width of the smallest two's-complement integer holding every value in ``[lo, hi]``."""
    bits = 1
    while not (-(2 ** (bits - 1)) <= lo and hi <= 2 ** (bits - 1) - 1):
        bits += 1
    return bits


def unsigned_bits_for(hi: int) -> int:
    return max(1, int(hi).bit_length())


def smallest_dtype(lo: int, hi: int) -> np.dtype:
    """Smallest numpy integer dtype holding ``[lo, hi]`` (unsigned when ``lo >= 0``)."""
    kinds = (np.uint8, np.uint16, np.uint32, np.uint64) if lo >= 0 else (np.int8, np.int16, np.int32, np.int64)
    for dt in kinds:
        info = np.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return np.dtype(dt)
    raise ValueError(f"values [{lo}, {hi}] do not fit in 64 bits")


def as_smallest(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.int64)
    if a.size == 0:
        return a.astype(np.int8)
    return a.astype(smallest_dtype(int(a.min()), int(a.max())))
