"""Integer helpers of the export: rounding shifts, dyadic multipliers, smallest dtypes."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from mpq_plugin.export.intmath import (as_smallest, dyadic, dyadic_value, pow2_exponent_of, round_shift,
                                       signed_bits_for, smallest_dtype)


def _ref(n: int, k: int, mode: str) -> int:
    q = Fraction(n, 2**k)
    fl = q.numerator // q.denominator
    r = q - fl
    if r > Fraction(1, 2):
        return fl + 1
    if r < Fraction(1, 2):
        return fl
    if mode == "half_even":
        return fl + (fl % 2)
    return fl + 1 if n >= 0 else fl


@pytest.mark.parametrize("mode", ["half_even", "half_away"])
@pytest.mark.parametrize("k", [0, 1, 2, 3, 7])
def test_round_shift_matches_exact_rationals(mode, k):
    n = np.arange(-300, 301, dtype=np.int64)
    got = round_shift(n, k, mode)
    assert got.tolist() == [_ref(int(v), k, mode) for v in n]


def test_round_shift_matches_torch_round_and_left_shift():
    n = np.arange(-64, 65, dtype=np.int64)
    np.testing.assert_array_equal(round_shift(n, 3, "half_even"), np.round(n / 8).astype(np.int64))
    np.testing.assert_array_equal(round_shift(n, -2, "half_even"), n * 4)
    with pytest.raises(ValueError, match="rounding mode"):
        round_shift(n, 1, "floor")


def test_dyadic_exact_for_powers_of_two_and_close_otherwise():
    assert dyadic(0.25) == (1, 2) and dyadic(-8.0) == (-1, -3) and dyadic(0.0) == (0, 0)
    for r in (0.1, 1 / 49, 3.7e-4, -123.456):
        m, k = dyadic(r, 24)
        assert abs(m) < 2**23
        assert abs(dyadic_value(m, k) - r) <= abs(r) * 2.0**-22
    assert pow2_exponent_of(0.125) == -3 and pow2_exponent_of(0.1) is None


def test_widths_and_smallest_dtypes():
    assert signed_bits_for(-8, 7) == 4 and signed_bits_for(-9, 7) == 5 and signed_bits_for(0, 1) == 2
    assert smallest_dtype(-128, 127) == np.int8 and smallest_dtype(0, 255) == np.uint8
    assert smallest_dtype(-129, 0) == np.int16 and smallest_dtype(0, 70000) == np.uint32
    assert as_smallest(np.array([-3, 5])).dtype == np.int8


@pytest.mark.parametrize("bits,signed", [(1, False), (2, True), (3, True), (4, False), (5, True), (8, True)])
def test_packed_bitstream_round_trip_and_size(bits, signed):
    from mpq_plugin.export.packing import pack_codes, unpack_codes

    rng = np.random.default_rng(bits)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    codes = rng.integers(lo, hi + 1, size=37)
    data = pack_codes(codes, bits, signed)
    assert len(data) == (37 * bits + 7) // 8
    np.testing.assert_array_equal(unpack_codes(data, bits, 37, signed), codes)


def test_packed_layout_is_lsb_first_and_bipolar_is_one_bit():
    from mpq_plugin.export.packing import pack_codes, unpack_codes

    assert pack_codes(np.array([1, -1]), 4) == bytes([0xF1])  # field 0 = 0001, field 1 = 1111
    bip = np.array([1, -1, -1, 1, 1, 1, -1, 1, -1])
    data = pack_codes(bip, 2, bipolar=True)
    assert len(data) == 2 and data[0] == 0b10111001
    np.testing.assert_array_equal(unpack_codes(data, 2, 9, bipolar=True), bip)
    with pytest.raises(ValueError, match="outside the 3-bit range"):
        pack_codes(np.array([4]), 3)
