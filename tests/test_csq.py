"""CSQ: bit-plane forward vs a loop reference, gradients, ini2bit, ticket exactness, budget sign."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mpq_plugin
from mpq_plugin import MPQConfig
from mpq_plugin.methods.csq import (
    CSQOptions,
    CSQQuantizer,
    act_levels,
    bitplane_weight,
    plane_coefficients,
    soft_masks,
)
from mpq_plugin.nn.fake_quantizer import QuantizerSpec
from mpq_plugin.nn.layers import quant_layers


def weight_q(shape, bits=(2, 8), w=None, seed=0, **opts):
    torch.manual_seed(seed)
    w = torch.randn(shape) if w is None else w
    q = CSQQuantizer(QuantizerSpec("weight", bits, signed=True, shape=tuple(shape)), CSQOptions(**opts))
    with torch.no_grad():
        q(w)
    return q, w


def act_q(bits=4, signed=None, **opts):
    b = bits if isinstance(bits, tuple) else (bits, bits)
    return CSQQuantizer(QuantizerSpec("act", b, signed=signed), CSQOptions(**opts))


def randomize(q, seed=1, scale=3.0):
    """Bit and mask logits away from 0, so thresholds are unambiguous."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in (q.p, q.n, q.mu):
            r = torch.randn(t.shape, generator=g) * scale
            t.copy_(r + torch.sign(r) * 0.1)


def sig(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def loop_weight(p, n, mu, s, temp, floor):
    """Slow reference of W = s sum_i m_i (sig(T p_i) - sig(T n_i)) 2^(N-1-i) / (2^N - 1)."""
    N = p.shape[-1]
    out = torch.zeros(p.shape[:-1], dtype=torch.float64)
    for idx in itertools.product(*[range(d) for d in p.shape[:-1]]):
        acc = 0.0
        for i in range(N):
            m = 1.0 if i < floor else sig(temp * float(mu[i]))
            bit = sig(temp * float(p[idx + (i,)])) - sig(temp * float(n[idx + (i,)]))
            acc += m * bit * 2 ** (N - 1 - i) / (2**N - 1)
        out[idx] = float(s) * acc
    return out


def loop_codes(q):
    """Reference integer code k = sum_{i kept} (1[p_i>0] - 1[n_i>0]) 2^(N-1-i) (low plane not factored)."""
    N = q.n_planes
    kept = q.kept_planes()
    k = torch.zeros(q.p.shape[:-1], dtype=torch.int64)
    for i in range(N):
        if kept[i]:
            k += ((q.p[..., i] > 0).long() - (q.n[..., i] > 0).long()) * 2 ** (N - 1 - i)
    return k


# -- forward and gradients --------------------------------------------------------------------
@pytest.mark.parametrize("floor", [0, 2])
def test_soft_forward_matches_loop_reference(floor):
    torch.manual_seed(0)
    N, temp = 5, 3.7
    p, n = torch.randn(3, 4, N, dtype=torch.float64), torch.randn(3, 4, N, dtype=torch.float64)
    mu, s = torch.randn(N, dtype=torch.float64), torch.tensor(0.8, dtype=torch.float64)
    T = torch.tensor(temp, dtype=torch.float64)
    got = bitplane_weight(p, n, soft_masks(mu, T, floor), s, T)
    torch.testing.assert_close(got, loop_weight(p, n, mu, s, temp, floor), rtol=1e-12, atol=1e-12)


def test_module_soft_forward_matches_reference():
    q, w = weight_q((4, 3, 2), bits=(3, 6))
    randomize(q, scale=0.5)
    q.set_progress(0.3)
    T = float(q.temperature)
    ref = loop_weight(*(t.detach().double() for t in (q.p, q.n, q.mu, q.s)), T, floor=2)
    torch.testing.assert_close(q(w).double(), ref, rtol=1e-5, atol=1e-6)


def test_plane_coefficients():
    c = plane_coefficients(3, torch.zeros(()))
    assert c.tolist() == pytest.approx([4 / 7, 2 / 7, 1 / 7])


@pytest.mark.parametrize("floor", [0, 1])
def test_gradcheck_soft_forward(floor):
    torch.manual_seed(0)
    N = 4
    T = torch.tensor(1.7, dtype=torch.float64)
    p = torch.randn(2, 3, N, dtype=torch.float64, requires_grad=True)
    n = torch.randn(2, 3, N, dtype=torch.float64, requires_grad=True)
    mu = torch.randn(N, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)

    def f(p, n, mu, s):
        return bitplane_weight(p, n, soft_masks(mu, T, floor), s, T)

    assert torch.autograd.gradcheck(f, (p, n, mu, s))


def test_hard_bit_surrogate_gradient():
    """After fix_bits the forward is hard, the gradient is that of sigmoid(T p) (and s)."""
    q, w = weight_q((3, 4), bits=(2, 5))
    randomize(q, scale=0.3)
    q.fix_bits()
    q.set_progress(0.2)  # T != 1
    q(w).sum().backward()
    T = q.temperature
    sg = torch.sigmoid(T * q.p.detach())
    coef = plane_coefficients(q.n_planes, q.p) * q.kept_mask.float() * q.s.detach()
    torch.testing.assert_close(q.p.grad, T * sg * (1 - sg) * coef, rtol=1e-5, atol=1e-7)
    assert q.mu.grad is None  # hard masks: no gradient to the mask logits


# -- initialization ---------------------------------------------------------------------------
@pytest.mark.parametrize("bit_init", ["symmetric", "code"])
@pytest.mark.parametrize("bits", [(2, 8), (4, 4), (2, 3)])
def test_ini2bit_round_trip(bits, bit_init):
    q, w = weight_q((6, 5), bits=bits, bit_init=bit_init, seed=3)
    N = bits[1] - 1
    L = 2**N - 1
    s = float(w.abs().max())
    assert q.s.item() == pytest.approx(s)
    expected = torch.round(w.clamp_min(0) * L / s) - torch.round((-w).clamp_min(0) * L / s)
    assert torch.equal(loop_codes(q), expected.long())  # hard-thresholded bits reproduce the init
    q.fix_bits()  # mask_init = 0 keeps every plane
    assert int(q.hard_bit_width()) == bits[1]
    state = q.freeze()
    assert torch.equal(state.codes << state.extra["low_plane_exponent"], expected.long())
    torch.testing.assert_close(q(w), expected * (s / L), rtol=1e-6, atol=0)
    torch.testing.assert_close(q(w), w, rtol=0, atol=0.5 * s / L + 1e-6)  # within half a step


def test_ini2bit_symmetric_soft_init_value():
    """At T=1 a set bit contributes tanh(L/2) (symmetric init) and each mask is sigmoid(mu0)."""
    q, w = weight_q((2, 2), bits=(8, 8), w=torch.tensor([[1.0, -1.0], [0.0, 0.5]]), bit_logit_init=2.0)
    torch.testing.assert_close(q(w)[0, 0], torch.tensor(math.tanh(1.0)))  # 127/127 of s = 1, masks protected


@pytest.mark.parametrize("logit, flips", [(None, True), (4.0, False)])
def test_default_bit_init_lets_bits_flip(logit, flips):
    """Bits must stay trainable under an annealed T: fitting -w needs every nonzero code to change
    sign. With the default small logit most codes get there in 60 Adam steps; |p| = 4 (the former default)
    saturates sigmoid(T p) and no bit moves (the cause of CSQ's poor mpq demo accuracy)."""
    opts = {} if logit is None else {"bit_logit_init": logit}
    q, w = weight_q((8, 8), bits=(2, 4), seed=5, **opts)
    before = loop_codes(q)
    opt = torch.optim.Adam([q.p, q.n], lr=1e-2)
    steps = 60
    for t in range(steps):
        q.set_progress(0.5 * t / steps)  # T from 1 to sqrt(200), as the first half of a search
        loss = (q(w) + w).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = loop_codes(q)
    nz = before != 0
    flipped = float((torch.sign(after[nz]) == -torch.sign(before[nz])).float().mean())
    assert (flipped > 0.5) if flips else (flipped == 0.0), flipped


def test_all_zero_weight():
    q, w = weight_q((3, 3), w=torch.zeros(3, 3))
    q.fix_bits()
    assert torch.equal(q(w), torch.zeros(3, 3))
    assert q.freeze().codes.abs().sum() == 0


# -- temperature and soft -> hard ---------------------------------------------------------------
def test_temperature_schedule():
    q, _ = weight_q((2, 2))
    for prog, T in [(0.0, 1.0), (0.5, math.sqrt(200)), (1.0, 200.0), (1.5, 200**1.5)]:
        q.set_progress(prog)
        assert float(q.temperature) == pytest.approx(T, rel=1e-6)
    q4, _ = weight_q((2, 2), temp_steps=4, final_temp=16.0)
    for prog, T in [(0.3, 2.0), (0.5, 4.0), (0.74, 4.0), (0.75, 8.0)]:
        q4.set_progress(prog)
        assert float(q4.temperature) == pytest.approx(T)


def test_soft_forward_becomes_hard_as_temperature_grows():
    q, w = weight_q((5, 4), bits=(2, 6))
    randomize(q, scale=1.0)  # |logits| >= 0.1
    hard = q.freeze().dequantize()
    errs = []
    for prog in (0.0, 0.25, 0.5, 1.0):
        q.set_progress(prog)
        errs.append((q(w) - hard).abs().max().item())
    assert errs[0] > errs[1] > errs[2] >= errs[3], errs
    assert errs[3] < 1e-6 * q.s.item()


# -- freeze exactness -------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("neg_scale", [False, True])
def test_freeze_equals_forward_bit_for_bit(seed, neg_scale):
    q, w = weight_q((4, 3, 3), bits=(2, 8), seed=seed)
    randomize(q, seed=seed)
    if neg_scale:
        with torch.no_grad():
            q.s.neg_()
    q.set_progress(0.7)
    q.fix_bits()
    y = q(w)
    state = q.freeze()
    state.check()
    assert torch.equal(state.dequantize(), y)
    assert torch.equal(state.codes << state.extra["low_plane_exponent"],
                       loop_codes(q) * (-1 if neg_scale else 1))
    kept = state.extra["kept_planes"]
    assert state.bits == kept[-1] - kept[0] + 2
    assert float(q.hard_bit_width()) == q.bit_width().item() == len(kept) + 1


def test_freeze_factors_out_low_plane():
    q, w = weight_q((8, 8), bits=(2, 6))  # 5 planes, exponents 4..0
    with torch.no_grad():
        q.mu.copy_(torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0]))  # keep planes 0 and 2 (plane 0 protected)
    q.fix_bits()
    state = q.freeze()
    assert state.extra["kept_planes"] == [0, 2]
    assert state.extra["low_plane_exponent"] == 2
    assert state.bits == 4  # span 3 + sign
    assert set(state.codes.unique().tolist()) <= {-5, -4, -1, 0, 1, 4, 5}
    assert torch.equal(state.dequantize(), q(w))
    assert float(state.scale) == pytest.approx(q.s.item() * 4 / 31)
    assert q.bit_width().item() == 3.0  # 2 kept planes + sign


def test_ticket_soft_bits_option():
    q, w = weight_q((3, 3), ticket_bits="soft")
    randomize(q)
    q.fix_bits()
    T = q.temperature
    ref = bitplane_weight(q.p, q.n, q.kept_mask.float(), q.s, T)
    assert torch.equal(q(w), ref)
    assert not q.freeze().extra["exact_forward"]


def test_masks_locked_after_fix_bits():
    q, w = weight_q((3, 3))
    randomize(q)
    q.fix_bits()
    kept = q.kept_planes().clone()
    with torch.no_grad():
        q.mu.neg_()
    assert torch.equal(q.kept_planes(), kept)
    q.fix_bits()  # idempotent
    assert torch.equal(q.kept_planes(), kept)


# -- bit-width, floor, budget sign ------------------------------------------------------------
def test_floor_protects_msb_planes():
    q, w = weight_q((4, 4), bits=(3, 8))
    with torch.no_grad():
        q.mu.fill_(-5.0)
    assert float(q.hard_bit_width()) == 3.0
    q.set_progress(1.0)
    assert q.bit_width().item() == pytest.approx(3.0, abs=1e-6)
    q.fix_bits()
    assert q.freeze().extra["kept_planes"] == [0, 1]
    assert q.bit_width().item() == 3.0


def test_hard_bit_width_counts_mu_at_zero_as_kept():
    q, _ = weight_q((2, 2), bits=(2, 5))
    with torch.no_grad():
        q.mu.copy_(torch.tensor([-1.0, 0.0, -1e-3, 2.0]))
    assert q.kept_planes().tolist() == [True, True, False, True]
    assert float(q.hard_bit_width()) == 4.0
    assert q.bit_width().item() == pytest.approx(1 + 1 + 0.5 + sig(-1e-3) + sig(2.0), rel=1e-6)


@pytest.mark.parametrize("coef", [1.0, -1.0])
def test_budget_sign_prunes_or_regrows(coef):
    q, _ = weight_q((3, 3), bits=(2, 6))
    bw = q.bit_width()
    (grad,) = torch.autograd.grad(bw, q.mu)
    assert grad[0] == 0 and (grad[1:] > 0).all()  # protected plane has no gradient
    before = q.mu.detach().clone()
    (coef * q.bit_width()).backward()  # the search's lambda (R - R_target) * sum m at quantizer level
    with torch.no_grad():
        q.mu -= 1.0 * q.mu.grad  # one SGD step
    moved = q.mu.detach()[1:] - before[1:]
    assert ((moved < 0) if coef > 0 else (moved > 0)).all()
    assert q.bit_width().item() < bw.item() if coef > 0 else q.bit_width().item() > bw.item()


def test_budget_options():
    assert CSQQuantizer.budget_penalty == "signed"
    q, _ = weight_q((2, 2))
    assert q.budget_weight(100) == 100.0  # weighted by default: same model size for every method
    qu, _ = weight_q((2, 2), budget_ratio="unweighted")
    assert qu.budget_weight(100) == 1.0


def test_reset_round():
    q, _ = weight_q((2, 2), bits=(2, 4), mask_init=0.5)
    with torch.no_grad():
        q.mu.copy_(torch.tensor([1.0, -0.2, 0.01]))
    q.set_progress(1.0)  # T = 200
    q.reset_round()
    assert q.mu.tolist() == pytest.approx([0.5, -40.0, 0.5])


def test_force_bits_weight():
    q, w = weight_q((4, 4), bits=(2, 6))
    with torch.no_grad():
        q.mu.copy_(torch.tensor([-2.0, 0.5, -0.3, 0.2, -0.1]))  # plane 0 protected
    q.force_bits(3)
    assert q.kept_planes().tolist() == [True, True, False, False, False]
    q.force_bits(5)
    assert q.kept_planes().tolist() == [True, True, False, True, True]
    assert float(q.hard_bit_width()) == 5.0
    q.fix_bits()
    assert q.bit_width().item() == 5.0
    q.force_bits(2)  # after fix_bits the locked masks follow
    assert q.kept_planes().tolist() == [True, False, False, False, False]
    assert torch.equal(q.freeze().dequantize(), q(w))
    with pytest.raises(ValueError, match="outside"):
        q.force_bits(7)


def test_force_bits_act_round_trips():
    q = act_q((4, 8), signed=False)
    x = torch.rand(32) * 4
    q(x)
    q.force_bits(5)
    assert q.hard_bit_width().item() == 5.0 and q.freeze().bits == 5
    q2 = act_q((4, 8), signed=False)
    q2.load_state_dict(q.state_dict())
    assert q2.act_bits == 5 and torch.equal(q2(x), q(x))


# -- hypothesis ---------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    lo=st.integers(1, 8),
    span=st.integers(0, 7),
    seed=st.integers(0, 2**16),
    prog=st.floats(0.0, 1.2),
)
def test_hypothesis_freeze_exact_and_bits(shape, lo, span, seed, prog):
    hi = max(lo + span, 2)
    lo = min(lo, hi)
    q, w = weight_q(tuple(shape), bits=(lo, hi), seed=seed)
    randomize(q, seed=seed)
    q.set_progress(prog)
    soft = q.bit_width().item()
    assert lo - 1e-5 <= soft <= hi + 1e-5
    hard = float(q.hard_bit_width())
    assert lo <= hard <= hi
    q.fix_bits()
    assert q.bit_width().item() == hard
    state = q.freeze()
    state.check()
    assert state.bits <= hi and state.bits >= hard
    assert torch.equal(state.dequantize(), q(w))
    assert torch.equal(state.codes << state.extra["low_plane_exponent"], loop_codes(q))


# -- activations --------------------------------------------------------------------------------
def test_act_pact_gradients_unsigned():
    q = act_q(4, signed=False, act_clip_init=2.0)
    x = torch.tensor([-1.0, 0.3, 1.05, 1.99, 2.0, 3.5], requires_grad=True)
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    y = q(x)
    assert not q.signed
    (y * g).sum().backward()
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 0.0, 0.0]
    assert float(q.alpha.grad) == pytest.approx(5.0 + 6.0)  # sum over x >= alpha
    assert y.detach().tolist() == pytest.approx([0.0, 2 / 15 * 2, 2 / 15 * 8, 2.0, 2.0, 2.0], abs=1e-6)


def test_act_pact_gradients_signed():
    q = act_q(3, signed=True, act_clip_init=4.0)  # codes [-4, 3], scale 1, clip [-4, 3]
    x = torch.tensor([-5.0, -4.0, -1.2, 2.9, 3.0, 7.0], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    assert float(q.alpha.grad) == pytest.approx((2 * -4 + 2 * 3) / 4)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_act_freeze_bit_exact(signed, bits):
    torch.manual_seed(bits)
    x = torch.randn(64) * 3
    x = x if signed else x.relu()
    q = act_q(bits, signed=signed)
    y = q(x)
    state = q.freeze()
    assert state.bits == bits and state.signed == signed
    assert torch.equal(state.dequantize(state.quantize(x)), y)
    qmin, qmax, _ = act_levels(bits, signed)
    assert (state.qmin, state.qmax) == (qmin, qmax)


def test_act_clip_init_from_data_and_range():
    x = torch.arange(101, dtype=torch.float32)
    q = act_q((4, 8))
    q(x)
    assert q.act_bits == 8 and q.bit_width().item() == 8.0
    assert q.alpha.item() == 100.0
    qp = act_q(4, act_clip_percentile=50.0)
    qp(x)
    assert qp.alpha.item() == 50.0
    q10 = act_q(4, act_clip_init=10.0)
    q10(x)
    assert q10.alpha.item() == 10.0


# -- state dict, options, public flow -----------------------------------------------------------
@pytest.mark.parametrize("fixed", [False, True])
def test_state_dict_round_trip(fixed):
    q, w = weight_q((4, 5), bits=(2, 6))
    randomize(q)
    q.set_progress(0.6)
    if fixed:
        q.fix_bits()
    spec = QuantizerSpec("weight", (2, 6), signed=True, shape=(4, 5))
    q2 = CSQQuantizer(spec, CSQOptions())
    q2.load_state_dict(q.state_dict())
    assert torch.equal(q2(torch.zeros(4, 5)), q(w))
    assert q2.bit_width().item() == q.bit_width().item()
    # a quantizer built without the weight shape sizes its parameters from the checkpoint
    q3 = CSQQuantizer(QuantizerSpec("weight", (2, 6), signed=True), CSQOptions())
    q3.load_state_dict(q.state_dict())
    assert torch.equal(q3(torch.zeros(4, 5)), q(w))
    if fixed:
        assert torch.equal(q3.freeze().codes, q.freeze().codes)


def test_lazy_shape_initializes_from_first_weight():
    q = CSQQuantizer(QuantizerSpec("weight", (2, 4), signed=True), CSQOptions())
    w = torch.randn(3, 2)
    assert q(w).shape == (3, 2) and q.p.shape == (3, 2, 3)


def test_validation_errors():
    with pytest.raises(ValueError, match="weight_bits"):
        CSQQuantizer(QuantizerSpec("weight", (1, 1), signed=True, shape=(2, 2)))
    with pytest.raises(ValueError, match="per tensor"):
        CSQQuantizer(QuantizerSpec("weight", (2, 8), signed=True, channels=2, shape=(2, 2)))
    for bad in ({"budget_ratio": "size"}, {"bit_init": "zeros"}, {"final_temp": 0.5},
                {"ticket_bits": "x"}, {"act_clip_percentile": 0.0}, {"bit_logit_init": 0.0}):
        with pytest.raises(ValueError):
            CSQOptions(**bad)
    with pytest.raises(ValueError, match="unknown option"):
        MPQConfig(method="csq", options={"temp": 3})
    with pytest.raises(ValueError, match="shape"):
        CSQQuantizer(QuantizerSpec("weight", (2, 8), signed=True, shape=(2, 2)))(torch.zeros(3, 3))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))


def test_public_flow():
    model = _model()
    mpq_plugin.quantize_(model, MPQConfig(method="csq", weight_bits=(2, 8)))
    x = torch.randn(6, 16)
    model(x).pow(2).sum().backward()
    for _, layer in quant_layers(model):
        wq, aq = layer.weight_quantizer, layer.input_quantizer
        for t in (wq.p, wq.n, wq.mu, wq.s):
            assert t.grad is not None and t.grad.abs().sum() > 0
        assert layer.weight.grad is None  # the float weight is replaced by the bit planes
        assert aq.alpha.grad is not None
    for _, layer in quant_layers(model):
        layer.weight_quantizer.set_progress(1.0)
    plan = mpq_plugin.freeze(model)
    assert plan.method == "csq" and set(plan.layers) == {"0", "2"}
    for name, layer in quant_layers(model):
        state = layer.weight_quantizer.freeze()
        assert torch.equal(state.dequantize(), layer.quantized_weight())
        assert plan[name].weight_bits == state.extra["magnitude_planes"] + 1
    assert torch.isfinite(model(x)).all()


def test_dequantize_keeps_represented_weight():
    model = _model()
    mpq_plugin.quantize_(model, MPQConfig(method="csq", weight_bits=(2, 6), act_bits=None))
    mpq_plugin.freeze(model)
    expected = [layer.quantized_weight().detach().clone() for _, layer in quant_layers(model)]
    mpq_plugin.dequantize_(model)
    assert torch.equal(model[0].weight, expected[0]) and torch.equal(model[2].weight, expected[1])
