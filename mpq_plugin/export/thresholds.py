"""FINN-style integer thresholds: requantization as comparisons instead of multiply+shift.

For a requantization ``code = clamp(round_shift(N * m, k), lo, hi)`` with ``m > 0`` (always:
scales are positive, a negative BN gamma is folded into the weight), the code is monotone in
``N``, so ``code = lo + #{j : N >= t_j}`` with one integer threshold ``t_j`` per code level
``j = lo+1 .. hi``: the smallest ``N`` whose rounded value reaches ``j``. For ``b``-bit codes
that is ``2^b - 1`` thresholds per channel (FINN's MultiThreshold), exact by construction
(the tie rule decides whether the threshold sits on or just above a tie).
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from mpq_plugin.export.plan import Bundle


def _threshold(j: int, m: int, k: int, rounding: str) -> int:
    """Smallest integer ``N`` with ``round(N * m / 2^k) >= j`` (``m > 0``)."""
    edge = Fraction(2 * j - 1, 2) * Fraction(2) ** k / m  # N*m/2^k == j - 1/2 exactly here
    n = math.ceil(edge)
    if n == edge:  # a tie: it rounds up to j for half_away when j - 1/2 > 0, for half_even when j is even
        up = (j - Fraction(1, 2) > 0) if rounding == "half_away" else (j % 2 == 0)
        if not up:
            n += 1
    return n


def requant_thresholds(m: np.ndarray, k: np.ndarray, lo: int, hi: int, rounding: str) -> np.ndarray:
    """``(features, hi - lo)`` int64 thresholds equivalent to the dyadic requantization."""
    m, k = np.atleast_1d(m), np.atleast_1d(k)
    if np.any(m <= 0):
        raise ValueError("thresholds need a positive requantization multiplier")
    out = np.empty((m.size, hi - lo), dtype=np.int64)
    cache = {}
    for i, (mi, ki) in enumerate(zip(m.tolist(), k.tolist())):
        key = (mi, ki)
        if key not in cache:
            cache[key] = [_threshold(j, mi, ki, rounding) for j in range(lo + 1, hi + 1)]
        out[i] = cache[key]
    return out


def add_thresholds(bundle: Bundle) -> None:
    """Add ``<layer>.thresholds`` for every requantizing layer (in place)."""
    for name, li in bundle.layers.items():
        inp = li["input"]
        req = inp["requant"]
        if req is None:
            continue
        t = requant_thresholds(bundle.arrays[req["multiplier_file"]], bundle.arrays[req["shift_file"]],
                               inp["code_min"], inp["code_max"], inp["rounding"])
        bundle.arrays[f"{name}.thresholds"] = t
        req["thresholds_file"] = f"{name}.thresholds"
        req["thresholds_note"] = ("code = code_min + count(N >= t[feature, j]); one row per input feature "
                                  "(or one row for all), code_max - code_min thresholds each")


def apply_thresholds(n: np.ndarray, t: np.ndarray, lo: int) -> np.ndarray:
    """``lo + #{j : N >= t[c, j]}`` along axis 1 of ``n`` (features/channels)."""
    shape = (1, t.shape[0]) + (1,) * (n.ndim - 2) if t.shape[0] > 1 else (1,) * n.ndim
    count = np.zeros(n.shape, dtype=np.int64)
    for j in range(t.shape[1]):
        count += n >= t[:, j].reshape(shape)
    return lo + count
