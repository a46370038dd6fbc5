"""MPQObserver in the real hosts: torch.ao eager PTQ, torchao PT2E PTQ, and mpq quantizer init."""
import pytest
import torch
from torch import nn

import torch.ao.quantization as tq
from mpq_plugin.integrations.observer import MPQObserver


def _brute_mse(x, qmin, qmax, scale, zp):
    q = torch.clamp(torch.round(x / scale) + zp, qmin, qmax)
    return float(((q - zp) * scale - x).pow(2).mean())


def test_torch_ao_ptq_mse_optimal():
    torch.manual_seed(0)
    m = nn.Sequential(tq.QuantStub(), nn.Linear(16, 8), tq.DeQuantStub())
    m.qconfig = tq.QConfig(activation=MPQObserver.with_args(dtype=torch.quint8, quant_min=0, quant_max=15),
                           weight=MPQObserver.with_args(dtype=torch.qint8))
    tq.prepare(m, inplace=True)
    for _ in range(3):
        m(torch.distributions.Laplace(0.0, 1.0).sample((64, 16)))  # heavy tails
    obs = m[0].activation_post_process
    assert isinstance(obs, MPQObserver)
    scale, zp = obs.calculate_qparams()
    x = obs.sample
    best = _brute_mse(x, 0, 15, float(scale), int(zp))
    lo, hi = float(x.min()), float(x.max())
    for f in torch.linspace(0.05, 1, 40).tolist():  # no clip fraction does clearly better
        s = (hi - lo) * f / 15
        z = int(min(max(-round(lo * f / s), 0), 15))
        assert best <= _brute_mse(x, 0, 15, s, z) * 1.02
    mm_scale = (hi - lo) / 15
    assert best < _brute_mse(x, 0, 15, mm_scale, int(round(-lo / mm_scale)))


def test_pt2e_ptq_uses_observer_qparams():
    pt2e = pytest.importorskip("torchao.quantization.pt2e.quantize_pt2e")
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)
    from torchao.quantization.pt2e.quantizer import QuantizationSpec
    import dataclasses
    base = get_default_x86_inductor_quantization_config()
    act = QuantizationSpec(dtype=torch.uint8, quant_min=0, quant_max=255, qscheme=torch.per_tensor_affine,
                           is_dynamic=False, observer_or_fake_quant_ctr=MPQObserver.with_args(dtype=torch.uint8))
    cfg = dataclasses.replace(base, input_activation=act)
    model = nn.Sequential(nn.Linear(16, 8)).eval()
    ex = (torch.randn(4, 16),)
    g = torch.export.export(model, ex).module()
    p = pt2e.prepare_pt2e(g, X86InductorQuantizer().set_global(cfg))
    obs = [m for m in p.modules() if isinstance(m, MPQObserver)]
    assert obs
    for _ in range(3):
        p(torch.randn(4, 16))
    qparams = [o.calculate_qparams() for o in obs]
    c = pt2e.convert_pt2e(p)
    out = c(ex[0])
    assert torch.allclose(out, model(ex[0]), atol=0.1)
    scales = [float(n.args[1]) for n in c.graph.nodes if n.op == "call_function" and "quantize_per_tensor" in str(n.target)]
    assert any(abs(s - float(q[0])) < 1e-6 for s in scales for q in qparams)


def test_initialize_quantizer_and_suggest_bits():
    from mpq_plugin.nn.fake_quantizer import QuantizerSpec
    from mpq_plugin.registry import get_method
    torch.manual_seed(0)
    batches = [torch.randn(8, 16) for _ in range(3)]
    obs = MPQObserver(dtype=torch.qint8, max_samples=10**6)
    for b in batches:
        obs(b)
    spec = get_method("lsq")
    q1 = spec.quantizer_cls(QuantizerSpec(role="weight", bits=(4, 4), signed=True), spec.options_cls())
    q2 = spec.quantizer_cls(QuantizerSpec(role="weight", bits=(4, 4), signed=True), spec.options_cls())
    obs.initialize(q1)
    with torch.no_grad():
        q2._initialize_from(torch.cat([b.reshape(-1) for b in batches]))
    x = torch.randn(5, 16)
    assert torch.equal(q1(x), q2(x))
    bits = [obs.suggest_bits((2, 8), t) for t in (5.0, 15.0, 25.0, 35.0)]
    assert bits == sorted(bits) and bits[0] < bits[-1]


def test_fake_quant_calibrates_on_first_batches():
    from mpq_plugin.ao import LSQFakeQuantize
    from mpq_plugin.nn.fake_quantizer import QuantizerSpec
    from mpq_plugin.registry import get_method
    torch.manual_seed(1)
    fq = LSQFakeQuantize(role="act", bits=4, calibration_batches=3)
    batches = [torch.randn(8, 16).abs() for _ in range(3)]
    for b in batches:
        assert torch.equal(fq(b), b)  # observing: pass-through
    assert bool(fq.quantizer.initialized)
    spec = get_method("lsq")
    q = spec.quantizer_cls(QuantizerSpec(role="act", bits=(4, 4), signed=None), spec.options_cls())
    with torch.no_grad():
        q._initialize_from(torch.cat([b.reshape(-1) for b in batches]))
    x = torch.randn(5, 16).abs()
    assert torch.equal(fq(x), q(x))
    assert not torch.equal(fq(x), x)
