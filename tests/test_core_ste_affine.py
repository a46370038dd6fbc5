"""core/ste.py, core/affine.py, core/bitwidth.py and core/state.py against slow references and
hand-written gradients (LSQ Eq. 3, Uhlich et al. §2.3-2.4)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mpq_plugin.core import (
    QuantState,
    ceil_ste,
    fake_quantize,
    floor_ste,
    grad_scale,
    int_range,
    pow2_round_ste,
    quantize_codes,
    reshape_for_axis,
    round_nograd,
    round_ste,
)
from mpq_plugin.core.affine import pow2_exponent
from mpq_plugin.core.bitwidth import (
    bits_to_qmax,
    interpolated_bits,
    kept_plane_bits,
    learned_range_bits,
    learned_range_pow2_bits,
)
from tests import reference as ref

LN2 = math.log(2.0)
HYP = settings(max_examples=40, deadline=None)

# ---------------------------------------------------------------------------------------------
# rounding STEs
# ---------------------------------------------------------------------------------------------
TIES = [0.5, 1.5, -0.5, -2.5, 2.5, -1.5]
EXPECTED = {
    "half_even": [0.0, 2.0, -0.0, -2.0, 2.0, -2.0],
    "half_away": [1.0, 2.0, -1.0, -3.0, 3.0, -2.0],
}


@pytest.mark.parametrize("mode", ["half_even", "half_away"])
def test_round_ties(mode):
    x = torch.tensor(TIES)
    assert round_ste(x, mode).tolist() == EXPECTED[mode]
    assert round_nograd(x, mode).tolist() == EXPECTED[mode]


@pytest.mark.parametrize("mode", ["half_even", "half_away"])
def test_round_non_ties_and_identity_backward(mode):
    x = torch.tensor([0.49, 0.51, -0.51, -1.2, 3.7, 0.0], requires_grad=True)
    y = round_ste(x, mode)
    assert y.tolist() == [0.0, 1.0, -1.0, -1.0, 4.0, 0.0]
    g = torch.tensor([0.3, -2.0, 5.0, 1.0, 0.25, 7.0])
    y.backward(g)
    assert torch.equal(x.grad, g)  # identity, not an approximation


def test_round_unknown_mode_raises():
    with pytest.raises(ValueError, match="half_even"):
        round_ste(torch.zeros(1), "stochastic")
    with pytest.raises(ValueError, match="half_away"):
        round_nograd(torch.zeros(1), "nearest")


@HYP
@given(st.lists(st.floats(-1e5, 1e5, width=32, allow_subnormal=False), min_size=1, max_size=30),
       st.sampled_from(["half_even", "half_away"]))
def test_round_matches_exact_rounding(values, mode):
    # +-0.49999997 has its own test below
    values = [v for v in values if abs(v) != float(np.float32(0.49999997))]
    assume(values)
    x = torch.tensor(values, dtype=torch.float32)
    expected = torch.tensor([float(ref.round_exact(v, mode)) for v in x.tolist()])
    assert torch.equal(round_ste(x, mode), expected)
    assert torch.equal(round_nograd(x, mode), expected)


@pytest.mark.parametrize("v,expected", [(0.49999997, 0.0), (-0.49999997, -0.0), (8388609.0, 8388609.0)])
def test_round_half_away_matches_std_round_at_float_edges(v, expected):
    x = torch.tensor([v], dtype=torch.float32)
    assert round_ste(x, "half_away").item() == expected


def test_floor_ceil_ste():
    x = torch.tensor([-1.5, -1.0, -0.2, 0.0, 0.2, 1.0, 1.5], requires_grad=True)
    g = torch.arange(1.0, 8.0)
    f = floor_ste(x)
    assert f.tolist() == [-2.0, -1.0, -1.0, 0.0, 0.0, 1.0, 1.0]
    f.backward(g)
    assert torch.equal(x.grad, g)
    x.grad = None
    c = ceil_ste(x)
    assert c.tolist() == [-1.0, -1.0, -0.0, 0.0, 1.0, 1.0, 2.0]
    c.backward(g)
    assert torch.equal(x.grad, g)


def test_grad_scale_exact_forward_scaled_backward():
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    y = grad_scale(x, 0.125)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 0.125))


# ---------------------------------------------------------------------------------------------
# int_range, reshape_for_axis
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,signed,lo,hi", [
    (1, False, 0, 1), (2, True, -2, 1), (2, False, 0, 3), (4, True, -8, 7), (4, False, 0, 15),
    (8, True, -128, 127), (8, False, 0, 255), (16, True, -32768, 32767),
])
def test_int_range_table(bits, signed, lo, hi):
    qmin, qmax = int_range(bits, signed)
    assert (float(qmin), float(qmax)) == (lo, hi)


def test_int_range_tensor_bits_elementwise():
    qmin, qmax = int_range(torch.tensor([2.0, 3.0, 8.0]), signed=True)
    assert qmin.tolist() == [-2.0, -4.0, -128.0] and qmax.tolist() == [1.0, 3.0, 127.0]


def test_reshape_for_axis():
    x = torch.zeros(4, 3, 5, 2)
    p = torch.arange(3.0)
    assert reshape_for_axis(p, x, 1).shape == (1, 3, 1, 1)
    assert reshape_for_axis(torch.arange(4.0), x, 0).shape == (4, 1, 1, 1)
    assert reshape_for_axis(torch.tensor([2.0]), x, 1).shape == ()  # one scale: a scalar
    assert reshape_for_axis(p, x, None) is p


# ---------------------------------------------------------------------------------------------
# fake_quantize / quantize_codes against the loop reference
# ---------------------------------------------------------------------------------------------
@st.composite
def quant_case(draw):
    """A tensor, its (per-tensor or per-channel) scale, bits, signedness and rounding."""
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.integers(1, 4)) for _ in range(ndim))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    bits = draw(st.integers(2, 8))
    signed = draw(st.booleans())
    rounding = draw(st.sampled_from(["half_even", "half_away"]))
    axis = draw(st.one_of(st.none(), st.integers(0, ndim - 1)))
    n_scales = 1 if axis is None else shape[axis]
    scale = torch.exp(torch.empty(n_scales).uniform_(-4, 1, generator=gen))
    x = torch.randn(shape, generator=gen) * 3.0
    if draw(st.booleans()):  # exact ties and grid points, where rounding modes differ
        x = torch.round(x * 2) / 2 * reshape_for_axis(scale, x, axis)
    return x, scale, axis, bits, signed, rounding


@HYP
@given(quant_case())
def test_fake_quantize_matches_loop(case):
    x, scale, axis, bits, signed, rounding = case
    qmin, qmax = (int(v) for v in int_range(bits, signed))
    s = reshape_for_axis(scale, x, axis)
    y = fake_quantize(x, s, 0.0, qmin, qmax, rounding)
    assert torch.equal(y, ref.fake_quantize_loop(x, s, 0, qmin, qmax, rounding))
    # tensor-valued ranges (bits as tensors, as searches pass them) give the same result
    tq = int_range(torch.tensor(float(bits)), signed)
    assert torch.equal(fake_quantize(x, s, 0.0, tq[0], tq[1], rounding), y)


@HYP
@given(quant_case(), st.integers(-3, 3))
def test_quantize_codes_consistent_with_fake_quantize(case, zp):
    x, scale, axis, bits, signed, rounding = case
    qmin, qmax = (int(v) for v in int_range(bits, signed))
    s = reshape_for_axis(scale, x, axis)
    codes = quantize_codes(x, s, float(zp), qmin, qmax, rounding)
    assert codes.dtype == torch.int64 and not codes.requires_grad
    assert torch.equal(codes, ref.quantize_codes_loop(x, s, zp, qmin, qmax, rounding))
    assert int(codes.min()) >= qmin and int(codes.max()) <= qmax
    y = fake_quantize(x, s, float(zp), qmin, qmax, rounding)
    assert torch.equal((codes.to(torch.float32) - zp) * s, y)  # bit for bit


def _away_from_bands(v: torch.Tensor, qmin: int, qmax: int, margin: float = 0.05) -> torch.Tensor:
    """Push ``v = x/s`` out of the two half-step bands just outside ``[qmin, qmax]`` (see the
    band test below) and away from the exact range ends."""
    v = v.clone()
    top = (v > qmax - margin) & (v < qmax + 0.5 + margin)
    bot = (v < qmin + margin) & (v > qmin - 0.5 - margin)
    v[top] = qmax + 0.5 + 2 * margin + (v[top] - qmax).abs()
    v[bot] = qmin - 0.5 - 2 * margin - (v[bot] - qmin).abs()
    return v


@HYP
@given(quant_case())
def test_fake_quantize_gradients_match_lsq_formulas(case):
    x, scale, axis, bits, signed, rounding = case
    qmin, qmax = (int(v) for v in int_range(bits, signed))
    sb = reshape_for_axis(scale, x, axis)
    x = _away_from_bands(x / sb, qmin, qmax) * sb
    x = x.detach().requires_grad_(True)
    scale = scale.clone().requires_grad_(True)
    s = reshape_for_axis(scale, x, axis)
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(x.shape, generator=gen)
    fake_quantize(x, s, 0.0, qmin, qmax, rounding).backward(g)
    dx, ds = ref.lsq_grads_loop(x, sb, qmin, qmax, g, rounding)
    # outside: exactly 0; inside: the upstream gradient (up to float32 rounding of g*s/s)
    assert torch.equal(x.grad == 0, dx == 0)
    torch.testing.assert_close(x.grad.double(), dx, rtol=1e-6, atol=0)
    # ds = q - x/s is a float32 cancellation: allow a few ulps of sum |x/s * g|
    atol = 1e-6 * (1.0 + float((x.detach() / sb).abs().mul(g.abs()).sum()))
    torch.testing.assert_close(scale.grad.double().reshape(ds.shape), ds, rtol=1e-5, atol=atol)


def test_fake_quantize_gradients_hand_values():
    # s = 0.5, 3-bit signed: range [-4, 3] in units of s
    x = torch.tensor([0.3, -0.8, 5.0, -9.0, 1.2], requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    y = fake_quantize(x, s, 0.0, -4, 3)
    assert y.tolist() == [0.5, -1.0, 1.5, -2.0, 1.0]
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0, 1.0]
    # round(v) - v inside: (1 - 0.6) + (-2 + 1.6) + (2 - 2.4); qmax=3 and qmin=-4 outside
    expected = (1 - 0.6) + (-2 + 1.6) + 3 + (-4) + (2 - 2.4)
    assert s.grad.item() == pytest.approx(expected, abs=1e-6)


def test_fake_quantize_zero_point_gradient():
    # d/dz of (clamp(round(x/s)+z) - z)*s: 0 inside, -s where clamped
    x = torch.tensor([0.2, 4.0, -3.0])
    s = torch.tensor(0.25)
    z = torch.tensor(2.0, requires_grad=True)
    y = fake_quantize(x, s, z, 0.0, 15.0)
    assert y.tolist() == [0.25, 13 * 0.25, -0.5]
    y.backward(torch.ones(3))
    assert z.grad.item() == pytest.approx(-0.5)


def test_fake_quantize_lsq_gradient_in_half_step_band():
    x = torch.tensor([3.2, -4.3], requires_grad=True)  # s = 1, 3-bit signed: [-4, 3]
    s = torch.tensor(1.0, requires_grad=True)
    y = fake_quantize(x, s, 0.0, -4, 3)
    assert y.tolist() == [3.0, -4.0]
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 0.0]
    assert s.grad.item() == pytest.approx(3 - 4)


# ---------------------------------------------------------------------------------------------
# power-of-two rounding
# ---------------------------------------------------------------------------------------------
def test_pow2_round_values_and_gradient():
    x = torch.tensor([0.1, 0.3, 0.7, 1.0, 1.4, 1.45, 3.0, 5.9, 100.0], dtype=torch.float64,
                     requires_grad=True)
    y = pow2_round_ste(x)
    expected = torch.tensor([2.0 ** round(math.log2(v)) for v in x.tolist()], dtype=torch.float64)
    assert torch.equal(y, expected)
    assert y.tolist()[:4] == [0.125, 0.25, 0.5, 1.0]
    y.sum().backward()
    torch.testing.assert_close(x.grad, expected / x.detach())  # 2^round(log2 x) / x
    assert torch.equal(torch.pow(2.0, pow2_exponent(x.detach()).double()), expected)


@HYP
@given(st.floats(1e-6, 1e6))
def test_pow2_round_is_a_power_of_two_within_sqrt2(v):
    y = float(pow2_round_ste(torch.tensor(v, dtype=torch.float64)))
    assert math.log2(y) == round(math.log2(y))
    assert 1 / math.sqrt(2) - 1e-12 <= y / v <= math.sqrt(2) + 1e-12


# ---------------------------------------------------------------------------------------------
# bit-width formulas
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio,signed,bits", [
    (7.0, True, 4),     # d = 2^-4, q_max = 7d: 4-bit signed
    (1.5, True, 3),     # q_max = 1.5d -> round 2 levels -> ceil(log2 3 + 1) = 3
    (15.0, False, 4),   # unsigned q_max = 15d: 4 bits
    (1.0, True, 2), (3.0, True, 3), (8.0, True, 5), (127.0, True, 8), (255.0, False, 8),
    (1.0, False, 1), (16.0, False, 5),
])
def test_learned_range_bits_table(ratio, signed, bits):
    d = torch.tensor(2.0**-4)
    b = learned_range_bits(d, ratio * d, signed)
    assert b.item() == bits == ref.learned_range_bits_loop(float(d), ratio * float(d), signed)


@HYP
@given(st.integers(-8, 0), st.floats(0.6, 300.0), st.booleans())
def test_learned_range_bits_matches_loop(log2_d, ratio, signed):
    d = 2.0**log2_d
    b = learned_range_bits(torch.tensor(d, dtype=torch.float64), torch.tensor(ratio * d, dtype=torch.float64), signed)
    assert b.item() == ref.learned_range_bits_loop(d, ratio * d, signed)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("ratio", [7.0, 6.6, 15.2, 2.0])
def test_learned_range_bits_gradient(ratio, signed):
    d = torch.tensor(2.0**-3, dtype=torch.float64, requires_grad=True)
    q_max = torch.tensor(ratio * 2.0**-3, dtype=torch.float64, requires_grad=True)
    learned_range_bits(d, q_max, signed).backward()
    levels = round(ratio)
    dv, qv = d.item(), q_max.item()
    # STE through ceil and round: db/dq = 1/(ln2 (L+1) d), db/dd = -q/(ln2 (L+1) d^2)
    assert q_max.grad.item() == pytest.approx(1 / (LN2 * (levels + 1) * dv))
    assert d.grad.item() == pytest.approx(-qv / (LN2 * (levels + 1) * dv**2))
    if ratio == levels:  # the docstring's closed forms hold on the grid
        assert q_max.grad.item() == pytest.approx(1 / (LN2 * (qv + dv)))
        assert d.grad.item() == pytest.approx(-(qv / dv) / (LN2 * (qv + dv)))


@pytest.mark.parametrize("log2_ratio,bits", [(0, 1), (1, 2), (3, 3), (7, 4), (15, 5), (5, 4)])
def test_learned_range_pow2_bits_table(log2_ratio, bits):
    q_min = torch.tensor(2.0**-10)
    assert learned_range_pow2_bits(q_min, q_min * 2.0**log2_ratio).item() == bits


def test_learned_range_pow2_bits_gradient():
    q_min = torch.tensor(2.0**-7, dtype=torch.float64, requires_grad=True)
    q_max = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    learned_range_pow2_bits(q_min, q_max).backward()
    inner = math.log2(1.0 / 2.0**-7) + 1.0  # log2(q_max/q_min) + 1 = 8
    assert q_max.grad.item() == pytest.approx(1 / (inner * LN2**2 * 1.0))
    assert q_min.grad.item() == pytest.approx(-1 / (inner * LN2**2 * 2.0**-7))


def test_bits_to_qmax_table_and_gradcheck():
    b = torch.tensor([2.0, 4.0, 8.0])
    assert bits_to_qmax(b, True).tolist() == [1.0, 7.0, 127.0]
    assert bits_to_qmax(b, False).tolist() == [3.0, 15.0, 255.0]
    bd = torch.tensor([2.0, 3.5, 6.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: bits_to_qmax(t, True), (bd,))
    assert torch.autograd.gradcheck(lambda t: bits_to_qmax(t, False), (bd,))


def test_interpolated_and_kept_plane_bits():
    p = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64, requires_grad=True)
    assert interpolated_bits(p, 2.0, 4.0).tolist() == [2.0, 2.5, 4.0]
    assert torch.autograd.gradcheck(lambda t: interpolated_bits(t, 3.0, 8.0), (p,))
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0])
    assert kept_plane_bits(mask, signed=True).item() == 4.0
    assert kept_plane_bits(mask, signed=False).item() == 3.0
    soft = torch.rand(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: kept_plane_bits(t, True), (soft,))


# ---------------------------------------------------------------------------------------------
# QuantState
# ---------------------------------------------------------------------------------------------
def test_quant_state_ranges():
    assert (QuantState(4, True, torch.tensor(1.0), torch.tensor(0)).qmin,
            QuantState(4, True, torch.tensor(1.0), torch.tensor(0)).qmax) == (-8, 7)
    assert (QuantState(3, False, torch.tensor(1.0), torch.tensor(0)).qmin,
            QuantState(3, False, torch.tensor(1.0), torch.tensor(0)).qmax) == (0, 7)


def test_quant_state_dequantize_per_tensor_and_per_channel():
    codes = torch.tensor([[-8, 0, 7], [3, -1, 2]])
    st_t = QuantState(4, True, torch.tensor(0.25), torch.tensor(0), codes=codes)
    assert torch.equal(st_t.dequantize(), codes.float() * 0.25)
    st_c = QuantState(4, True, torch.tensor([0.5, 2.0]), torch.tensor([0, 1]), codes=codes, axis=0)
    expected = torch.tensor([[-4.0, 0.0, 3.5], [4.0, -4.0, 2.0]])
    assert torch.equal(st_c.dequantize(), expected)
    assert torch.equal(st_c.dequantize(torch.tensor([[1, 1, 1], [1, 1, 1]])),
                       torch.tensor([[0.5] * 3, [0.0] * 3]))
    st_c.check()


def test_quant_state_matches_fake_quantize_bit_for_bit():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(6, 4, 3, generator=gen)
    scale = torch.rand(6, generator=gen) * 0.3 + 0.01
    qmin, qmax = (int(v) for v in int_range(3, True))
    s = reshape_for_axis(scale, w, 0)
    codes = quantize_codes(w, s, 0.0, qmin, qmax)
    state = QuantState(3, True, scale, torch.zeros(6, dtype=torch.int64), codes=codes, axis=0)
    state.check()
    assert torch.equal(state.dequantize(), fake_quantize(w, s, 0.0, qmin, qmax))
    assert torch.equal(state.quantize(w), codes)


def test_quant_state_errors():
    act = QuantState(8, False, torch.tensor(0.1), torch.tensor(0))
    with pytest.raises(ValueError, match="no codes"):
        act.dequantize()
    act.check()  # nothing to check
    bad = QuantState(2, True, torch.tensor(1.0), torch.tensor(0), codes=torch.tensor([-2, 1, 2]))
    with pytest.raises(ValueError, match=r"\[-2, 2\].*2-bit signed range \[-2, 1\]"):
        bad.check()
    bad_u = QuantState(2, False, torch.tensor(1.0), torch.tensor(0), codes=torch.tensor([-1, 3]))
    with pytest.raises(ValueError, match="unsigned"):
        bad_u.check()
