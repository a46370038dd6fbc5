"""torch.ao eager ``prepare_qat`` and FX ``prepare_qat_fx`` with mpq_plugin's fake-quants, end to end
through the real host APIs: the one-line qconfig change, Conv-BN-ReLU fusion, training, gradients
into the methods' parameters, costing and the budgeted search on the prepared model."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from training_loop import train_steps

tq = pytest.importorskip("torch.ao.quantization")

import mpq_plugin  # noqa: E402
from mpq_plugin import Budget  # noqa: E402
from mpq_plugin.datasets import load_digits_arrays  # noqa: E402
from mpq_plugin.models.small_cnn import SmallCNN  # noqa: E402
from mpq_plugin.registry import get_method, list_methods  # noqa: E402
from mpq_plugin.search import MPQSearch  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                         "ignore::UserWarning")]

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    import mpq_plugin.ao as mao

# the learnable bit-width parameter of each method (gradients must reach it)
torch.set_num_threads(1)  # tiny ops: one thread avoids oversubscription on 2 cores

BIT_PARAMS = {"sdq": "beta", "learned_range": "q_max", "csq": "mu", "lsq": "step"}


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits_arrays()
    return (torch.tensor(x[:512], dtype=torch.float32).reshape(-1, 1, 8, 8), torch.tensor(y[:512]).long())


def _fx(method: str, x: torch.Tensor, **kw) -> nn.Module:
    torch.manual_seed(0)
    mapping = tq.get_default_qat_qconfig_mapping("x86").set_global(mao.get_mpq_qat_qconfig(method=method, **kw))
    p = prepare_qat_fx(SmallCNN().train(), mapping, example_inputs=(x[:2],))
    return mao.init_mpq_fake_quants(p, (x[:8],))


def _train(p: nn.Module, x, y, steps: int, search=None, lr=1e-2):
    return train_steps(p, x, y, steps, search=search, lr=lr)


def _acc(p: nn.Module, x, y) -> float:
    p.eval()
    with torch.no_grad():
        out = float((p(x).argmax(1) == y).float().mean())
    p.train()
    return out


def test_classes_generated_for_every_registered_method():
    for method in list_methods():
        cls = mao.fake_quantize_class(method)
        assert cls.method == method and issubclass(cls, tq.FakeQuantizeBase)
        assert getattr(mao, cls.__name__) is cls
    assert mao.SDQFakeQuantize.method == "sdq" and mao.LearnedRangeFakeQuantize.method == "learned_range"
    assert mao.CSQFakeQuantize.method == "csq" and mao.LSQFakeQuantize.method == "lsq"
    aopt = pytest.importorskip("torchao.quantization.pt2e")
    assert issubclass(mao.SDQFakeQuantize, aopt.FakeQuantizeBase)  # PT2E needs torchao's base


def test_qconfig_is_cached_and_validated():
    a = mao.get_mpq_qat_qconfig(method="sdq", weight_bits=(2, 8), act_bits=8, options={"beta_init": 0.9})
    b = mao.get_mpq_qat_qconfig(method="sdq", weight_bits=[2, 8], act_bits=(8, 8), options={"beta_init": 0.9})
    assert a is b  # FX fusion compares qconfigs: equal arguments must give the same object
    assert mao.get_mpq_qat_qconfig(method="sdq", weight_bits=(3, 8)) is not a
    with pytest.raises(ValueError, match="fixed-bit baseline"):
        mao.get_mpq_qat_qconfig(method="lsq", weight_bits=(2, 8))
    with pytest.raises(ValueError, match="unknown method"):
        mao.get_mpq_qat_qconfig(method="nope")
    with pytest.raises(ValueError, match="act_bits=None"):
        mao.get_mpq_qat_qconfig(method="sdq", act_bits=None)
    with pytest.raises(ValueError, match="per tensor only"):
        mao.get_mpq_qat_qconfig(method="learned_range", per_channel=True)


def test_one_line_fx_conv_bn_relu_fusion_trains_bit_widths(digits):
    x, y = digits
    qconfig_mapping = tq.get_default_qat_qconfig_mapping("x86").set_global(mao.get_mpq_qat_qconfig(method="sdq"))
    p = prepare_qat_fx(SmallCNN().train(), qconfig_mapping, example_inputs=(x[:2],))
    mods = dict(p.named_modules())
    fused = [n for n, m in mods.items() if type(m).__name__ == "ConvBnReLU2d"]
    assert fused == ["features.0", "features.3", "features.6"]
    for n in fused + ["fc"]:
        assert isinstance(mods[n].weight_fake_quant, mao.SDQFakeQuantize)
    acts = [m for n, m in mods.items() if n.startswith("activation_post_process") and "." not in n]
    assert acts and all(isinstance(m, mao.SDQFakeQuantize) and m.role == "act" for m in acts)
    _train(p, x, y, 3)
    wfq = mods["features.3"].weight_fake_quant
    assert wfq.quantizer.beta.grad is not None and float(wfq.quantizer.beta.grad.abs()) > 0
    assert float(wfq.quantizer.steps.grad.abs().sum()) > 0
    # what torch.ao reads follows the quantizer's state
    scale, zp = wfq.calculate_qparams()
    st = wfq.quantizer.freeze(None)
    assert torch.equal(scale, st.scale.reshape(-1).float()) and (wfq.quant_min, wfq.quant_max) == (st.qmin, st.qmax)
    assert wfq.dtype == torch.qint8 and wfq.qscheme == torch.per_tensor_symmetric
    # torch.ao's switches act on our modules
    p.apply(tq.disable_fake_quant)
    xb = x[:4]
    assert torch.equal(acts[0](xb), xb)
    p.apply(tq.enable_fake_quant)
    assert not torch.equal(acts[0](xb), xb)


@pytest.mark.parametrize("method", ["sdq", "learned_range", "csq", "lsq"])
def test_every_method_trains_in_fx(method, digits):
    x, y = digits
    p = _fx(method, x)
    _train(p, x, y, 3)
    grads = {n: prm.grad for n, prm in p.named_parameters()
             if n.endswith("weight_fake_quant.quantizer." + BIT_PARAMS[method])}
    assert grads and all(g is not None and float(g.abs().sum()) > 0 for g in grads.values()), grads
    cost = mpq_plugin.model_cost(p)
    assert set(cost["layers"]) == {"features.0", "features.3", "features.6", "fc"}
    # the input activation of each layer is found (8-bit), geometry matches the native layer
    assert all(v["act_bits"] == 8.0 for v in cost["layers"].values())
    assert cost["layers"]["features.3"]["macs"] == 16 * 8 * 9 * 4 * 4


def test_csq_in_fused_convbn_slot_is_the_deployed_weight(digits):
    """torch.ao's ConvBn passes ``weight * bn_scale`` to the weight fake-quant and divides the conv
    output by ``bn_scale``; CSQ returns its own synthesized weight W. In eval this is exactly
    ``conv(x, W) + (beta - mean * bn_scale)``, i.e. W is the BN-folded deployed weight."""
    x, y = digits
    p = _fx("csq", x)
    m = dict(p.named_modules())["features.0"]
    assert m.weight.grad is None
    _train(p, x, y, 5)
    assert m.weight.grad is None  # the float weight is not used, CSQ's planes are
    m.eval()
    xb = x[:8]
    with torch.no_grad():
        w = m.weight_fake_quant.quantizer.float_weight()
        sf = m.bn.weight / torch.sqrt(m.bn.running_var + m.bn.eps)
        ref = F.relu(F.conv2d(xb, w, m.bn.bias - m.bn.running_mean * sf, m.stride, m.padding))
        got = m(xb)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_eager_prepare_qat_with_fusion(digits):
    x, y = digits

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
            self.conv, self.bn, self.relu = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
            self.pool, self.fc = nn.AdaptiveAvgPool2d(2), nn.Linear(32, 10)

        def forward(self, t):
            t = self.pool(self.relu(self.bn(self.conv(self.quant(t)))))
            return self.dequant(self.fc(torch.flatten(t, 1)))

    torch.manual_seed(0)
    m = M().train()
    m.qconfig = mao.get_mpq_qat_qconfig(method="learned_range")
    m = tq.fuse_modules_qat(m, [["conv", "bn", "relu"]])
    p = tq.prepare_qat(m)
    assert type(p.conv).__name__ == "ConvBnReLU2d"
    assert isinstance(p.conv.weight_fake_quant, mao.LearnedRangeFakeQuantize)
    mao.init_mpq_fake_quants(p, (x[:8],))
    _train(p, x, y, 5)
    g = p.conv.weight_fake_quant.quantizer.q_max.grad
    assert g is not None and float(g.abs()) > 0
    cost = mpq_plugin.model_cost(p)
    assert set(cost["layers"]) == {"conv", "fc"}
    assert cost["layers"]["conv"]["act_bits"] == 8.0  # the QuantStub's fake-quant feeds the conv
    assert cost["layers"]["conv"]["macs"] == 8 * 9 * 64


def test_search_reaches_budget_on_fx_model_and_freezes(digits):
    x, y = digits
    p = _fx("sdq", x)
    steps = 120
    search = MPQSearch(p, budget=Budget(avg_weight_bits=3.0), total_steps=steps)
    opt = _train(p, x, y, steps, search)
    plan = search.freeze()
    assert set(plan.layers) == {"features.0", "features.3", "features.6", "fc"}
    assert plan.cost["avg_weight_bits"] <= 3.0 + 1e-6
    hard = {n: int(q.quantizer.hard_bit_width()) for n, q in p.named_modules()
            if n.endswith("weight_fake_quant")}
    assert {n[: -len(".weight_fake_quant")]: b for n, b in hard.items()} == \
        {n: lb.weight_bits for n, lb in plan.layers.items()}
    # quant_min/quant_max now describe the frozen sub-8-bit range
    wfq = dict(p.named_modules())["features.3"].weight_fake_quant
    b = plan.layers["features.3"].weight_bits
    assert (wfq.quant_min, wfq.quant_max) == (-(2 ** (b - 1)), 2 ** (b - 1) - 1)
    # finetune at the frozen bits (BN statistics follow the new weights), then evaluate
    for group in opt.param_groups:
        group["lr"] = 5e-3
    _train(p, x, y, 60)
    assert mpq_plugin.model_cost(p)["avg_weight_bits"] <= 3.0 + 1e-6
    assert _acc(p, x, y) > 0.8


def test_cost_provider_hook_reports_sites_once():
    """A provider's sites appear in costing next to native layers; a weight quantizer already
    reported (native layer) is not counted twice."""
    from mpq_plugin.core.cost import linear_geometry
    from mpq_plugin.nn import costing

    native = nn.Sequential(nn.Linear(4, 4))
    mpq_plugin.quantize_(native, mpq_plugin.MPQConfig(method="lsq", weight_bits=4, act_bits=None))
    extra = get_method("lsq").quantizer_cls(
        mpq_plugin.nn.fake_quantizer.QuantizerSpec(role="weight", bits=(2, 2), signed=True))
    extra(torch.randn(3, 8))

    def provider(model):
        if model is native:
            yield "ext", costing.QuantSite(extra, None, lambda n: linear_geometry(n, 8, 3, False, (8,)))
            yield "dup", costing.QuantSite(native[0].weight_quantizer, None,
                                           lambda n: linear_geometry(n, 4, 4, True, (4,)))

    costing.register_cost_provider(provider)
    costing.register_cost_provider(provider)  # idempotent
    try:
        assert costing._COST_PROVIDERS.count(provider) == 1
        cost = mpq_plugin.model_cost(native)
        assert list(cost["layers"]) == ["0", "ext"]
        assert cost["avg_weight_bits"] == pytest.approx((16 * 4 + 24 * 2) / 40)
    finally:
        costing._COST_PROVIDERS.remove(provider)


def test_deepcopy_and_per_channel(digits):
    import copy

    x, y = digits
    p = _fx("sdq", x, per_channel=True)
    wfq = dict(p.named_modules())["features.3"].weight_fake_quant
    assert wfq.qscheme == torch.per_channel_symmetric and wfq.ch_axis == 0
    assert wfq.calculate_qparams()[0].shape == (16,)
    _train(p, x, y, 2)
    c = copy.deepcopy(p)
    c(x[:4])
    cost_c, cost_p = mpq_plugin.model_cost(c), mpq_plugin.model_cost(p)
    assert cost_c["layers"] == cost_p["layers"] and cost_c["layers"]["fc"]["act_bits"] == 8.0
    # the copy's costs come from the copy's own quantizers
    cq = dict(c.named_modules())["features.3"].weight_fake_quant.quantizer
    with torch.no_grad():
        cq.beta.fill_(0.0)
    assert mpq_plugin.model_cost(c)["layers"]["features.3"]["weight_bits"] != cost_p["layers"]["features.3"]["weight_bits"]


def test_torch_ao_convert_warns_that_it_loses_the_range(digits):
    from torch.ao.quantization.quantize_fx import convert_fx

    x, _ = digits
    mapping = mao.get_mpq_qat_qconfig_mapping(method="sdq", weight_bits=(2, 4), act_bits=4)
    assert mapping.global_qconfig is mao.get_mpq_qat_qconfig(method="sdq", weight_bits=(2, 4), act_bits=4)
    p = prepare_qat_fx(SmallCNN().train(), mapping, example_inputs=(x[:2],))
    mao.init_mpq_fake_quants(p, (x[:8],))
    mpq_plugin.freeze(p)
    with pytest.warns(UserWarning, match="lose the learned 0..15 range"):
        convert_fx(p.eval())
