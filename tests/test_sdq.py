"""SDQ (reimplementation): Q_b, the stochastic pair, its gradients, decay, freeze, state."""
from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import mpq_plugin
from mpq_plugin.core.bitwidth import interpolated_bits
from mpq_plugin.methods.sdq import (
    SDQOptions,
    SDQQuantizer,
    _ClampSTE,
    gumbel_relaxed,
    interpolate,
    quantize_b,
    stochastic_select,
)
from mpq_plugin.nn.fake_quantizer import QuantizerSpec
from mpq_plugin.nn.layers import quant_layers


def _wq(bits=(2, 8), channels=None, shape=(6, 5), seed=0, **opts) -> tuple:
    """A weight quantizer initialized from a random weight of ``shape``."""
    spec = QuantizerSpec("weight", bits, signed=True, channels=channels, axis=0, shape=shape)
    q = SDQQuantizer(spec, SDQOptions(**opts))
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        q(w)
    return q, w


def _set_beta(q: SDQQuantizer, beta: float) -> None:
    with torch.no_grad():
        q.beta.fill_(beta)


# -- Q_b against a slow loop reference ------------------------------------------------------------
def _ref_qb(x: torch.Tensor, s: torch.Tensor, bits: int, signed: bool, mode: str) -> torch.Tensor:
    """Element-by-element Q_b in float32 (``s`` broadcast per row 0 or scalar)."""
    out = torch.empty_like(x)
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in x.shape]).reshape(-1, x.dim()).tolist():
        idx = tuple(idx)
        si = s.reshape(-1)[idx[0]] if s.numel() > 1 else s.reshape(())
        v = float(x[idx] / si)  # the float32 quotient, as the vectorized code computes it
        if signed and bits == 1:
            q = 1.0 if v >= 0 else -1.0
        else:
            lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
            r = round(v) if mode == "half_even" else math.copysign(math.floor(abs(v) + 0.5), v)
            q = float(min(max(r, lo), hi))
        out[idx] = torch.tensor(q, dtype=torch.float32) * si
    return out


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("mode", ["half_even", "half_away"])
def test_qb_matches_loop_reference(bits, signed, per_channel, mode) -> None:
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(3, 4, generator=g) * 2
    x[0, 0], x[1, 1] = 0.0, 0.75  # exact zero and a tie for s = 0.5
    s = torch.tensor([0.5, 0.3, 0.7]) if per_channel else torch.tensor(0.5)
    sb = s.reshape(-1, 1) if per_channel else s
    got = quantize_b(x, sb, bits, signed, mode)
    assert torch.equal(got, _ref_qb(x, s, bits, signed, mode))


def test_binary_sign_and_gradients() -> None:
    x = torch.tensor([-2.0, -0.5, 0.0, 0.25, 3.0], requires_grad=True)
    s = torch.tensor(1.0, requires_grad=True)
    y = quantize_b(x, s, 1, True)
    assert torch.equal(y, torch.tensor([-1.0, -1.0, 1.0, 1.0, 1.0]))  # sign(0) = +1
    y.sum().backward()
    # STE inside |x| <= s, zero outside; ds = sign(x) - x/s inside, sign(x) outside (LSQ form)
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))
    assert torch.allclose(s.grad, torch.tensor((-1.0) + (-1 + 0.5) + (1 - 0.0) + (1 - 0.25) + 1.0))


def test_step_gradient_is_lsq_with_gradient_scale() -> None:
    q, w = _wq(bits=(4, 4))
    w.requires_grad_(True)
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(3))
    (q(w) * g).sum().backward()
    s = q.steps.detach()[0, 0].abs()
    v = w.detach() / s
    inside = (v >= -8) & (v <= 7)
    ds = torch.where(inside, torch.round(v) - v, v.clamp(-8, 7).round())
    expect = (g * ds).sum() / math.sqrt(w.numel() * 7)
    assert torch.allclose(q.steps.grad[0, 0], expect, rtol=1e-5, atol=1e-7)
    assert torch.equal(w.grad, g * inside)


# -- the stochastic pair --------------------------------------------------------------------------
def test_sampled_forward_is_exactly_one_candidate() -> None:
    q, w = _wq(bits=(2, 4), channels=6)
    _set_beta(q, 0.5)
    q_hi, q_lo = q.quantize_candidate(w, 2), q.quantize_candidate(w, 1)
    assert not torch.equal(q_hi, q_lo)
    seen = set()
    torch.manual_seed(0)
    for _ in range(20):
        y = q(w)
        assert torch.equal(y, q_hi) or torch.equal(y, q_lo)
        seen.add(torch.equal(y, q_hi))
    assert seen == {True, False}


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_degenerate_beta_is_deterministic(beta) -> None:
    q, w = _wq(bits=(2, 4))
    _set_beta(q, beta)
    target = q.quantize_candidate(w, 2 if beta == 1.0 else 1)
    assert all(torch.equal(q(w), target) for _ in range(20))


def test_beta_gradient_is_the_interpolation_gradient_per_sample() -> None:
    """d w_q / d beta = Q_hi - Q_lo for every sample (linear loss: exactly the interpolation's)."""
    q, w = _wq(bits=(2, 5), channels=6)
    _set_beta(q, 0.3)
    c = torch.randn(w.shape, generator=torch.Generator().manual_seed(5))
    q_hi, q_lo = q.quantize_candidate(w, 3).detach(), q.quantize_candidate(w, 2).detach()
    b = torch.tensor(0.3, requires_grad=True)
    (interpolate(b, q_hi, q_lo) * c).sum().backward()
    torch.manual_seed(1)
    for _ in range(10):
        q.zero_grad()
        (q(w) * c).sum().backward()
        assert torch.allclose(q.beta.grad, b.grad, rtol=1e-6, atol=1e-6)
        assert torch.allclose(q.beta.grad, (c * (q_hi - q_lo)).sum(), rtol=1e-6, atol=1e-6)


def test_nonlinear_loss_beta_gradient_uses_the_sampled_upstream_gradient() -> None:
    q, w = _wq(bits=(2, 4))
    _set_beta(q, 0.6)
    q_hi, q_lo = q.quantize_candidate(w, 2).detach(), q.quantize_candidate(w, 1).detach()
    torch.manual_seed(2)
    for _ in range(6):
        q.zero_grad()
        y = q(w)
        y.pow(3).sum().backward()
        g = 3 * y.detach() ** 2
        assert torch.allclose(q.beta.grad, (g * (q_hi - q_lo)).sum(), rtol=1e-5)


def test_expected_weight_and_step_gradients_match_the_interpolation() -> None:
    """Averaged over samples, the STE gradients of w and the steps are those of
    ``beta Q_hi + (1 - beta) Q_lo`` (up to the sampled frequency)."""
    q, w = _wq(bits=(2, 4), shape=(8, 4))
    beta, n = 0.3, 400
    _set_beta(q, beta)
    c = torch.randn(w.shape, generator=torch.Generator().manual_seed(9))

    def grads(fn):
        wl = w.clone().requires_grad_(True)
        q.zero_grad()
        (fn(wl) * c).sum().backward()
        return wl.grad.clone(), q.steps.grad.clone()

    gw_hi, gs_hi = grads(lambda x: q.quantize_candidate(x, 2))
    gw_lo, gs_lo = grads(lambda x: q.quantize_candidate(x, 1))
    gw_int, gs_int = grads(lambda x: interpolate(torch.tensor(beta), q.quantize_candidate(x, 2),
                                                 q.quantize_candidate(x, 1)))
    torch.manual_seed(4)
    sum_w, sum_s, hits = torch.zeros_like(w), torch.zeros_like(q.steps), 0
    for _ in range(n):
        gw, gs = grads(q)
        hits += int(torch.equal(gw, gw_hi) and torch.equal(gs, gs_hi))
        sum_w, sum_s = sum_w + gw, sum_s + gs
    p = hits / n
    assert abs(p - beta) < 4 * math.sqrt(beta * (1 - beta) / n)
    assert torch.allclose(sum_w / n, p * gw_hi + (1 - p) * gw_lo, atol=1e-5)
    assert torch.allclose(sum_s / n, p * gs_hi + (1 - p) * gs_lo, atol=1e-5)
    tol = 4 * math.sqrt(beta * (1 - beta) / n)
    assert torch.allclose(sum_w / n, gw_int, atol=tol * (gw_hi - gw_lo).abs().max().item() + 1e-6)
    assert torch.allclose(sum_s / n, gs_int, atol=tol * (gs_hi - gs_lo).abs().max().item() + 1e-6)


def test_deterministic_under_manual_seed() -> None:
    q, w = _wq(bits=(2, 4))
    _set_beta(q, 0.5)
    q_hi = q.quantize_candidate(w, 2)

    def pattern(seed):
        torch.manual_seed(seed)
        return [torch.equal(q(w), q_hi) for _ in range(32)]

    assert pattern(11) == pattern(11)
    assert pattern(11) != pattern(12)


def test_eval_uses_the_hard_choice() -> None:
    q, w = _wq(bits=(2, 4))
    q.eval()
    _set_beta(q, 0.5)
    assert torch.equal(q(w), q.quantize_candidate(w, 2)) and float(q.hard_bit_width()) == 4
    _set_beta(q, 0.49)
    assert torch.equal(q(w), q.quantize_candidate(w, 1)) and float(q.hard_bit_width()) == 3


def test_clamp_parametrization_projects_and_keeps_gradient_at_the_bound() -> None:
    q, w = _wq(bits=(2, 4))
    _set_beta(q, 1.3)
    assert float(q.beta_value().detach()) == 1.0 and float(q.bit_width().detach()) == 4.0
    q.bit_width().backward()
    assert float(q.beta.grad) == pytest.approx(1.0)  # identity backward: can leave the bound
    q.set_progress(0.1)
    assert q.beta.item() == 1.0


def test_bit_parameters_are_the_dbps() -> None:
    q, _ = _wq(bits=(2, 4))
    assert q.bit_parameters() == [q.beta]
    qa, _ = _wq(bits=(4, 4))
    assert qa.bit_parameters() == [] and not any("beta" in n for n, _ in qa.named_parameters())


# -- decay and bit-widths -------------------------------------------------------------------------
def test_expected_and_hard_bits() -> None:
    q, _ = _wq(bits=(2, 5))
    assert q.bit_width().item() == 5.0
    _set_beta(q, 0.25)
    assert q.bit_width().item() == pytest.approx(0.25 * 5 + 0.75 * 4)
    assert float(q.hard_bit_width()) == 4.0
    q.bit_width().backward()
    assert float(q.beta.grad) == pytest.approx(1.0)  # d bits / d beta = b_i - b_{i-1}


def test_decay_triggers_below_threshold_and_bits_follow(caplog) -> None:
    q, w = _wq(bits=(1, 3), decay_threshold=0.25)
    _set_beta(q, 0.25)
    q.set_progress(0.1)
    assert int(q.level) == 2  # not below the threshold yet
    _set_beta(q, 0.24)
    with caplog.at_level(logging.INFO, logger="mpq_plugin.methods.sdq"):
        q.set_progress(0.2)
    assert int(q.level) == 1 and q.beta.item() == 1.0 and "decays 3 -> 2" in caplog.text
    assert q.bit_width().item() == 2.0
    _set_beta(q, 0.5)
    assert q.bit_width().item() == pytest.approx(1.5)
    assert torch.equal(q.eval()(w), q.quantize_candidate(w, 1))
    _set_beta(q, 0.0)
    assert q.decay_step() and int(q.level) == 0
    assert q.bit_width().item() == 1.0 and not q.decay_step()  # never below the lowest
    q.train()
    assert torch.equal(q(w), q.quantize_candidate(w, 0))


def test_decay_resets_to_beta_init_and_stops_after_fix_bits() -> None:
    q, _ = _wq(bits=(2, 6), beta_init=0.9, decay_threshold=0.3)
    assert q.beta.item() == pytest.approx(0.9)
    _set_beta(q, 0.1)
    q.set_progress(0.5)
    assert int(q.level) == 3 and q.beta.item() == pytest.approx(0.9)
    _set_beta(q, 0.1)
    q.fix_bits()  # hard choice: beta < 0.5 -> b_{i-1} = 4
    assert int(q.level) == 2 and q.bit_width().item() == 4.0 == float(q.hard_bit_width())
    q.set_progress(0.9)
    assert int(q.level) == 2


@pytest.mark.parametrize("beta_param", ["clamp", "sigmoid"])
def test_force_bits_repair_hook(beta_param, caplog) -> None:
    q, w = _wq(bits=(1, 8), candidates=(1, 2, 4, 8), beta_param=beta_param)
    q.force_bits(4)
    assert q.hard_bit_width().item() == 4.0 and q.bit_width().item() == pytest.approx(4.0, abs=1e-3)
    with caplog.at_level(logging.WARNING, logger="mpq_plugin.methods.sdq"):
        q.force_bits(7)  # not a candidate: snaps down
    assert q.hard_bit_width().item() == 4.0 and "not a candidate" in caplog.text
    q.fix_bits()
    q.force_bits(2)  # after fix_bits too
    state = q.freeze(w)
    assert state.bits == 2 and torch.equal(state.dequantize(), q(w))
    with pytest.raises(ValueError, match="outside"):
        q.force_bits(9)


def test_sigmoid_parametrization() -> None:
    q, w = _wq(bits=(2, 4), beta_param="sigmoid", decay_threshold=0.1)
    assert q.beta is None and q.beta_value().item() == pytest.approx(torch.sigmoid(torch.tensor(9.0)).item())
    with torch.no_grad():
        q.beta_logit.fill_(-3.0)  # sigmoid ~ 0.047
    (q(w).sum() + q.bit_width()).backward()
    assert q.beta_logit.grad is not None and q.beta_logit.grad.abs() > 0
    assert q.decay_step() and int(q.level) == 1 and q.beta_logit.item() == pytest.approx(9.0)


def test_gumbel_estimator() -> None:
    q, w = _wq(bits=(2, 4), estimator="gumbel", gumbel_tau=2.0, gumbel_tau_final=0.5)
    _set_beta(q, 0.5)
    q_hi, q_lo = q.quantize_candidate(w, 2), q.quantize_candidate(w, 1)
    torch.manual_seed(0)
    for _ in range(5):
        q.zero_grad()
        y = q(w)
        assert torch.equal(y, q_hi) or torch.equal(y, q_lo)
        y.sum().backward()
        assert torch.isfinite(q.beta.grad) and q.beta.grad != 0
    q.set_progress(1.0)
    assert float(q.tau) == pytest.approx(0.5)
    soft, _ = _wq(bits=(2, 4), estimator="gumbel", gumbel_hard=False)
    _set_beta(soft, 0.5)
    torch.manual_seed(3)
    u = torch.rand(())
    logit = torch.log(torch.tensor(0.5)) - torch.log1p(torch.tensor(-0.5))
    z = gumbel_relaxed(logit, u, 1.0)
    torch.manual_seed(3)
    expect = interpolate(z, soft.quantize_candidate(w, 2), soft.quantize_candidate(w, 1))
    assert torch.allclose(soft(w), expect)


def test_gumbel_relaxed_sample_agrees_with_bernoulli_event() -> None:
    u = torch.linspace(0.01, 0.99, 99)
    for beta in (0.2, 0.5, 0.8):
        logit = torch.tensor(math.log(beta / (1 - beta)))
        hard = u <= beta
        soft = gumbel_relaxed(logit, u, 0.7)
        away = (u - beta).abs() > 1e-4
        assert torch.equal((soft >= 0.5)[away], hard[away])


# -- gradcheck of the smooth parts (float64) -------------------------------------------------------
def test_gradcheck_smooth_parts() -> None:
    d = dict(dtype=torch.float64)
    b = torch.tensor(0.37, requires_grad=True, **d)
    assert torch.autograd.gradcheck(lambda t: interpolated_bits(_ClampSTE.apply(t, 0.0, 1.0), 3.0, 4.0), (b,))
    assert torch.autograd.gradcheck(lambda t: interpolated_bits(torch.sigmoid(t), 1.0, 2.0), (b,))
    q_hi = torch.randn(4, 3, **d, requires_grad=True)
    q_lo = torch.randn(4, 3, **d, requires_grad=True)
    assert torch.autograd.gradcheck(interpolate, (b, q_hi, q_lo))
    u = torch.tensor(0.3, **d)
    assert torch.autograd.gradcheck(lambda t: gumbel_relaxed(t, u, 0.5), (torch.tensor(0.2, **d, requires_grad=True),))


def test_select_backward_equals_interpolation_gradient_float64() -> None:
    d = dict(dtype=torch.float64)
    q_hi, q_lo = torch.randn(5, 2, **d), torch.randn(5, 2, **d)
    g = torch.randn(5, 2, **d)
    for z in (True, False):
        b1 = torch.tensor(0.4, **d, requires_grad=True)
        b2 = torch.tensor(0.4, **d, requires_grad=True)
        hi1, lo1 = q_hi.clone().requires_grad_(True), q_lo.clone().requires_grad_(True)
        y = stochastic_select(torch.tensor(z), b1, hi1, lo1)
        assert torch.equal(y, q_hi if z else q_lo)
        (y * g).sum().backward()
        (interpolate(b2, q_hi, q_lo) * g).sum().backward()
        assert torch.allclose(b1.grad, b2.grad, rtol=1e-12, atol=1e-12)
        assert torch.equal(hi1.grad, g if z else torch.zeros_like(g))
        assert torch.equal(lo1.grad, torch.zeros_like(g) if z else g)


# -- freeze ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels", [None, 6])
@pytest.mark.parametrize("candidates,beta,bits", [((1, 2, 4), 0.3, 2), ((1, 2), 0.3, 1), ((2, 3, 8), 0.9, 8),
                                                  ((1, 2), 0.5, 2)])
@pytest.mark.parametrize("training", [True, False])
def test_freeze_matches_forward_after_fix_bits(channels, candidates, beta, bits, training) -> None:
    q, w = _wq(bits=(1, 8), channels=channels, candidates=candidates)
    with torch.no_grad():
        q.level.fill_(min(2, len(candidates) - 1))
    _set_beta(q, beta)
    q.fix_bits()
    q.train(training)
    state = q.freeze(w)
    state.check()
    assert state.bits == bits == int(q.bit_width())
    assert state.axis == (0 if channels else None) and state.scale.shape == ((channels,) if channels else ())
    y = q(w)
    assert torch.equal(state.dequantize(), y)
    if bits == 1:
        assert set(state.codes.unique().tolist()) <= {0, 1} and set(y.sign().unique().tolist()) <= {-1.0, 1.0}


def test_freeze_before_fix_matches_eval_forward() -> None:
    q, w = _wq(bits=(1, 4), channels=6)
    _set_beta(q, 0.3)
    state = q.freeze(w)
    assert state.bits == 3 and torch.equal(state.dequantize(), q.eval()(w))


def test_activation_quantizer_is_fixed_lsq_at_max_bits() -> None:
    q = SDQQuantizer(QuantizerSpec("act", (2, 6)), SDQOptions(candidates=(1, 2)))
    x = torch.rand(4, 10) * 3
    y = q(x)
    assert q.candidates == (6,) and not q.signed and q.bit_width().item() == 6.0
    assert not list(q.bit_parameters()) and q.steps.shape == (1, 1)
    s = q.steps.detach().reshape(())
    assert float(s) == pytest.approx(2 * x.abs().mean().item() / math.sqrt(63), rel=1e-5)
    q.fix_bits()
    st_ = q.freeze()
    assert st_.codes is None and torch.equal(st_.dequantize(st_.quantize(x)), y)


def test_mse_init_not_worse_than_lsq_init() -> None:
    for bits in (2, 3, 4):
        errs = []
        for init in ("lsq", "mse"):
            q, w = _wq(bits=(bits, bits), shape=(16, 32), init=init, channels=16)
            errs.append((q(w) - w).pow(2).sum().item())
        assert errs[1] <= errs[0] + 1e-6


# -- validation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("opts,msg", [
    (dict(candidates=(2, 2)), "duplicates"),
    (dict(candidates=(0, 2)), "1..16"),
    (dict(candidates=(2.0, 4)), "integer"),
    (dict(estimator="reinforce"), "estimator"),
    (dict(beta_param="softplus"), "beta_param"),
    (dict(beta_init=0.05), "decay_threshold"),
    (dict(beta_init=1.5), "beta_init"),
    (dict(decay_threshold=1.0), "decay_threshold"),
    (dict(gumbel_tau=0.0), "gumbel_tau"),
    (dict(init="percentile"), "init"),
])
def test_bad_options_fail_clearly(opts, msg) -> None:
    with pytest.raises(ValueError, match=msg):
        SDQOptions(**opts)


def test_candidates_outside_range_fail_and_are_sorted() -> None:
    with pytest.raises(ValueError, match=r"include \[1\].*widen weight_bits"):
        _wq(bits=(2, 8), candidates=(1, 2, 4))
    with pytest.raises(ValueError, match="candidates"):
        mpq_plugin.MPQConfig(method="sdq", weight_bits=(2, 8), options={"candidates": [4, 4]})
    assert SDQOptions(candidates=[8, 2, 4]).candidates == (2, 4, 8)
    q, _ = _wq(bits=(2, 8), candidates=(8, 2, 4))
    assert q.candidates == (2, 4, 8) and int(q.level) == 2 and q.steps.shape == (3, 1)
    fixed, _ = _wq(bits=(6, 6), candidates=(2, 4))  # a fixed-bit layer (override) ignores candidates
    assert fixed.candidates == (6,)


# -- Hypothesis -----------------------------------------------------------------------------------
@st.composite
def _cases(draw):
    lo = draw(st.integers(1, 7))
    hi = draw(st.integers(lo + 1, 8))
    cands = tuple(sorted(draw(st.sets(st.integers(lo, hi), min_size=2, max_size=4))))
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    per_channel = draw(st.booleans())
    beta = draw(st.floats(0.0, 1.0))
    level = draw(st.integers(1, len(cands) - 1))
    seed = draw(st.integers(0, 2**16))
    return cands, (lo, hi), shape, per_channel, beta, level, seed


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_cases())
def test_property_sampled_value_and_freeze(case) -> None:
    cands, bits, shape, per_channel, beta, level, seed = case
    q, w = _wq(bits=bits, channels=shape[0] if per_channel else None, shape=shape, seed=seed, candidates=cands)
    with torch.no_grad():
        q.level.fill_(level)
    _set_beta(q, beta)
    torch.manual_seed(seed)
    y = q(w)
    assert torch.equal(y, q.quantize_candidate(w, level)) or torch.equal(y, q.quantize_candidate(w, level - 1))
    assert cands[level - 1] <= q.bit_width().item() <= cands[level]
    q.fix_bits()
    state = q.freeze(w)
    state.check()
    beta32 = torch.tensor(beta, dtype=torch.float32).item()  # the stored parameter's value
    assert state.bits == (cands[level] if beta32 >= 0.5 else cands[level - 1])
    assert torch.equal(state.dequantize(), q(w))


# -- state and the public flow --------------------------------------------------------------------
@pytest.mark.parametrize("opts", [{}, dict(beta_param="sigmoid", estimator="gumbel", gumbel_tau_final=0.2)])
def test_state_dict_round_trip(opts) -> None:
    q, w = _wq(bits=(1, 4), channels=6, **opts)
    with torch.no_grad():
        q.level.fill_(2)
        q.steps.mul_(1.1)
        for p in q.bit_parameters():
            p.fill_(0.3)
    q.set_progress(0.5)
    other, _ = _wq(bits=(1, 4), channels=6, seed=1, **opts)
    other.load_state_dict(copy.deepcopy(q.state_dict()))
    for k, v in q.state_dict().items():
        assert torch.equal(v, other.state_dict()[k]), k
    assert torch.equal(q.eval()(w), other.eval()(w))
    assert q.bit_width().item() == other.bit_width().item()


def test_public_flow() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    mpq_plugin.quantize_(model, mpq_plugin.MPQConfig(method="sdq", weight_bits=(2, 8)))
    wq = model[0].weight_quantizer
    assert isinstance(wq, SDQQuantizer) and wq.candidates == tuple(range(2, 9))
    with torch.no_grad():
        wq.beta.fill_(0.6)
    x = torch.randn(5, 16)
    model(x).square().mean().backward()
    for _, layer in quant_layers(model):
        assert layer.weight_quantizer.steps.grad.abs().sum() > 0
        assert layer.weight_quantizer.beta.grad is not None and layer.weight_quantizer.beta.grad != 0
        assert layer.input_quantizer.steps.grad.abs().sum() > 0
    cost = mpq_plugin.model_cost(model)
    assert cost["layers"]["0"]["weight_bits"] == pytest.approx(0.6 * 8 + 0.4 * 7)
    plan = mpq_plugin.freeze(model)
    assert plan["0"].weight_bits == 8 and plan["2"].weight_bits == 8 and plan["0"].act_bits == 8
    model.eval()
    for _, layer in quant_layers(model):
        assert torch.equal(layer.weight_quantizer.freeze(layer.weight).dequantize(), layer.quantized_weight())


def test_search_decays_bits_to_the_budget() -> None:
    """With the search's hinge penalty on the expected bits, DBPs fall, layers decay, and the
    frozen plan meets the average-bit budget."""
    from mpq_plugin.search.searcher import MPQSearch

    torch.manual_seed(0)
    x = torch.randn(32, 16)
    y = x[:, :4] * 2
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    mpq_plugin.quantize_(model, mpq_plugin.MPQConfig(method="sdq", weight_bits=(1, 8), act_bits=None,
                                                     budget=mpq_plugin.Budget(avg_weight_bits=3.0)))
    steps = 120
    search = MPQSearch(model, total_steps=steps)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = (model(x) - y).pow(2).mean() + search.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        search.step()
    levels = [int(layer.weight_quantizer.level) for _, layer in quant_layers(model)]
    assert max(levels) < 7, f"no layer decayed: {levels}"
    plan = search.freeze()
    assert plan.avg_weight_bits() <= 3.0 + 1e-9
    for _, layer in quant_layers(model):
        st_ = layer.weight_quantizer.freeze(layer.weight)
        assert torch.equal(st_.dequantize(), layer.quantized_weight())
