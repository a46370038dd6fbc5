"""ConvBn1d/2d (float) and QuantConvBn1d/2d (QAT with BN folding)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mpq_plugin
from mpq_plugin.nn.conv_bn import ConvBn1d, ConvBn2d, QuantConvBn1d, QuantConvBn2d, fuse_conv_bn
from mpq_plugin.nn.fake_quantizer import FakeQuantizer, QuantizerSpec
from mpq_plugin.nn.layers import QuantLayer, to_float
from mpq_plugin.registry import get_method
from tests.conftest import config_for

METHODS = mpq_plugin.list_methods()
FOLDING = [m for m in METHODS if not get_method(m).quantizer_cls.replaces_weight]
REPLACING = [m for m in METHODS if get_method(m).quantizer_cls.replaces_weight]
X = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _conv_bn(groups: int = 1, bias: bool = False, affine: bool = True, seed: int = 0):
    """A Conv2d + BatchNorm2d with non-trivial BN statistics and affine parameters."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(3, 6, 3, padding=1, groups=groups, bias=bias)
    bn = nn.BatchNorm2d(6, affine=affine)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.3, 3.0)
        if affine:
            bn.weight.normal_()
            bn.bias.normal_()
    return conv, bn


def _fused_model(**kw) -> nn.Sequential:
    conv, bn = _conv_bn(**kw)
    return nn.Sequential(fuse_conv_bn(conv, bn), nn.ReLU())


def _quantized(method: str, **kw) -> nn.Sequential:
    model = _fused_model(**kw)
    return mpq_plugin.quantize_(model, config_for(method), example_inputs=(X,))


class _IdentityQuantizer(FakeQuantizer):
    """Returns its input: isolates the folding arithmetic from any rounding."""

    def initialize(self, x: torch.Tensor) -> None:
        pass

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return x


# -- float ConvBn ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [False, True])
def test_float_convbn_equals_conv_then_bn_eval_and_train(bias: bool) -> None:
    conv, bn = _conv_bn(bias=bias)
    ref_conv, ref_bn = copy.deepcopy(conv), copy.deepcopy(bn)
    fused = fuse_conv_bn(conv, bn)
    assert type(fused) is ConvBn2d and fused.weight is conv.weight and fused.bn is bn
    fused.eval(), ref_bn.eval()
    assert torch.equal(fused(X), ref_bn(ref_conv(X)))
    fused.train(), ref_bn.train()
    for _ in range(2):  # running statistics update identically
        assert torch.equal(fused(X), ref_bn(ref_conv(X)))
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(fused.bn, k), getattr(ref_bn, k)), k
    assert not torch.equal(fused.bn.running_mean, _conv_bn(bias=bias)[1].running_mean)


def test_float_convbn1d_and_constructor() -> None:
    torch.manual_seed(0)
    conv, bn = nn.Conv1d(4, 5, 3, padding=1), nn.BatchNorm1d(5)
    fused = fuse_conv_bn(conv, bn)
    assert type(fused) is ConvBn1d
    x = torch.randn(3, 4, 10)
    assert torch.equal(fused.eval()(x), bn.eval()(conv(x)))
    built = ConvBn2d(3, 8, 3, padding=1)
    assert built.bias is None and isinstance(built.bn, nn.BatchNorm2d) and built(X).shape == (6, 8, 8, 8)
    assert set(built.state_dict()) >= {"weight", "bn.weight", "bn.running_var"}


def test_folded_weight_and_bias_reproduce_eval_bn() -> None:
    for kw in ({}, {"bias": True}, {"affine": False}, {"groups": 3}):
        conv, bn = _conv_bn(**kw)
        fused = fuse_conv_bn(conv, bn).eval()
        manual = F.conv2d(X, fused.folded_weight(), None, 1, 1, 1, fused.groups)
        manual = manual + fused.folded_bias().view(1, -1, 1, 1)
        torch.testing.assert_close(manual, fused(X), rtol=1e-5, atol=1e-5, msg=str(kw))


def test_fuse_conv_bn_rejects_bad_pairs() -> None:
    conv, bn = _conv_bn()
    with pytest.raises(TypeError, match="BatchNorm2d"):
        fuse_conv_bn(conv, nn.BatchNorm1d(6))
    with pytest.raises(TypeError, match="Conv1d or nn.Conv2d"):
        fuse_conv_bn(nn.Linear(3, 6), bn)
    with pytest.raises(ValueError, match="features"):
        fuse_conv_bn(conv, nn.BatchNorm2d(7))
    with pytest.raises(ValueError, match="running statistics"):
        fuse_conv_bn(conv, nn.BatchNorm2d(6, track_running_stats=False))


def test_unfuse_gives_back_conv_and_bn() -> None:
    conv, bn = _conv_bn()
    fused = fuse_conv_bn(conv, bn).eval()
    c2, b2 = fused.unfuse()
    assert type(c2) is nn.Conv2d and c2.weight is conv.weight and b2 is bn and "bn" not in dict(c2.named_children())
    assert torch.equal(b2(c2(X)), fused(X))


# -- quantized ConvBn ----------------------------------------------------------------------------
def test_quantize_registers_convbn() -> None:
    model = _quantized("lsq")
    assert type(model[0]) is QuantConvBn2d and isinstance(model[0], ConvBn2d)
    conv, bn = nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4)
    m1 = mpq_plugin.quantize_(nn.Sequential(fuse_conv_bn(conv, bn)), config_for("lsq"), (torch.randn(2, 3, 9),))
    assert type(m1[0]) is QuantConvBn1d
    m1.train()(torch.randn(4, 3, 9)).sum().backward()
    assert conv.weight.grad is not None and bn.weight.grad is not None


@pytest.mark.parametrize("method", FOLDING)
def test_weight_quantizer_sees_folded_weight(method: str) -> None:
    """The quantizer is initialized from, and quantizes, w * gamma / sqrt(var + eps)."""
    model = _quantized(method)
    layer = model[0]
    assert layer.folds_bn
    assert torch.equal(layer.weight_to_quantize(), layer.folded_weight())
    assert not torch.allclose(layer.folded_weight(), layer.weight)
    # fake-quant of the folded weight is close to it, far from the raw weight
    err_fold = (layer.quantized_weight() - layer.folded_weight()).abs().max()
    err_raw = (layer.quantized_weight() - layer.weight).abs().max()
    assert err_fold < 0.5 * err_raw, f"{method}: quantizer was not initialized from the folded weight"


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("method", FOLDING)
def test_eval_is_deployed_computation_bit_for_bit(method: str, groups: int) -> None:
    model = _quantized(method, groups=groups, bias=True)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    for _ in range(2):  # move parameters and BN statistics away from their init
        opt.zero_grad()
        model(X).square().mean().backward()
        opt.step()
    mpq_plugin.freeze(model)
    model.eval()
    layer = model[0]
    with torch.no_grad():
        state = layer.weight_quantizer.freeze(layer.folded_weight())
        state.check()
        xq = layer.quantize_input(X)
        ref = F.conv2d(xq, state.dequantize(), None, 1, 1, 1, groups) + layer.folded_bias().view(1, -1, 1, 1)
        assert torch.equal(layer(X), ref), f"{method}: eval output != conv(x, frozen folded weight) + folded bias"


@pytest.mark.parametrize("bias", [False, True])
def test_folding_arithmetic_with_identity_quantizer(bias: bool) -> None:
    """With a pass-through quantizer, train == float conv+BN (batch stats), eval == float eval."""
    conv, bn = _conv_bn(bias=bias)
    ref = copy.deepcopy(nn.Sequential(conv, bn))
    model = nn.Sequential(fuse_conv_bn(conv, bn))
    mpq_plugin.quantize_(model, config_for("lsq", act_bits=None))
    model[0].weight_quantizer = _IdentityQuantizer(QuantizerSpec("weight", (8, 8)), options=object())
    model.train(), ref.train()
    torch.testing.assert_close(model(X), ref(X), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_var, ref[1].running_var, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bn.running_mean, ref[1].running_mean, rtol=1e-6, atol=1e-6)
    model.eval(), ref.eval()
    torch.testing.assert_close(model(X), ref(X), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_conv_bn_and_quantizers(method: str) -> None:
    model = _quantized(method).train()
    model(X).square().mean().backward()
    layer = model[0]
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{method}: no gradient reached {missing}"
    for p in (layer.bn.weight, layer.bn.bias):
        assert p.grad is not None and p.grad.abs().sum() > 0
    if layer.folds_bn:
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    qgrads = [p.grad.abs().sum() for n, p in layer.named_parameters()
              if "quantizer" in n and p.requires_grad]
    assert qgrads and any(g > 0 for g in qgrads), f"{method}: quantizer parameters got no gradient"


@pytest.mark.parametrize("method", METHODS)
def test_train_mode_updates_running_stats_eval_does_not(method: str) -> None:
    model = _quantized(method)
    bn = model[0].bn
    mean0, var0, n0 = bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)
    model.eval()
    with torch.no_grad():
        model(X)
    assert torch.equal(bn.running_mean, mean0) and int(bn.num_batches_tracked) == n0
    model.train()
    with torch.no_grad():
        model(X)
    assert not torch.equal(bn.running_mean, mean0) and not torch.equal(bn.running_var, var0)
    assert int(bn.num_batches_tracked) == n0 + 1


def test_frozen_bn_during_training_uses_the_deployed_path() -> None:
    model = _quantized("lsq", bias=True).train()
    model[0].bn.eval()
    y_train = model(X)
    model.eval()
    assert torch.equal(y_train, model(X))


def test_zero_gamma_channel_stays_finite() -> None:
    model = _quantized("lsq")
    with torch.no_grad():
        model[0].bn.weight[2] = 0.0
    y = model.train()(X)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(model[0].bn.weight.grad).all()
    assert torch.allclose(y[:, 2], F.relu(model[0].bn.bias[2]).expand_as(y[:, 2]))


@pytest.mark.parametrize("method", REPLACING)
def test_weight_replacing_methods_keep_bn_unfolded(method: str) -> None:
    """Rule: a quantizer that synthesizes the weight (CSQ) quantizes the raw conv weight and BN
    runs after it in both modes; folding happens only at export (re-quantizing the folded weight)."""
    model = _quantized(method)
    layer = model[0]
    assert not layer.folds_bn
    assert torch.equal(layer.weight_to_quantize(), layer.weight)
    mpq_plugin.freeze(model)
    model.eval()
    with torch.no_grad():
        xq = layer.quantize_input(X)
        wq = layer.quantized_weight()
        assert torch.equal(layer(X), layer.bn(F.conv2d(xq, wq, None, 1, 1)))
        # export-time fold of the quantized weight reproduces the eval output up to float rounding
        folded = F.conv2d(xq, layer.folded_weight(wq), None, 1, 1) + layer.folded_bias().view(1, -1, 1, 1)
        torch.testing.assert_close(folded, layer(X), rtol=1e-4, atol=1e-4)
    before = layer.bn.running_mean.clone()
    model.train()(X)
    assert not torch.equal(layer.bn.running_mean, before)


@pytest.mark.parametrize("method", METHODS)
def test_geometry_counts_folded_bias(method: str) -> None:
    model = _quantized(method)
    g = model[0].geometry("0")
    assert g.bias_numel == 6 and g.weight_numel == 6 * 3 * 9 and g.macs == 8 * 8 * 6 * 27
    assert mpq_plugin.model_cost(model)["layers"]["0"]["bias_params"] == 6


@pytest.mark.parametrize("method", METHODS)
def test_to_float_round_trip(method: str) -> None:
    float_model = _fused_model(bias=True).eval()
    expected = float_model(X)
    conv = float_model[0]
    model = mpq_plugin.quantize_(float_model, config_for(method), (X,))
    back = to_float(model[0])
    assert type(back) is ConvBn2d and not isinstance(back, QuantLayer)
    assert back.bn is conv.bn and back.bias is conv.bias
    assert not hasattr(back, "weight_quantizer") and set(back.state_dict()) == set(conv.state_dict())
    if get_method(method).quantizer_cls.replaces_weight:
        torch.testing.assert_close(back.weight, model[0].weight_quantizer.float_weight().detach())
    else:
        assert back.weight is conv.weight
        assert torch.equal(back.eval()(X), conv.eval()(X))
        assert torch.equal(nn.Sequential(back, nn.ReLU()).eval()(X), expected)


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_round_trip(method: str) -> None:
    model = _quantized(method).train()
    model(X).sum().backward()
    sd = copy.deepcopy(model.state_dict())
    assert {"0.weight", "0.bn.weight", "0.bn.running_var", "0.bn.num_batches_tracked"} <= set(sd)
    other = _quantized(method)
    other.load_state_dict(sd)
    model.eval(), other.eval()
    assert torch.equal(model(X), other(X))
