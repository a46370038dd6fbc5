"""The on-disk integer bundle: files, dtypes, per-layer manifests, README, round trip."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import mpq_plugin
from mpq_plugin import MPQConfig
from mpq_plugin.export import IntegerExecutor, read_bundle, to_integer_params, width_table
from tests.test_export_executor import build_cnn, build_mlp


def test_bundle_files_dtypes_and_round_trip(tmp_path):
    m, x = build_cnn("learned_range", n=64)
    b = to_integer_params(m, tmp_path)
    man = json.loads((tmp_path / "manifest.json").read_text())
    assert man["format"] == "mpq_integer_bundle"
    assert [e["op"] for e in man["graph"]] == ["quant_conv2d", "relu", "quant_conv2d", "relu", "quant_conv2d",
                                               "relu", "global_avgpool", "flatten", "quant_linear"]
    for name, li in b.layers.items():
        on_disk = json.loads((tmp_path / "layers" / f"{name}.json").read_text())
        assert on_disk["weight"]["bits"] == li["weight"]["bits"]
        w = np.load(tmp_path / man["arrays"][f"{name}.weight"]["path"])
        assert w.dtype == (np.int8 if li["weight"]["bits"] <= 8 else np.int16)
        assert int(np.abs(w).max()) <= 2 ** (li["weight"]["bits"] - 1)
        assert on_disk["accumulator"]["bits"] <= on_disk["accumulator"]["bits_formula"] + 16 + 1
        assert on_disk["weight"]["zero_point"] == 0 and on_disk["input"]["zero_point"] == 0
    readme = (tmp_path / "README.md").read_text()
    assert "| features.3 |" in readme and "round_shift" in readme
    loaded = read_bundle(tmp_path)
    a, c = IntegerExecutor(b).run(x.numpy()), IntegerExecutor(loaded).run(x.numpy())
    np.testing.assert_array_equal(a.output, c.output)


def test_bn_folded_weights_are_the_frozen_codes(tmp_path):
    m, _ = build_cnn("learned_range", n=16)
    b = to_integer_params(m, tmp_path)
    layer = m.features[0]
    st = layer.weight_quantizer.freeze(layer.weight_to_quantize())  # folded weight: BN inside
    np.testing.assert_array_equal(b.arrays["features.0.weight"], st.codes.numpy())
    with torch.no_grad():
        fb = layer.folded_bias().double().numpy()
    unit = np.array(b.layers["features.0"]["bias"]["unit"])
    np.testing.assert_allclose(b.arrays["features.0.bias"] * unit, fb, atol=float(unit.max()))


def test_width_table_rows():
    m, _ = build_cnn("learned_range", n=16)
    from mpq_plugin.export.plan import plan
    rows = width_table(plan(m))
    assert [r["layer"] for r in rows] == ["features.0", "features.3", "features.6", "fc"]
    assert rows[0]["requant"] == "float input" and all(r["requant"] == "shift" for r in rows[1:])


def test_pow2_mode_reports_error_per_layer(tmp_path):
    m, _ = build_mlp(MPQConfig(method="lsq", weight_bits=4, act_bits=4), n=16)
    with pytest.raises(ValueError, match=r"(?s)layer 3: .*power of two.*layer 5: .*scales='dyadic'"):
        to_integer_params(m, tmp_path, scales="pow2")
    m2, _ = build_mlp(MPQConfig(method="learned_range", weight_bits=(2, 8), act_bits=(2, 8)), n=16)
    b = to_integer_params(m2, tmp_path / "ok", scales="pow2")
    assert all(li["input"]["requant"] is None or li["input"]["requant"]["exact_pow2"] for li in b.layers.values())


def test_bad_inputs_say_how_to_fix(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 16)
    m = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    mpq_plugin.quantize_(m, MPQConfig(method="lsq", weight_bits=4, act_bits=4), (x,))
    with pytest.raises(ValueError, match="not frozen.*mpq_plugin.freeze"):
        to_integer_params(m, tmp_path)
    mpq_plugin.freeze(m)
    with pytest.raises(ValueError, match="above the bundle maximum"):
        to_integer_params(m, tmp_path, max_bits=3)
    # a float input (no input quantizer) has no integer path
    m2 = nn.Sequential(nn.Linear(16, 8))
    mpq_plugin.quantize_(m2, MPQConfig(method="lsq", weight_bits=4, act_bits=None), (x,))
    mpq_plugin.freeze(m2)
    with pytest.raises(ValueError, match="float input.*act_bits"):
        to_integer_params(m2, tmp_path)


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_unsupported_graphs_are_refused(tmp_path):
    x = torch.randn(4, 4)
    m = _Branchy()
    mpq_plugin.quantize_(m, MPQConfig(method="lsq", weight_bits=4, act_bits=4), (x,))
    mpq_plugin.freeze(m)
    with pytest.raises(ValueError, match="single-chain|exactly the previous"):
        to_integer_params(m, tmp_path)
    m2 = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    xi = torch.randn(4, 1, 6, 6)
    mpq_plugin.quantize_(m2, MPQConfig(method="lsq", weight_bits=4, act_bits=4), (xi,))
    mpq_plugin.freeze(m2)
    with pytest.raises(ValueError, match="BatchNorm2d is not fused.*fold_bn=True"):
        to_integer_params(m2, tmp_path)


def test_packed_weights_on_disk(tmp_path):
    from mpq_plugin.export.packing import unpack_codes

    m, _ = build_cnn("learned_range", n=16)
    b = to_integer_params(m, tmp_path, packed=True)
    for name, li in b.layers.items():
        info = json.loads((tmp_path / "layers" / f"{name}.json").read_text())["weight"]
        data = (tmp_path / info["packed"]["path"]).read_bytes()
        assert len(data) == (info["packed"]["count"] * li["weight"]["bits"] + 7) // 8
        got = unpack_codes(data, li["weight"]["bits"], info["packed"]["count"], li["weight"]["signed"])
        np.testing.assert_array_equal(got.reshape(li["weight"]["shape"]), b.arrays[f"{name}.weight"])
