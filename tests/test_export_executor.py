"""Integer reference executor vs the PyTorch fake-quant model: code-for-code on every sample."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import mpq_plugin
from mpq_plugin import MPQConfig
from mpq_plugin.adapters.vision import quantize_vision_
from mpq_plugin.export import IntegerExecutor, WidthOverflowError, compare
from mpq_plugin.export.plan import plan
from mpq_plugin.models import SmallCNN

N_SAMPLES = 256


def build_cnn(method: str = "learned_range", seed: int = 0, n: int = N_SAMPLES, **opts):
    """A frozen SmallCNN (BN fused and folded, network input quantized) and test inputs."""
    torch.manual_seed(seed)
    m = SmallCNN()
    for mod in m.modules():  # non-trivial BN statistics, so folding matters
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.3, 0.3)
    x = torch.rand(n, 1, 8, 8) * 4
    searches = method != "lsq"
    cfg = MPQConfig(method=method, weight_bits=(2, 8) if searches else 4,
                    act_bits=(2, 8) if method == "learned_range" else 8, options=opts)
    quantize_vision_(m, cfg, (x[:64],), quantize_first_input=True)
    mpq_plugin.freeze(m)
    return m.eval(), x


def build_mlp(cfg: MPQConfig, seed: int = 0, n: int = N_SAMPLES, pool: bool = False):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 32), nn.ReLU(),
                      nn.Linear(32, 10))
    x = torch.randn(n, 16)
    mpq_plugin.quantize_(m, cfg, (x[:64],))
    mpq_plugin.freeze(m)
    return m.eval(), x


def _assert_agrees(a, pow2: bool) -> None:
    """Power-of-two scales: every code of every sample equal. Other scales: a code may differ
    only where the exact requantization input is within 1e-4 code units of a rounding tie
    (PyTorch's float32 rounding decides there), and rarely."""
    assert a.unexplained == 0, a
    if pow2:
        assert a.total_mismatches == 0, a
    else:
        assert max(a.code_mismatches.values()) <= 0.02 * a.samples, a
    assert a.argmax_agreement >= 0.99 * a.samples
    assert a.max_abs_logit_diff < 1e-4


@pytest.mark.parametrize("method", ["learned_range", "lsq", "sdq"])
def test_small_cnn_codes_bit_exact(method):
    m, x = build_cnn(method)
    a = compare(m, plan(m), x)
    assert a.samples == N_SAMPLES and len(a.code_mismatches) == 4
    _assert_agrees(a, pow2=method == "learned_range")


def test_pow2_model_is_a_pure_shift_pipeline():
    m, x = build_cnn("learned_range")
    b = plan(m)
    for name, li in b.layers.items():
        req = li["input"]["requant"]
        assert req is None or req["exact_pow2"], name
    # the global pool divides by 2*2 = 4 (a power of two): still shifts only
    pool = next(e for e in b.manifest["graph"] if e["op"] == "global_avgpool")
    assert pool["divisor"] == 4 and pool["divisor_pow2"]


@pytest.mark.parametrize("cfg", [
    MPQConfig(method="sdq", weight_bits=1, act_bits=8),  # bipolar weights
    MPQConfig(method="sdq", weight_bits=(1, 4), act_bits=4, per_channel=True),
    MPQConfig(method="lsq", weight_bits=3, act_bits=4, per_channel=True),
    MPQConfig(method="learned_range", weight_bits=(2, 8), act_bits=(2, 8)),
    MPQConfig(method="csq", weight_bits=(2, 8), act_bits=4),
], ids=["sdq1", "sdq_pc", "lsq_pc", "lr", "csq"])
def test_mlp_codes_bit_exact(cfg):
    m, x = build_mlp(cfg)
    b = plan(m)
    _assert_agrees(compare(m, b, x), pow2=cfg.method == "learned_range")
    if cfg.weight_bits == (1, 1):
        assert all(li["weight"]["encoding"] == "bipolar" for li in b.layers.values())
        assert all(set(np.unique(b.arrays[f"{n}.weight"])) <= {-1, 1} for n in b.layers)


def test_bias_on_grid_is_exact_without_fraction_bits():
    """bias_frac_bits=0 (the FINN/hls4ml convention) is exact when biases lie on s_x*s_w."""
    m, x = build_mlp(MPQConfig(method="learned_range", weight_bits=(2, 8), act_bits=(2, 8)))
    with torch.no_grad():
        for layer in (m[0], m[3], m[5]):
            s = float(layer.input_quantizer.freeze().scale) * float(
                layer.weight_quantizer.freeze(layer.weight).scale)
            layer.bias.copy_(torch.round(layer.bias / s) * s)
    a = compare(m, plan(m, bias_frac_bits=0), x)
    assert a.total_mismatches == 0 and a.max_abs_logit_diff == 0.0


def test_off_grid_bias_without_fraction_bits_is_detected_as_mismatch():
    """The comparison can fail: with f=0 an off-grid float bias changes codes."""
    m, x = build_mlp(MPQConfig(method="learned_range", weight_bits=(2, 8), act_bits=(2, 8)))
    a = compare(m, plan(m, bias_frac_bits=0), x)
    assert a.total_mismatches > 0


def test_accumulator_bound_holds_and_overflow_names_layer():
    m, x = build_cnn("learned_range", n=64)
    b = plan(m)
    tr = IntegerExecutor(b).run(x.numpy())
    for name, acc in tr.accumulators.items():
        lo, hi = b.layers[name]["accumulator"]["bound"]
        assert lo <= acc.min() and acc.max() <= hi
    # declare a too-narrow accumulator: the executor must refuse, naming the layer
    b.layers["features.3"]["accumulator"]["bits"] = 4
    with pytest.raises(WidthOverflowError, match="features.3.*accumulator"):
        IntegerExecutor(b).run(x.numpy())


def test_integer_input_entry_matches_float_entry():
    m, x = build_cnn("learned_range", n=32)
    ex = IntegerExecutor(plan(m))
    codes = ex.quantize_input(x.numpy())
    assert codes.dtype == np.int64
    np.testing.assert_array_equal(ex.run_codes(codes).output, ex.run(x.numpy()).output)


class PoolNet(nn.Module):
    """Plain quantized convs with bias, grouped conv, max and average pooling, flatten module."""

    def __init__(self, avg_kernel: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.r1 = nn.ReLU()
        self.mp = nn.MaxPool2d(2)
        self.c2 = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.r2 = nn.ReLU()
        self.ap = nn.AvgPool2d(avg_kernel)
        self.fl = nn.Flatten()
        self.fc = nn.Linear(8 * (6 // avg_kernel) ** 2, 5)

    def forward(self, x):
        return self.fc(self.fl(self.ap(self.r2(self.c2(self.mp(self.r1(self.c1(x))))))))


@pytest.mark.parametrize("avg_kernel", [2, 3], ids=["pow2_divisor", "divisor9"])
def test_pooling_grouped_conv_net(avg_kernel):
    torch.manual_seed(1)
    m = PoolNet(avg_kernel)
    x = torch.randn(N_SAMPLES, 2, 12, 12)
    mpq_plugin.quantize_(m, MPQConfig(method="learned_range", weight_bits=(2, 8), act_bits=(2, 8)), (x[:64],))
    mpq_plugin.freeze(m)
    b = plan(m)
    ap = next(e for e in b.manifest["graph"] if e["op"] == "avgpool2d")
    assert ap["divisor"] == avg_kernel**2 and ap["divisor_pow2"] == (avg_kernel == 2)
    _assert_agrees(compare(m.eval(), b, x), pow2=True)


@pytest.mark.parametrize("which", ["cnn_lr", "cnn_lsq", "mlp_sdq1", "pool9"])
def test_thresholds_give_the_same_codes_as_multiply_shift(which, tmp_path):
    from mpq_plugin.export import read_bundle, to_integer_params

    if which == "cnn_lr":
        m, x = build_cnn("learned_range", n=128)
    elif which == "cnn_lsq":
        m, x = build_cnn("lsq", n=128)
    elif which == "mlp_sdq1":
        m, x = build_mlp(MPQConfig(method="sdq", weight_bits=1, act_bits=8), n=128)
    else:
        torch.manual_seed(2)
        m, x = PoolNet(3), torch.randn(128, 2, 12, 12)
        mpq_plugin.quantize_(m, MPQConfig(method="learned_range", weight_bits=(2, 8), act_bits=(2, 8)), (x[:64],))
        mpq_plugin.freeze(m)
    to_integer_params(m.eval(), tmp_path, thresholds=True)
    b = read_bundle(tmp_path)
    a, t = IntegerExecutor(b).run(x.numpy()), IntegerExecutor(b, use_thresholds=True).run(x.numpy())
    for name in a.codes:
        np.testing.assert_array_equal(a.codes[name], t.codes[name])
    np.testing.assert_array_equal(a.output, t.output)
    li = next(li for li in b.layers.values() if li["input"]["requant"] is not None)
    th = b.arrays[li["input"]["requant"]["thresholds_file"]]
    assert th.shape[1] == li["input"]["code_max"] - li["input"]["code_min"]
    assert np.all(np.diff(th, axis=1) >= 0)


def test_thresholds_at_ties_follow_the_rounding_rule():
    from mpq_plugin.export.intmath import round_shift
    from mpq_plugin.export.thresholds import apply_thresholds, requant_thresholds

    n = np.arange(-40, 200, dtype=np.int64).reshape(-1, 1)  # (batch, 1 feature)
    for mode in ("half_even", "half_away"):
        for m, k in ((1, 2), (3, 3), (5, 1), (1, -1)):
            want = np.clip(round_shift(n * m, k, mode), 0, 15)
            t = requant_thresholds(np.array([m]), np.array([k]), 0, 15, mode)
            np.testing.assert_array_equal(apply_thresholds(n, t, 0), want)
