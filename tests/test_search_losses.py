"""KD loss, bin regularization (against loop references) and entropy-aware BR over a model."""
import logging
import math
import time

import pytest
import torch
from torch import nn

import mpq_plugin
from mpq_plugin.nn.layers import quant_layers
from mpq_plugin.search.losses import (
    ENTROPY_WEIGHTS,
    bin_regularization,
    code_entropy,
    entropy_aware_bin_regularization,
    kd_loss,
)


# -- slow loop references ------------------------------------------------------------------------------
def br_loop(w, codes, scale, zp=0.0, axis=None):
    """ICCV 2021 BR, one bin at a time (per channel and code when ``scale`` has channels)."""
    scale = torch.as_tensor(scale, dtype=w.dtype)
    zp = torch.as_tensor(zp, dtype=w.dtype)
    if scale.numel() == 1:
        chans = [(w.reshape(-1), codes.reshape(-1), scale.reshape(()), zp.reshape(()))]
    else:
        wt, ct = w.transpose(0, axis), codes.transpose(0, axis)
        chans = [(wt[c].reshape(-1), ct[c].reshape(-1), scale[c], zp.reshape(-1)[c] if zp.numel() > 1 else zp)
                 for c in range(scale.numel())]
    total = torch.zeros((), dtype=w.dtype)
    for wc, cc, s, z in chans:
        for j in sorted(set(cc.tolist())):
            vals = wc[cc == j]
            total = total + (vals.mean() - (j - z) * s) ** 2
            if vals.numel() >= 2:
                total = total + vals.var(unbiased=False)
    return total


def vvtq_loop(w, codes, scale, qmin, qmax):
    """The SDQ author's later code form (per tensor)."""
    wc = torch.clamp(w, qmin * scale, qmax * scale)
    loss = ((wc - (codes * scale).detach()) ** 2).mean()
    for j in range(qmin, qmax + 1):
        vals = wc[codes == j]
        if vals.numel() > 1:
            loss = loss + vals.var()
    return loss


def _codes(w, s, qmin=-8, qmax=7):
    return torch.clamp(torch.round(w / s), qmin, qmax).to(torch.int64)


# -- KD -------------------------------------------------------------------------------------------------
def test_kd_loss_equals_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[0.2, 1.0, 2.0], [1.0, 1.0, 1.0]])
    for tau in (1.0, 2.0):
        ref = 0.0
        for i in range(2):
            zt = [math.exp(v / tau) for v in t[i].tolist()]
            zs = [math.exp(v / tau) for v in s[i].tolist()]
            pt = [v / sum(zt) for v in zt]
            logps = [math.log(v / sum(zs)) for v in zs]
            ref += -sum(a * b for a, b in zip(pt, logps))
        assert float(kd_loss(s, t, tau)) == pytest.approx(ref / 2 * tau * tau, rel=1e-6)


def test_kd_loss_flattens_token_dims_and_masks():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    assert float(kd_loss(s, t)) == pytest.approx(float(kd_loss(s.reshape(10, 7), t.reshape(10, 7))))
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, :2] = True
    assert float(kd_loss(s, t, mask=mask)) == pytest.approx(float(kd_loss(s[0, :2], t[0, :2])))
    assert float(kd_loss(s, t, mask=torch.zeros(2, 5))) == 0.0
    with pytest.raises(ValueError, match="mask"):
        kd_loss(s, t, mask=torch.ones(3))


def test_kd_loss_minimum_is_the_teacher():
    torch.manual_seed(1)
    t = torch.randn(4, 6, dtype=torch.float64)
    s = t.clone().requires_grad_(True)
    at_teacher = kd_loss(s, t, 2.0)
    at_teacher.backward()
    assert torch.allclose(s.grad, torch.zeros_like(s.grad), atol=1e-12)
    for _ in range(20):  # any other student scores worse (cross-entropy >= entropy)
        assert float(kd_loss(t + 0.3 * torch.randn_like(t), t, 2.0)) > float(at_teacher.detach())
    # shifting all logits of a row keeps the softmax: still the minimum
    assert float(kd_loss(t + 5.0, t, 2.0)) == pytest.approx(float(at_teacher.detach()))


def test_kd_loss_does_not_train_the_teacher_and_validates():
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 4, requires_grad=True)
    kd_loss(s, t).backward()
    assert t.grad is None and s.grad is not None
    assert kd_loss(s.half(), t.half()).dtype == torch.float32
    with pytest.raises(ValueError, match="shape"):
        kd_loss(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(s, t, 0.0)


# -- BR -------------------------------------------------------------------------------------------------
def test_br_matches_loop_per_tensor():
    torch.manual_seed(0)
    w = torch.randn(8, 12, dtype=torch.float64) * 0.1
    s = torch.tensor(0.03, dtype=torch.float64)
    codes = _codes(w, s)
    assert float(bin_regularization(w, codes, s)) == pytest.approx(float(br_loop(w, codes, s)), rel=1e-10)
    # with a zero point
    z = torch.tensor(3.0, dtype=torch.float64)
    c2 = _codes(w, s, -5, 10) + 3
    assert float(bin_regularization(w, c2, s, z)) == pytest.approx(float(br_loop(w, c2, s, z)), rel=1e-10)


def test_br_matches_loop_per_channel_on_any_axis():
    torch.manual_seed(1)
    w = torch.randn(4, 5, 3, dtype=torch.float64)
    for axis in (0, 1):
        s = torch.rand(w.shape[axis], dtype=torch.float64) * 0.5 + 0.2
        shape = [1] * 3
        shape[axis] = -1
        codes = _codes(w, s.reshape(shape), -4, 3)
        got = bin_regularization(w, codes, s, torch.zeros_like(s), axis=axis)
        assert float(got) == pytest.approx(float(br_loop(w, codes, s, 0.0, axis)), rel=1e-10)
    with pytest.raises(ValueError, match="axis"):
        bin_regularization(w, codes, s)


def test_br_sparse_bins_path_equals_loop():
    torch.manual_seed(2)
    w = torch.randn(6, dtype=torch.float64) * 100
    s = torch.tensor(0.01, dtype=torch.float64)
    codes = _codes(w, s, -2**15, 2**15 - 1)  # code span >> elements: the unique() path
    assert float(bin_regularization(w, codes, s)) == pytest.approx(float(br_loop(w, codes, s)), rel=1e-10)


def test_br_is_zero_on_exact_levels_and_positive_otherwise():
    s = torch.tensor(0.5)
    codes = torch.tensor([-2, -1, 0, 1, 1, 1])
    assert float(bin_regularization(codes * s, codes, s)) == 0.0
    w = codes * s + torch.tensor([0.0, 0.1, 0.0, 0.05, -0.05, 0.0])
    assert float(bin_regularization(w, codes, s)) > 0.0


def test_vvtq_form_matches_loop():
    torch.manual_seed(3)
    w = torch.randn(50, dtype=torch.float64)
    s = torch.tensor(0.2, dtype=torch.float64)
    codes = _codes(w, s, -4, 3)
    got = bin_regularization(w, codes, s, form="vvtq", qmin=-4, qmax=3)
    assert float(got) == pytest.approx(float(vvtq_loop(w, codes, s, -4, 3)), rel=1e-10)
    with pytest.raises(ValueError, match="form"):
        bin_regularization(w, codes, s, form="l2")


def test_br_gradcheck_weights_and_scale():
    torch.manual_seed(4)
    w = (torch.randn(40, dtype=torch.float64) * 0.3).requires_grad_(True)
    s = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    codes = _codes(w.detach(), s.detach(), -4, 3)
    assert torch.autograd.gradcheck(lambda w_, s_: bin_regularization(w_, codes, s_), (w, s))
    sc = (torch.rand(4, dtype=torch.float64) * 0.2 + 0.05).requires_grad_(True)
    w2 = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    c2 = _codes(w2.detach(), sc.detach()[:, None], -4, 3)
    assert torch.autograd.gradcheck(lambda w_, s_: bin_regularization(w_, c2, s_, axis=0), (w2, sc))
    inside = (torch.rand(30, dtype=torch.float64) - 0.5).requires_grad_(True)
    c3 = _codes(inside.detach(), s.detach(), -4, 3)
    assert torch.autograd.gradcheck(
        lambda w_: bin_regularization(w_, c3, s.detach(), form="vvtq", qmin=-4, qmax=3), (inside,))


def test_br_is_vectorized():
    torch.manual_seed(5)
    w = torch.randn(256, 1024) * 0.05
    s = torch.rand(256) * 0.001 + 0.0005
    codes = _codes(w, s[:, None], -128, 127)
    bin_regularization(w, codes, s, axis=0)  # warm-up
    t0 = time.perf_counter()
    bin_regularization(w, codes, s, axis=0)
    assert time.perf_counter() - t0 < 2.0  # 262k weights, 65k bins: no Python loop over bins


# -- entropy and EBR over a model ---------------------------------------------------------------------------
def test_code_entropy():
    assert code_entropy(torch.tensor([0, 1, 2, 3] * 5)) == pytest.approx(2.0)
    assert code_entropy(torch.tensor([7, 7, 7])) == 0.0
    assert code_entropy(torch.tensor([-1, 1])) == pytest.approx(1.0)


def _frozen_lsq(per_channel):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    cfg = mpq_plugin.MPQConfig(method="lsq", weight_bits=3, act_bits=8, per_channel=per_channel)
    mpq_plugin.quantize_(m, cfg, (torch.randn(2, 8),))
    return m


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("weight", ["entropy_per_bit", "deficit", "inv_bits", "none"])
def test_ebr_equals_weighted_sum_of_loop_references(per_channel, weight):
    m = _frozen_lsq(per_channel)
    mpq_plugin.freeze(m)
    ref = 0.0
    for _, layer in quant_layers(m):
        st = layer.weight_quantizer.freeze(layer.weight)
        br = br_loop(layer.weight.detach().double(), st.codes, st.scale.double(), st.zero_point.double(), st.axis)
        ref += ENTROPY_WEIGHTS[weight](st) * float(br)
    got = entropy_aware_bin_regularization(m, lam=0.1, entropy_weight=weight)
    assert float(got.detach()) == pytest.approx(0.1 * ref, rel=1e-5)


def test_ebr_default_weight_is_entropy_per_bit_and_reaches_weights():
    m = _frozen_lsq(False)
    mpq_plugin.freeze(m)
    default = entropy_aware_bin_regularization(m)
    with torch.no_grad():
        assert float(default) == pytest.approx(float(entropy_aware_bin_regularization(m, entropy_weight="entropy_per_bit")))
        assert float(entropy_aware_bin_regularization(m, entropy_weight=False)) == pytest.approx(
            float(entropy_aware_bin_regularization(m, entropy_weight="none")))
        assert float(entropy_aware_bin_regularization(m, entropy_weight=lambda st: 0.0)) == 0.0
    default.backward()
    assert all(layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0 for _, layer in quant_layers(m))
    for st in [layer.weight_quantizer.freeze(layer.weight) for _, layer in quant_layers(m)]:
        assert 0.0 < ENTROPY_WEIGHTS["entropy_per_bit"](st) <= 1.0


def test_ebr_before_freeze_is_zero_with_a_warning(caplog):
    m = _frozen_lsq(False)
    with caplog.at_level(logging.WARNING):
        assert float(entropy_aware_bin_regularization(m)) == 0.0
    assert "fixed bits" in caplog.text
    assert float(entropy_aware_bin_regularization(m, only_fixed=False).detach()) > 0.0


def test_ebr_rejects_bad_weights():
    m = _frozen_lsq(False)
    with pytest.raises(ValueError, match="entropy_weight"):
        entropy_aware_bin_regularization(m, entropy_weight="max")
    with pytest.raises(TypeError):
        entropy_aware_bin_regularization(m, entropy_weight=3)
