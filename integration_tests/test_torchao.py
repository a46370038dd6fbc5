"""torchao flows end to end through the real host APIs: ``quantize_`` with :class:`MPQQATConfig`
(plain and ``FqnToConfig``), and PT2E (``torch.export`` + ``prepare_qat_pt2e`` with
``X86InductorQuantizer`` or our ``MPQQuantizer``, training, search, ``convert``)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from training_loop import train_steps

pytest.importorskip("torchao")

import mpq_plugin  # noqa: E402
from mpq_plugin import Budget  # noqa: E402
from mpq_plugin.datasets import load_digits_arrays  # noqa: E402
from mpq_plugin.models.small_cnn import SmallCNN  # noqa: E402
from mpq_plugin.nn.layers import QuantConv2d, QuantLinear  # noqa: E402
from mpq_plugin.search import MPQSearch  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                         "ignore::UserWarning")]

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from torchao.quantization import FqnToConfig, quantize_
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer

    from mpq_plugin.pt2e import MPQQuantizer, convert_mpq_pt2e, get_mpq_quantization_config, init_mpq_pt2e
    from mpq_plugin.torchao import MPQQATConfig, is_quantizable

torch.set_num_threads(1)  # tiny ops: one thread avoids oversubscription on 2 cores


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits_arrays()
    return (torch.tensor(x[:512], dtype=torch.float32).reshape(-1, 1, 8, 8), torch.tensor(y[:512]).long())


class ConvNet(nn.Module):
    """Conv-ReLU-pool-Linear without BatchNorm (PT2E converts it exactly)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.max_pool2d(F.relu(self.conv(x)), 2), 1))


def _train(p, x, y, steps, search=None, lr=1e-2, opt=None):
    return train_steps(p, x, y, steps, search=search, lr=lr, opt=opt)


# -- quantize_ ------------------------------------------------------------------------------------
def test_quantize_swaps_layers_and_default_filter_is_linear_only():
    m = SmallCNN()
    quantize_(m, MPQQATConfig(method="csq", weight_bits=(2, 8)))  # torchao's default filter: _is_linear
    assert isinstance(m.fc, QuantLinear) and type(m.features[0]) is nn.Conv2d
    quantize_(m, MPQQATConfig(method="csq", weight_bits=(2, 8)), filter_fn=is_quantizable)
    assert isinstance(m.features[0], QuantConv2d) and isinstance(m.fc, QuantLinear)
    assert type(m.features[0].weight_quantizer).__name__ == "CSQQuantizer"
    assert m.features[0].weight_quantizer.spec.bits == (2, 8)


def test_quantize_trains_searches_and_freezes(digits):
    x, y = digits
    torch.manual_seed(0)
    m = SmallCNN()
    quantize_(m, MPQQATConfig(method="sdq"), filter_fn=is_quantizable)
    mpq_plugin.api.calibrate(m, (x[:8],))
    steps = 120
    search = MPQSearch(m, budget=Budget(avg_weight_bits=3.0), total_steps=steps)
    opt = _train(m, x, y, steps, search)
    assert float(m.features[3].weight_quantizer.beta.grad.abs()) > 0  # gradients reach the bit-width
    plan = search.freeze()
    assert plan.cost["avg_weight_bits"] <= 3.0 + 1e-6 and len(plan.layers) == 4
    _train(m, x, y, 40, opt=opt)
    m.eval()
    assert float((m(x).argmax(1) == y).float().mean()) > 0.8


def test_fqn_to_config_per_layer():
    m = SmallCNN()
    cfg = FqnToConfig({"fc": MPQQATConfig(method="sdq", weight_bits=4),
                       "re:features\\.[03]": MPQQATConfig(method="learned_range", weight_bits=(2, 6), act_bits=None),
                       "features.6": None})
    with pytest.raises(ValueError, match="filter_fn"):  # torchao's trap: filter_fn=None is required
        quantize_(m, cfg)
    quantize_(m, cfg, filter_fn=None)
    f = m.features
    assert f[0].weight_quantizer.spec.bits == (2, 6) and f[0].input_quantizer is None
    assert type(f[3].weight_quantizer).__name__ == "LearnedRangeQuantizer"
    assert type(f[6]) is nn.Conv2d  # None keeps it float
    assert m.fc.weight_quantizer.spec.bits == (4, 4) and m.fc.input_quantizer is not None
    assert set(mpq_plugin.model_cost(m, (torch.randn(2, 1, 8, 8),))["layers"]) == {"features.0", "features.3", "fc"}


def test_config_validates_at_construction():
    with pytest.raises(ValueError, match="unknown method"):
        MPQQATConfig(method="nope")
    with pytest.raises(ValueError):
        MPQQATConfig(method="sdq", weight_bits=(6, 2))
    with pytest.raises(ValueError, match="per tensor only"):
        quantize_(nn.Sequential(nn.Linear(4, 4)), MPQQATConfig(method="learned_range", per_channel=True))


# -- PT2E ----------------------------------------------------------------------------------------------
def _export(model: nn.Module, x: torch.Tensor):
    return torch.export.export(model.train(), (x[:4],), dynamic_shapes=({0: torch.export.Dim("batch")},)).module()


def _qdq_ranges(gm) -> list:
    return [(int(n.args[3]), int(n.args[4])) for n in gm.graph.nodes if "dequantize_per_tensor" in str(n.target)]


def test_pt2e_x86_quantizer_one_line_search_convert_exact(digits):
    x, y = digits
    torch.manual_seed(0)
    quantizer = X86InductorQuantizer().set_global(get_mpq_quantization_config(method="sdq", is_qat=True))
    p = prepare_qat_pt2e(_export(ConvNet(), x), quantizer)
    init_mpq_pt2e(p, (x[:8],))
    assert set(mpq_plugin.model_cost(p)["layers"]) == {"conv", "fc"}
    steps = 100
    search = MPQSearch(p, budget=Budget(avg_weight_bits=3.0), total_steps=steps)
    opt = _train(p, x, y, steps, search)
    plan = search.freeze()
    assert plan.cost["avg_weight_bits"] <= 3.0 + 1e-6
    _train(p, x, y, 40, opt=opt)
    move_exported_model_to_eval(p)
    with torch.no_grad():
        ref = p(x)
    assert float((ref.argmax(1) == y).float().mean()) > 0.8
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        q = convert_mpq_pt2e(p)
    assert not [w for w in seen if "lose the learned" in str(w.message)]  # PT2E keeps the range
    with torch.no_grad():
        assert torch.equal(q(x), ref)  # bit-exact
    ranges = _qdq_ranges(q)
    b = {n: lb.weight_bits for n, lb in plan.layers.items()}
    for name in ("conv", "fc"):
        assert (-(2 ** (b[name] - 1)), 2 ** (b[name] - 1) - 1) in ranges  # sub-8-bit weight ranges kept


def test_pt2e_own_quantizer_csq_per_module(digits):
    x, y = digits
    torch.manual_seed(0)
    quantizer = (MPQQuantizer().set_global(get_mpq_quantization_config(method="csq", weight_bits=(2, 8)))
                 .set_module_name("fc", get_mpq_quantization_config(method="csq", weight_bits=(2, 4), act_bits=4)))
    p = prepare_qat_pt2e(_export(ConvNet(), x), quantizer)
    init_mpq_pt2e(p, (x[:8],))
    fqs = {n: m for n, m in p.named_modules() if type(m).__name__ == "CSQFakeQuantize"}
    assert sorted(m.bits for m in fqs.values() if m.role == "weight") == [(2, 4), (2, 8)]
    _train(p, x, y, 5)
    mus = [m.quantizer.mu.grad for m in fqs.values() if m.role == "weight"]
    assert all(g is not None and float(g.abs().sum()) > 0 for g in mus)
    plan = mpq_plugin.freeze(p)
    move_exported_model_to_eval(p)
    with torch.no_grad():
        ref = p(x)
    q = convert_mpq_pt2e(p)
    with torch.no_grad():
        assert torch.equal(q(x), ref)  # CSQ's synthesized weight survives convert
    assert (0, 15) in _qdq_ranges(q)  # the 4-bit activation of fc
    assert plan.layers["fc"].act_bits == 4


def test_pt2e_conv_bn_trains_and_csq_convert_refuses(digits):
    x, y = digits
    quantizer = X86InductorQuantizer().set_global(get_mpq_quantization_config(method="csq"))
    p = prepare_qat_pt2e(_export(SmallCNN(), x), quantizer)
    init_mpq_pt2e(p, (x[:8],))
    _train(p, x, y, 3)
    assert len(mpq_plugin.model_cost(p)["layers"]) == 4
    mpq_plugin.freeze(p)
    move_exported_model_to_eval(p)
    with pytest.raises(ValueError, match="BatchNorm"):
        convert_mpq_pt2e(p)


def test_pt2e_config_bad_input():
    with pytest.raises(ValueError, match="is_qat=True"):
        get_mpq_quantization_config(method="sdq", is_qat=False)
    assert get_mpq_quantization_config(method="sdq") is get_mpq_quantization_config(method="sdq", act_bits=(8, 8))


@pytest.mark.parametrize("method", ["sdq", "learned_range", "csq", "lsq"])
def test_pt2e_convert_is_exact_for_every_method(method, digits):
    x, y = digits
    torch.manual_seed(0)
    wb = 4 if method == "lsq" else (2, 6)
    p = prepare_qat_pt2e(_export(ConvNet(), x), MPQQuantizer().set_global(
        get_mpq_quantization_config(method=method, weight_bits=wb, act_bits=6)))
    init_mpq_pt2e(p, (x[:8],))
    _train(p, x, y, 5)
    mpq_plugin.freeze(p)
    move_exported_model_to_eval(p)
    with torch.no_grad():
        ref = p(x)
    q = convert_mpq_pt2e(p)
    with torch.no_grad():
        assert torch.equal(q(x), ref)
    assert all(hi - lo + 1 <= 64 for lo, hi in _qdq_ranges(q))  # 6-bit activations, <= 6-bit weights
