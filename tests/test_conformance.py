"""Conformance suite: every registered method, through the same checks.

A new method registered with ``@register_method`` is tested here with no extra code.
"""
from __future__ import annotations

import copy

import pytest
import torch

import mpq_plugin
from mpq_plugin.nn.layers import quant_layers
from tests.conftest import TinyConvNet, config_for

METHODS = mpq_plugin.list_methods()
X = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _quantized(method: str, **kw) -> TinyConvNet:
    torch.manual_seed(0)
    model = TinyConvNet()
    return mpq_plugin.quantize_(model, config_for(method, **kw), example_inputs=(X,))


@pytest.mark.parametrize("method", METHODS)
def test_forward_backward_reaches_every_parameter(method: str) -> None:
    model = _quantized(method).train()
    out = model(X)
    assert out.shape == (6, 10) and torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{method}: no gradient reached {missing}"
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), f"{method}: non-finite gradient in {n}"
    qparams = [n for n, p in model.named_parameters() if "quantizer" in n and p.requires_grad]
    assert qparams, f"{method}: quantizers have no learnable parameter"
    assert any(model.get_parameter(n).grad.abs().sum() > 0 for n in qparams)


@pytest.mark.parametrize("method", METHODS)
def test_freeze_matches_fake_quant_bit_for_bit(method: str) -> None:
    model = _quantized(method)
    plan = mpq_plugin.freeze(model)
    model.eval()
    assert set(plan) == {n for n, _ in quant_layers(model)}
    for name, layer in quant_layers(model):
        wq = layer.weight_quantizer
        state = wq.freeze(layer.weight_to_quantize())
        state.check()
        fq = layer.quantized_weight()
        assert torch.equal(state.dequantize(), fq), f"{method}/{name}: weight freeze != fake-quant"
        assert state.bits == plan[name].weight_bits
        aq = layer.input_quantizer
        if aq is not None:
            x = torch.randn(3, *layer._in_shape).abs() * 2 if not aq.signed else torch.randn(3, *layer._in_shape)
            ast = aq.freeze()
            codes = ast.quantize(x)
            assert torch.equal(ast.dequantize(codes), aq(x)), f"{method}/{name}: activation freeze != fake-quant"
            assert codes.min() >= ast.qmin and codes.max() <= ast.qmax


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_round_trip_is_exact(method: str) -> None:
    model = _quantized(method)
    # a few training steps so parameters move away from their init
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(X).square().mean().backward()
        opt.step()
    sd = copy.deepcopy(model.state_dict())
    other = _quantized(method)
    other.load_state_dict(sd)
    for k, v in other.state_dict().items():
        assert torch.equal(v, sd[k]), f"{method}: {k} differs after load_state_dict"
    model.eval(), other.eval()
    assert torch.equal(model(X), other(X))


@pytest.mark.parametrize("method", METHODS)
def test_deterministic_under_seed(method: str) -> None:
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = _quantized(method).train()
        torch.manual_seed(7)
        outs.append(torch.stack([model(X) for _ in range(3)]))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("method", METHODS)
def test_more_bits_less_error(method: str) -> None:
    """SQNR on a Gaussian tensor grows with the (fixed) bit-width."""
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    sqnr = []
    for b in (2, 4, 8):
        model = torch.nn.Sequential(torch.nn.Linear(128, 64, bias=False))
        model[0].weight.data.copy_(w)
        mpq_plugin.quantize_(model, config_for(method, weight_bits=b, act_bits=None))
        mpq_plugin.freeze(model)
        wq = model[0].quantized_weight().detach()
        err = (wq - w).pow(2).mean()
        sqnr.append(10 * torch.log10(w.pow(2).mean() / err).item())
    assert sqnr[0] < sqnr[1] < sqnr[2], f"{method}: SQNR not increasing with bits: {sqnr}"
    assert sqnr[2] > 25, f"{method}: 8-bit SQNR only {sqnr[2]:.1f} dB"


@pytest.mark.parametrize("method", METHODS)
def test_bit_width_within_range_and_plan(method: str) -> None:
    model = _quantized(method)
    for _, layer in quant_layers(model):
        lo, hi = layer.weight_quantizer.spec.bits
        b = float(layer.weight_quantizer.bit_width().detach())
        assert lo - 1e-6 <= b <= hi + 1e-6
    plan = mpq_plugin.freeze(model)
    for lb in plan.values():
        assert isinstance(lb.weight_bits, int)
    again = mpq_plugin.BitPlan.from_json(plan.to_json())
    assert again.to_dict() == plan.to_dict() and again.cost == plan.cost
