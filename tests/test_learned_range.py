"""Learned step size / dynamic range (Uhlich et al. 2020): forward vs a loop reference, the
gradients of §2.3 for U1/U2/U3 and P3, inferred bits, bit-range caps, freeze, state, public flow."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import mpq_plugin
from mpq_plugin.methods.learned_range import (
    LearnedRangeOptions,
    LearnedRangeQuantizer,
    LearnedRangeState,
    cap,
    find_delta,
    pow2_fake_quant,
    uniform_fake_quant,
)
from mpq_plugin.nn.costing import cost_tensors
from mpq_plugin.nn.fake_quantizer import QuantizerSpec
from mpq_plugin.nn.layers import quant_layers
from tests.reference import learned_range_bits_loop, round_exact

LN2 = math.log(2.0)


def _q(role="weight", bits=(2, 8), signed=True, x=None, seed=0, **opts) -> LearnedRangeQuantizer:
    """A quantizer initialized from ``x`` (default: a seeded Gaussian)."""
    q = LearnedRangeQuantizer(QuantizerSpec(role, bits, signed=signed), LearnedRangeOptions(**opts))
    if x is None:
        x = torch.randn(64, generator=torch.Generator().manual_seed(seed))
        x = x.abs() if signed is False else x
    with torch.no_grad():
        q(x)
    return q


def _set(q: LearnedRangeQuantizer, **values: float) -> None:
    with torch.no_grad():
        for k, v in values.items():
            getattr(q, k).fill_(v)


# -- slow references --------------------------------------------------------------------------------
def _ref_code(x: torch.Tensor, d: float, q: float, signed: bool, mode: str) -> torch.Tensor:
    """Official ``d * round(clip(x, -q or 0, q) / d)``, element by element in float32."""
    d32, q32 = np.float32(d), np.float32(q)
    lo = -q32 if signed else np.float32(0)
    out = [np.float32(round_exact(float(np.float32(min(max(np.float32(v), lo), q32)) / d32), mode)) * d32
           for v in x.flatten().tolist()]
    return torch.tensor(np.array(out, dtype=np.float32)).reshape(x.shape)


def _ref_eq1(x: torch.Tensor, d: float, q: float) -> torch.Tensor:
    """Paper Eq. (1): ``sign(x) d floor(|x|/d + 1/2)`` inside ``|x| <= q``, ``sign(x) q`` outside."""
    out = []
    for v in x.flatten().tolist():
        s = math.copysign(1.0, v) if v != 0 else 0.0
        out.append(s * d * math.floor(abs(v) / d + 0.5) if abs(v) <= q else s * q)
    return torch.tensor(out, dtype=torch.float32).reshape(x.shape)


def _ref_pow2(x: torch.Tensor, qmin: float, qmax: float, signed: bool, with_zero: bool) -> torch.Tensor:
    """Official ``parametric_pow2_*`` forward, element by element."""
    out = []
    for v in x.flatten().tolist():
        if not signed:
            v = max(v, 0.0)
        a, s = abs(v), (math.copysign(1.0, v) if v != 0 else 0.0)
        if with_zero and a < qmin / math.sqrt(2.0):
            m = 0.0
        elif a < qmin:
            m = qmin
        elif a < qmax:
            m = 2.0 ** round_exact(math.log2(a), "half_even")
        else:
            m = qmax
        out.append(s * m)
    return torch.tensor(out, dtype=torch.float32).reshape(x.shape)


# -- options ----------------------------------------------------------------------------------------
def test_options_validate_and_normalize() -> None:
    with pytest.raises(ValueError, match="U1, U2, U3, P1, P2, P3"):
        LearnedRangeOptions(parametrization="U4")
    with pytest.raises(ValueError, match="rounding"):
        LearnedRangeOptions(rounding="up")
    with pytest.raises(ValueError, match="weight_step_range"):
        LearnedRangeOptions(weight_step_range=(1.0, 0.5))
    o = LearnedRangeOptions.from_mapping({"act_qmax_range": [0.01, 10]})
    assert o.act_qmax_range == (0.01, 10.0)
    assert LearnedRangeOptions.from_mapping(o.to_dict()) == o
    with pytest.raises(ValueError, match="parametrization"):
        mpq_plugin.MPQConfig(method="learned_range", options={"parametrization": "Q"})
    assert LearnedRangeQuantizer.budget_penalty == "hinge_sq"


# -- forward -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("rounding", ["half_away", "half_even"])
def test_u3_forward_matches_loop_reference(signed: bool, rounding: str) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, generator=g) * 2
    x[:8] = torch.tensor([0.375, -0.375, 0.125, 2.5, -2.5, 0.0, 1.0625, -1.0625])  # ties at d = 1/4
    q = _q(bits=(2, 8), signed=signed, x=x.abs() if not signed else x, rounding=rounding)
    _set(q, d=0.25, q_max=1.1)  # q_max not a multiple of d: the top level d*round(q/d) = 1.0
    ref = _ref_code(x, 0.25, 1.1, signed, rounding)
    assert torch.equal(q(x), ref)
    assert q(x).max().item() == 1.0


def test_u3_forward_equals_paper_eq1_when_qmax_is_a_level() -> None:
    x = torch.randn(300, generator=torch.Generator().manual_seed(4)) * 2
    q = _q(x=x)
    _set(q, d=0.125, q_max=0.875)
    assert torch.equal(q(x), _ref_eq1(x, 0.125, 0.875))


def test_rounding_mode_at_ties() -> None:
    x = torch.tensor([0.625, -0.625, 0.375])  # 2.5 d, -2.5 d, 1.5 d with d = 1/4
    away, even = _q(x=x, rounding="half_away"), _q(x=x, rounding="half_even")
    for q in (away, even):
        _set(q, d=0.25, q_max=1.75)
    assert away(x).tolist() == [0.75, -0.75, 0.5]
    assert even(x).tolist() == [0.5, -0.5, 0.5]


def test_step_is_rounded_to_power_of_two_unless_disabled() -> None:
    x = torch.tensor([0.3, 0.9, -0.2])
    q = _q(x=x)
    _set(q, d=0.3, q_max=2.0)  # 2^round(log2 0.3) = 0.25
    assert torch.equal(q(x), _ref_code(x, 0.25, 2.0, True, "half_away"))
    f = _q(x=x, pow2_step=False)
    _set(f, d=0.3, q_max=2.0)
    assert torch.allclose(f(x), torch.tensor([0.3, 0.9, -0.3]))


# -- gradients (§2.3) --------------------------------------------------------------------------------
def _grads(q: LearnedRangeQuantizer, x: torch.Tensor, g: torch.Tensor):
    q.zero_grad()
    x = x.clone().requires_grad_(True)
    y = q(x)
    (y * g).sum().backward()
    return y.detach(), x.grad, {n: p.grad.item() for n, p in q.named_parameters()}


def test_u3_gradients_hand_written() -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(100, generator=gen) * 1.5
    g = torch.randn(100, generator=gen)
    q = _q(x=x)
    d, qm = 0.125, 0.93
    _set(q, d=d, q_max=qm)
    y, gx, gp = _grads(q, x, g)
    inside = x.abs() <= qm
    assert torch.equal(gx, torch.where(inside, g, torch.zeros_like(g)))
    exp_d = (g * (y - x) / d)[inside].sum()
    exp_q = (g * torch.sign(x))[~inside].sum()
    assert gp["d"] == pytest.approx(float(exp_d), rel=1e-5, abs=1e-6)
    assert gp["q_max"] == pytest.approx(float(exp_q), rel=1e-6)


def test_u3_pow2_step_passes_gradient_straight_through() -> None:
    x = torch.randn(50, generator=torch.Generator().manual_seed(6))
    q = _q(x=x)
    _set(q, d=0.3, q_max=1.3)  # d_q = 0.25, d(d_q)/dd = d_q/d
    y, _, gp = _grads(q, x, torch.ones(50))
    inside = x.abs() <= 1.3
    assert gp["d"] == pytest.approx(float(((y - x) / 0.25)[inside].sum()) * 0.25 / 0.3, rel=1e-5)


def test_u3_code_grad_variant_adds_clipped_step_term() -> None:
    x = torch.tensor([0.1, 3.0, -3.0])
    paper, code = _q(x=x), _q(x=x, grad_variant="code")
    for q in (paper, code):
        _set(q, d=0.25, q_max=0.9)  # round(0.9/0.25) - 0.9/0.25 = 0.4
    _, _, gp = _grads(paper, x, torch.ones(3))
    _, _, gc = _grads(code, x, torch.ones(3))
    inside_term = round(0.1 / 0.25) - 0.1 / 0.25
    assert gp["d"] == pytest.approx(inside_term, abs=1e-6)
    assert gc["d"] == pytest.approx(inside_term + 0.4 + (-0.4), abs=1e-6)  # +q and -q clipped
    _, _, gc1 = _grads(code, x[:2], torch.ones(2))
    assert gc1["d"] == pytest.approx(inside_term + 0.4, abs=1e-6)


def test_u3_gradients_bounded_and_decoupled() -> None:
    """Paper's core claim: dQ/dd in [-1/2, 1/2], dQ/dq_max in {-1, 0, +1}, never both non-zero."""
    gen = torch.Generator().manual_seed(7)
    n = 2000
    x = torch.randn(n, generator=gen) * 3
    d = (2.0 ** torch.randint(-6, 0, (n,), generator=gen)).float().requires_grad_(True)
    qm = (d.detach() * torch.rand(n, generator=gen) * 20 + 1e-3).requires_grad_(True)  # not multiples of d
    uniform_fake_quant(x, d, qm, signed=True).sum().backward()  # per-element parameters -> per-element grads
    gd, gq = d.grad, qm.grad
    assert gd.abs().max() <= 0.5 and gd.abs().max() > 0.4
    assert set(gq.unique().tolist()) <= {-1.0, 0.0, 1.0} and (gq != 0).any()
    assert not ((gd != 0) & (gq != 0)).any()
    outside = x.abs() > qm.detach()
    assert torch.equal(gq != 0, outside)
    # the official graph's gradient couples them (a test that can fail)
    d2, q2 = d.detach().clone().requires_grad_(True), qm.detach().clone().requires_grad_(True)
    uniform_fake_quant(x, d2, q2, signed=True, grad_variant="code").sum().backward()
    assert ((d2.grad != 0) & (q2.grad != 0)).any()


def test_u3_unsigned_routes_only_upper_clip_to_qmax() -> None:
    x = torch.tensor([-1.0, 0.3, 5.0])
    q = _q("act", (1, 8), signed=False, x=x.abs())
    _set(q, d=0.25, q_max=2.0)
    y, gx, gp = _grads(q, x, torch.ones(3))
    assert y.tolist() == [0.0, 0.25, 2.0]
    assert gx.tolist() == [0.0, 1.0, 0.0]
    assert gp["q_max"] == 1.0


def test_u1_gradients_hand_written() -> None:
    """Eq. (3a): inside [0, (Q-x)/d]; outside [2^(b-1) ln2 d, 2^(b-1) - 1] * sign(x)."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(80, generator=gen) * 2
    g = torch.randn(80, generator=gen)
    q = _q(x=x, parametrization="U1")
    b, d = 4, 0.25
    _set(q, b=float(b), d=d)
    y, gx, gp = _grads(q, x, g)
    qm = d * (2 ** (b - 1) - 1)
    inside = x.abs() <= qm
    assert torch.equal(y, _ref_code(x, d, qm, True, "half_away"))
    exp_b = (g * torch.sign(x))[~inside].sum() * 2 ** (b - 1) * LN2 * d
    exp_d = (g * (y - x) / d)[inside].sum() + (g * torch.sign(x))[~inside].sum() * (2 ** (b - 1) - 1)
    assert gp["b"] == pytest.approx(float(exp_b), rel=1e-5)
    assert gp["d"] == pytest.approx(float(exp_d), rel=1e-5)
    assert torch.equal(gx, torch.where(inside, g, torch.zeros_like(g)))


def test_u2_gradients_hand_written() -> None:
    """Eq. (3b): inside [-(2^(b-1) ln2/(2^(b-1)-1)) (Q-x), (Q-x)/q_max]; outside [0, sign(x)]."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(80, generator=gen) * 2
    g = torch.randn(80, generator=gen)
    q = _q(x=x, parametrization="U2")
    b, qm = 4, 7 * 0.25  # d = pow2(q_max / 7) = 0.25 exactly
    _set(q, b=float(b), q_max=qm)
    y, _, gp = _grads(q, x, g)
    inside = x.abs() <= qm
    k = 2 ** (b - 1)
    exp_b = -(k * LN2 / (k - 1)) * (g * (y - x))[inside].sum()
    exp_q = (g * (y - x))[inside].sum() / qm + (g * torch.sign(x))[~inside].sum()
    assert gp["b"] == pytest.approx(float(exp_b), rel=1e-4)
    assert gp["q_max"] == pytest.approx(float(exp_q), rel=1e-4)


@pytest.mark.parametrize("role", ["weight", "act"])
def test_p3_forward_and_gradients(role: str) -> None:
    signed = role == "weight"
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(300, generator=gen) * 2
    q = _q(role, (2, 8), signed=signed, x=x if signed else x.abs(), parametrization="P3")
    qmin, qmax = 2.0**-3, 2.0**1
    _set(q, q_min=qmin, q_max=qmax)
    g = torch.randn(300, generator=gen)
    y, gx, gp = _grads(q, x, g)
    assert torch.equal(y, _ref_pow2(x, qmin, qmax, signed, not signed))
    a = x.clamp_min(0).abs() if not signed else x.abs()
    s = torch.sign(x) if signed else (x > 0).float()
    low = (a < qmin) & ((a >= qmin / math.sqrt(2)) if not signed else torch.ones_like(a, dtype=torch.bool))
    mid, top = (a >= qmin) & (a < qmax), a >= qmax
    assert gp["q_min"] == pytest.approx(float((g * s)[low].sum()), rel=1e-5)
    assert gp["q_max"] == pytest.approx(float((g * s)[top].sum()), rel=1e-5)
    exp_gx = torch.where(mid, g * 2.0 ** torch.round(torch.log2(a)) / a, torch.zeros_like(g))
    assert torch.allclose(gx, exp_gx, rtol=1e-5, atol=0)


def test_pow2_parametrizations_agree() -> None:
    """P1/P2 with b bits and P3 with q_max/q_min = 2^(2^(b-1)-1) are the same quantizer."""
    x = torch.randn(200, generator=torch.Generator().manual_seed(11)) * 2
    p1, p2, p3 = (_q(x=x, parametrization=p) for p in ("P1", "P2", "P3"))
    _set(p1, b=4.0, q_max=2.0)
    _set(p2, b=4.0, q_min=2.0**-6)
    _set(p3, q_min=2.0**-6, q_max=2.0)
    assert torch.equal(p1(x), p3(x)) and torch.equal(p2(x), p3(x))
    assert p1.bit_width().item() == p2.bit_width().item() == p3.bit_width().item() == 4.0


def test_pow2_bit_range_is_checked_and_span_capped() -> None:
    with pytest.raises(ValueError, match="power-of-two"):
        _q(bits=(8, 8), parametrization="P3")
    q = _q(bits=(2, 16), parametrization="P1")
    _set(q, b=16.0, q_max=1.0)
    qmin, qmax = q.pow2_params()
    assert qmax / qmin <= 2.0**23 and torch.isfinite(q(torch.randn(8))).all()


def test_pow2_fake_quant_never_nan_at_zero() -> None:
    x = torch.tensor([0.0, 1e-30, -0.0, 3.0], requires_grad=True)
    y = pow2_fake_quant(x, torch.tensor(2.0**-4), torch.tensor(2.0), True, False)
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and y.tolist()[0] == 0.0


# -- inferred bit-width ------------------------------------------------------------------------------
@pytest.mark.parametrize("factor, signed, bits", [(7, True, 4), (1.5, True, 3), (15, False, 4),
                                                  (8, True, 5), (1, True, 2), (1, False, 1), (255, False, 8)])
def test_bit_width_table(factor: float, signed: bool, bits: int) -> None:
    d = 2.0**-4
    q = _q("weight" if signed else "act", (1, 16), signed=signed)
    _set(q, d=d, q_max=factor * d)
    assert q.bit_width().item() == bits == learned_range_bits_loop(d, factor * d, signed)


def test_signed_activation_gets_the_sign_bit() -> None:
    x = torch.randn(64, generator=torch.Generator().manual_seed(12))
    q = _q("act", (1, 8), signed=None, x=x)
    assert q.signed
    _set(q, d=2.0**-4, q_max=15 * 2.0**-4)
    assert q.bit_width().item() == 5


def test_pow2_bit_width() -> None:
    w = _q(parametrization="P3", bits=(1, 8))
    _set(w, q_min=2.0**-4, q_max=2.0**3)  # 8 magnitudes -> 3 bits + sign
    assert w.bit_width().item() == 4
    a = _q("act", (1, 8), signed=False, parametrization="P3")
    _set(a, q_min=2.0**-4, q_max=2.0**3)  # + zero flag instead of the sign
    assert a.bit_width().item() == 4


def test_bit_width_ste_gradient() -> None:
    """db/dq_max = 1/(ln2 (L+1) d) ~ 1/(ln2 (q_max + d)); db/dd = -(q_max/d^2)/(ln2 (L+1))."""
    d, qm = 2.0**-4, 5.3 * 2.0**-4
    q = _q()
    _set(q, d=d, q_max=qm)
    q.bit_width().backward()
    L = 5
    assert q.q_max.grad.item() == pytest.approx(1 / (LN2 * (L + 1) * d), rel=1e-5)
    assert q.q_max.grad.item() == pytest.approx(1 / (LN2 * (qm + d)), rel=0.1)
    assert q.d.grad.item() == pytest.approx(-(qm / d**2) / (LN2 * (L + 1)), rel=1e-5)


def test_size_penalty_reaches_step_and_range() -> None:
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
    mpq_plugin.quantize_(model, mpq_plugin.MPQConfig(method="learned_range", weight_bits=(2, 8), act_bits=(2, 8)),
                         example_inputs=(torch.randn(4, 16),))
    cost_tensors(model).totals()["weight_kb"].backward()
    for _, layer in quant_layers(model):
        assert layer.weight_quantizer.q_max.grad > 0 and layer.weight_quantizer.d.grad < 0


# -- bit range: cap, fixed bits, fix_bits --------------------------------------------------------------
def test_bit_range_ends_derive_the_step_from_qmax() -> None:
    x = torch.randn(500, generator=torch.Generator().manual_seed(13)) * 100
    q = _q(bits=(3, 6), x=x)
    _set(q, d=2.0**-3, q_max=100.0)  # 800 levels: the step becomes 2^ceil(log2(100/31)) = 4
    d, qm = q.uniform_params()
    assert d.item() == 4.0 and qm.item() == 100.0 and q.bit_width().item() == 6
    assert torch.equal(q(x), _ref_code(x, 4.0, 100.0, True, "half_away"))
    _set(q, q_max=0.01)  # < 2 levels: the step becomes 2^floor(log2(0.01/2))
    d, _ = q.uniform_params()
    assert d.item() == 2.0**-8 and q.bit_width().item() == 3
    state = q.freeze(x)
    state.check()
    assert state.bits == 3 and state.codes.abs().max() == 3


def test_upper_bit_end_moves_range_not_step() -> None:
    x = torch.full((10,), 50.0)
    q = _q(bits=(2, 4), x=x)
    _set(q, d=0.25, q_max=4.0)  # 16 levels > 7: step 2^ceil(log2(4/7)) = 1, range 4
    assert q(x).tolist() == [4.0] * 10
    (-q(x).sum()).backward()  # clipped elements: dQ/dq_max = sign(x), the learned step is idle
    assert q.q_max.grad.item() == -10 and q.d.grad.item() == 0


def test_penalty_gradient_lowers_bits_pinned_at_max() -> None:
    q = _q(bits=(2, 4))
    _set(q, d=0.25, q_max=4.0)
    b = q.bit_width()
    assert b.item() == 4
    b.backward()  # descent lowers the bits: back inside the range, so the gradient flows
    assert q.q_max.grad.item() > 0 and q.d.grad.item() < 0
    q.zero_grad()
    _set(q, d=0.25, q_max=0.1)  # pinned at min bits: a penalty pushing further down is blocked
    q.bit_width().backward()
    assert q.q_max.grad.item() == 0 and q.d.grad.item() == 0


def test_cap_gradcheck_inside() -> None:
    x = torch.tensor([0.3, -0.2, 0.7], dtype=torch.float64, requires_grad=True)
    lo = torch.tensor(-0.5, dtype=torch.float64, requires_grad=True)
    hi = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: cap(a, b, c), (x, lo, hi))


def test_fixed_bits_behave_as_fixed_bit_quantizer() -> None:
    x = torch.randn(200, generator=torch.Generator().manual_seed(14))
    q = _q(bits=(4, 4), x=x, init_bits=6)
    assert q.bit_width().item() == 4
    for qm in (0.01, 0.5, 100.0):
        _set(q, q_max=qm)
        assert q.bit_width().item() == 4
        st_ = q.freeze(x)
        st_.check()
        assert st_.bits == 4


def test_fix_bits_locks_bits_and_keeps_output() -> None:
    x = torch.randn(200, generator=torch.Generator().manual_seed(15))
    q = _q(bits=(2, 8), x=x)
    _set(q, d=2.0**-4, q_max=11.3 * 2.0**-4)  # L = 11 -> 5 bits
    before = q(x)
    q.fix_bits()
    assert torch.equal(q(x), before) and q.bit_width().item() == 5
    _set(q, q_max=100.0)
    assert q.bit_width().item() == 5
    _set(q, q_max=0.01)
    assert q.bit_width().item() == 5
    state = q.freeze(x)
    state.check()
    assert state.bits == 5 and torch.equal(state.dequantize(), q(x))


@pytest.mark.parametrize("parametrization", ["U1", "U2", "U3", "P3"])
def test_force_bits_repair_hook(parametrization: str) -> None:
    x = torch.randn(300, generator=torch.Generator().manual_seed(19))
    q = _q(bits=(2, 6), x=x, parametrization=parametrization)
    for b in (2, 3, 5):
        q.force_bits(b)
        assert q.hard_bit_width().item() == b
    q.fix_bits()
    state = q.freeze(x)
    state.check()
    assert q.bit_width().item() == 5 and torch.equal(state.dequantize(), q(x))
    with pytest.raises(ValueError, match="force_bits"):
        q.force_bits(7)


# -- initialization -----------------------------------------------------------------------------------
def test_weight_init_follows_find_delta() -> None:
    w = torch.tensor([1.0, -0.5, 0.25])
    q = _q(x=w)  # b = 4: 2^floor(log2(1/7)) = 1/8
    assert q.d.item() == 0.125 and q.q_max.item() == 0.875 and q.bit_width().item() == 4
    q6 = _q(x=w, init_bits=6)  # b > 4: ceil -> 2^ceil(log2(1/31)) = 1/16
    assert q6.d.item() == 0.0625 and q6.q_max.item() == 31 * 0.0625 and q6.bit_width().item() == 6
    assert find_delta(1.0, 4, 7) == 0.125
    q2 = _q(x=w, bits=(2, 3))  # init bits clamped into the range
    assert q2.bit_width().item() == 3


def test_activation_init_paper_and_data() -> None:
    x = torch.linspace(0, 10, 50)
    paper = _q("act", (1, 8), signed=None, x=x, act_init="paper")
    assert paper.d.item() == 0.125 and paper.q_max.item() == 1.875 and paper.bit_width().item() == 4
    data = _q("act", (1, 8), signed=None, x=x)  # 2^floor(log2(10/15)) = 1/2
    assert data.d.item() == 0.5 and data.q_max.item() == 7.5 and data.bit_width().item() == 4


def test_pow2_init_starts_at_init_bits() -> None:
    for role, signed in (("weight", True), ("act", None)):
        x = torch.randn(64, generator=torch.Generator().manual_seed(16))
        q = _q(role, (2, 8), signed=signed, x=x.abs() if role == "act" else x, parametrization="P3")
        assert q.bit_width().item() == 4


# -- freeze / state -----------------------------------------------------------------------------------
_PARAMS_ST = st.sampled_from(["U1", "U2", "U3", "P1", "P2", "P3"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3), lo=st.integers(2, 8), span=st.integers(0, 6),
       scale=st.floats(0.01, 50.0), dexp=st.integers(-8, 0), qfac=st.floats(0.05, 400.0),
       bfrac=st.floats(0.0, 1.0), role=st.sampled_from(["weight", "act"]), parametrization=_PARAMS_ST,
       fix=st.booleans(), seed=st.integers(0, 2**16))
def test_freeze_matches_forward_and_codes_fit(shape, lo, span, scale, dexp, qfac, bfrac, role, parametrization,
                                              fix, seed) -> None:
    if parametrization.startswith("P"):
        lo = min(lo, 4)  # pow2 quantizers span at most 2^23: 2..6 bits (see POW2_MAX_SPAN)
    hi = min(lo + span, 16)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale
    q = _q(role, (lo, hi), signed=True if role == "weight" else None, x=x, parametrization=parametrization)
    d = 2.0**dexp
    values = {"d": d, "q_max": qfac * d, "q_min": d / 4, "b": lo + bfrac * (hi - lo)}
    _set(q, **{n: values[n] for n, _ in q.named_parameters()})
    if fix:
        q.fix_bits()
    bits = q.bit_width().item()
    assert lo <= bits <= hi
    y = q(x)
    state = q.freeze(x)
    state.check()
    assert isinstance(state, LearnedRangeState)
    assert torch.equal(state.dequantize(), y)
    assert torch.equal(state.dequantize(state.quantize(x)), y)  # activation path: codes from x
    if parametrization.startswith("U"):
        assert state.bits == int(bits) and state.zero_point.item() == 0
        assert state.scale.item() == 2.0 ** state.pow2_exponent.item()
        assert state.codes.abs().max() <= state.extra["code_max"] <= state.qmax
    else:
        assert state.extra["pow2_bits"] == int(bits)


def test_activation_state_clips_at_learned_level() -> None:
    x = torch.linspace(0, 4, 101)
    q = _q("act", (2, 8), signed=False, x=x)
    _set(q, d=0.25, q_max=2.4)  # L = 10 -> 4 bits, but the 4-bit range would clip at 15
    q.fix_bits()
    state = q.freeze()
    assert state.codes is None and state.bits == 4 and state.extra["code_max"] == 10
    assert torch.equal(state.dequantize(state.quantize(x)), q(x))


def test_freeze_before_forward_needs_a_tensor() -> None:
    q = LearnedRangeQuantizer(QuantizerSpec("act", (2, 8)), LearnedRangeOptions())
    assert q.bit_width().item() == 4  # init bits before any data
    with pytest.raises(ValueError, match="forward pass"):
        q.freeze()


@pytest.mark.parametrize("parametrization", ["U1", "U2", "U3", "P3"])
def test_state_dict_round_trip(parametrization: str) -> None:
    x = torch.randn(40, generator=torch.Generator().manual_seed(17))
    q = _q(x=x, parametrization=parametrization)
    opt = torch.optim.SGD(q.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        (q(x) - x).pow(2).sum().backward()
        opt.step()
    q.fix_bits()
    sd = copy.deepcopy(q.state_dict())
    other = LearnedRangeQuantizer(q.spec, q.options)
    other.load_state_dict(sd)
    assert all(torch.equal(v, sd[k]) for k, v in other.state_dict().items())
    assert torch.equal(other(x), q(x)) and other.bit_width().item() == q.bit_width().item()


# -- official training-script extras --------------------------------------------------------------------
def test_sony_extras_project_and_clip_grads() -> None:
    x = torch.randn(50, generator=torch.Generator().manual_seed(18))
    q = _q(x=x, sony_code_extras=True)
    _set(q, d=0.5, q_max=0.25)  # violates d < q_max
    q(x)
    assert q.d.item() < q.q_max.item()
    _set(q, d=5.0, q_max=500.0)  # outside the clamp ranges
    q(x)
    assert q.d.item() == pytest.approx(1 - 1e-5) and q.q_max.item() == pytest.approx(127 - 1e-5)
    _set(q, d=0.125, q_max=1.0)
    q.zero_grad()
    (100 * q(x.abs() * 10)).sum().backward()
    q.clip_grads_()
    assert abs(q.d.grad.item()) <= 0.125 and abs(q.q_max.grad.item()) == 0.125
    plain = _q(x=x)
    _set(plain, d=0.5, q_max=0.25)
    plain(x)
    assert plain.d.item() == 0.5  # no projection without the flag


# -- the paper's Gaussian experiment (Fig. 3, small) ------------------------------------------------------
def _fit_gaussian(parametrization: str, lr: float, steps: int = 300) -> float:
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))  # small: no intra-op threading
    q = _q(x=x, parametrization=parametrization)
    opt = torch.optim.SGD(q.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = (q(x) - x).pow(2).mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((q(x) - x).pow(2).mean())


@pytest.mark.parametrize("lr", [0.01, 0.1, 1.0])
def test_gaussian_u3_fits_at_least_as_well_as_u1(lr: float) -> None:
    mse_u3, mse_u1 = _fit_gaussian("U3", lr), _fit_gaussian("U1", lr)
    assert mse_u3 <= mse_u1


# -- public flow --------------------------------------------------------------------------------------
@pytest.mark.parametrize("act_bits", [8, (2, 8)])
def test_public_flow(act_bits) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
    cfg = mpq_plugin.MPQConfig(method="learned_range", weight_bits=(2, 8), act_bits=act_bits)
    mpq_plugin.quantize_(model, cfg)
    x = torch.randn(8, 16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    assert model[0].weight_quantizer.q_max.grad is not None and model[2].input_quantizer.d.grad is not None
    plan = mpq_plugin.freeze(model)
    assert set(plan) == {"0", "2"}
    for name, layer in quant_layers(model):
        state = layer.weight_quantizer.freeze(layer.weight)
        state.check()
        assert state.bits == plan[name].weight_bits
        assert torch.equal(state.dequantize(), layer.quantized_weight())
        aq = layer.input_quantizer
        a_state = aq.freeze()
        xin = torch.randn(5, *layer._in_shape)
        assert a_state.bits == plan[name].act_bits
        assert torch.equal(a_state.dequantize(a_state.quantize(xin)), aq(xin))
