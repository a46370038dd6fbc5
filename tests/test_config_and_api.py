"""MPQConfig/Budget/BitPlan validation and the native quantize_/freeze flow, bad input included."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import mpq_plugin
from mpq_plugin import Budget, MPQConfig
from mpq_plugin.nn.layers import QuantConv2d, QuantLinear, quant_layers
from tests.conftest import TinyConvNet, config_for, tiny_mlp


@pytest.mark.parametrize("bits, msg", [((0, 4), "outside 1..16"), ((2, 17), "outside 1..16"),
                                       ((6, 3), "min_bits=6 > max_bits=3"), ("4", "must be an int")])
def test_bad_bit_ranges_fail_at_construction(bits, msg) -> None:
    with pytest.raises((ValueError, TypeError), match=msg):
        MPQConfig(method="lsq", weight_bits=bits)


def test_unknown_method_lists_known_ones() -> None:
    with pytest.raises(ValueError, match="known methods: .*lsq"):
        MPQConfig(method="nope")


def test_unknown_method_option_lists_allowed() -> None:
    with pytest.raises(ValueError, match="allowed"):
        MPQConfig(method="lsq", weight_bits=4, options={"no_such_option": 1})


def test_budget_validation() -> None:
    with pytest.raises(ValueError, match="positive"):
        Budget(weight_kb=-1)
    with pytest.raises(TypeError):
        Budget(avg_weight_bits="3")
    with pytest.raises(ValueError, match="below the minimum weight_bits=4"):
        MPQConfig(method="lsq", weight_bits=(4, 4), budget=Budget(avg_weight_bits=3.0))


def test_weight_kb_budget_below_minimum_names_the_minimum() -> None:
    model = tiny_mlp()
    with pytest.raises(ValueError, match="minimum achievable"):
        mpq_plugin.quantize_(model, MPQConfig(method="lsq", weight_bits=4, budget=Budget(weight_kb=0.01)))


def test_no_quantizable_layer() -> None:
    with pytest.raises(ValueError, match="no quantizable layer"):
        mpq_plugin.quantize_(nn.Sequential(nn.ReLU()), MPQConfig(method="lsq", weight_bits=4))
    with pytest.raises(ValueError, match="no quantizable layer"):
        mpq_plugin.quantize_(tiny_mlp(), MPQConfig(method="lsq", weight_bits=4, exclude=(".*",)))


def test_nan_weights_are_named() -> None:
    model = tiny_mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="'2.weight' contains NaN"):
        mpq_plugin.quantize_(model, MPQConfig(method="lsq", weight_bits=4))


def test_wrong_config_type() -> None:
    with pytest.raises(TypeError, match="MPQConfig"):
        mpq_plugin.quantize_(tiny_mlp(), {"method": "lsq"})


@pytest.mark.parametrize("method", mpq_plugin.list_methods())
def test_zero_range_tensors_stay_finite(method: str) -> None:
    model = tiny_mlp()
    with torch.no_grad():
        model[0].weight.zero_()
    mpq_plugin.quantize_(model, config_for(method))
    y = model(torch.zeros(3, 16))
    assert torch.isfinite(y).all()
    y.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    mpq_plugin.freeze(model)
    assert torch.isfinite(model(torch.zeros(3, 16))).all()


def test_matching_precedence_exact_regex_exclude(tiny_conv) -> None:
    cfg = MPQConfig(
        method="lsq", weight_bits=4,
        exclude=("conv1",),
        layer_overrides={"fc": {"weight_bits": 8}, "conv.*": {"weight_bits": 2}},
    )
    mpq_plugin.quantize_(tiny_conv, cfg)
    assert type(tiny_conv.conv1) is nn.Conv2d  # exclude wins
    assert isinstance(tiny_conv.conv2, QuantConv2d) and tiny_conv.conv2.weight_quantizer.bits == 2  # regex
    assert isinstance(tiny_conv.fc, QuantLinear) and tiny_conv.fc.weight_quantizer.bits == 8  # exact


def test_skip_override_and_include() -> None:
    model = TinyConvNet()
    mpq_plugin.quantize_(model, MPQConfig(method="lsq", weight_bits=4, include=("conv.*",),
                                          layer_overrides={"conv2": {"skip": True}}))
    assert [n for n, _ in quant_layers(model)] == ["conv1"]


def test_state_dict_keys_of_float_model_are_kept(tiny_conv) -> None:
    keys = set(tiny_conv.state_dict())
    mpq_plugin.quantize_(tiny_conv, MPQConfig(method="lsq", weight_bits=4))
    assert keys <= set(tiny_conv.state_dict())


def test_dequantize_restores_float_layers(tiny_conv) -> None:
    x = torch.randn(2, 1, 8, 8)
    ref = tiny_conv(x)
    mpq_plugin.quantize_(tiny_conv, MPQConfig(method="lsq", weight_bits=4))
    assert not torch.equal(tiny_conv(x), ref)
    mpq_plugin.dequantize_(tiny_conv)
    assert type(tiny_conv.conv1) is nn.Conv2d and not hasattr(tiny_conv.conv1, "weight_quantizer")
    assert torch.equal(tiny_conv(x), ref)


def test_embeddings_opt_in() -> None:
    model = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 2))
    mpq_plugin.quantize_(model, MPQConfig(method="lsq", weight_bits=4, quantize_embeddings=True))
    out = model(torch.tensor([[1, 2, 3]]))
    assert out.shape == (1, 3, 2)
    cost = mpq_plugin.model_cost(model)
    assert cost["layers"]["0"]["macs"] == 0 and cost["layers"]["0"]["weight_params"] == 160


def test_bitplan_round_trip(tmp_path) -> None:
    model = tiny_mlp()
    mpq_plugin.quantize_(model, MPQConfig(method="lsq", weight_bits=4, act_bits=8))
    model(torch.randn(2, 16))
    plan = mpq_plugin.freeze(model)
    assert plan.to_dict() == {"0": {"weight_bits": 4, "act_bits": 8, "weight_params": 192},
                              "2": {"weight_bits": 4, "act_bits": 8, "weight_params": 48}}
    plan.save(tmp_path / "plan.json")
    again = mpq_plugin.BitPlan.load(tmp_path / "plan.json")
    assert again.to_dict() == plan.to_dict() and again.method == "lsq"
    assert mpq_plugin.BitPlan.from_dict(plan.to_dict()).to_dict() == plan.to_dict()
    assert json.loads(plan.to_json())["cost"]["avg_weight_bits"] == 4.0


def test_config_dict_round_trip_and_hash() -> None:
    cfg = MPQConfig(method="lsq", weight_bits=4, budget=Budget(weight_kb=3.0),
                    layer_overrides={"fc": {"weight_bits": 8}}, exclude=("stem",))
    again = MPQConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg and hash(again) == hash(cfg)
    with pytest.raises(ValueError, match="unknown MPQConfig key"):
        MPQConfig.from_dict({"methd": "lsq"})


def test_freeze_reports_budget_slack() -> None:
    model = tiny_mlp()
    mpq_plugin.quantize_(model, MPQConfig(method="lsq", weight_bits=4, budget=Budget(avg_weight_bits=5.0)))
    model(torch.randn(2, 16))
    plan = mpq_plugin.freeze(model)
    assert plan.cost["slack_avg_weight_bits"] == pytest.approx(1.0)


def test_import_needs_only_torch() -> None:
    code = (
        "import sys, mpq_plugin\n"
        "heavy = [m for m in ('torchao', 'neural_compressor', 'transformers', 'accelerate', 'onnx', "
        "'qonnx', 'triton', 'matplotlib', 'sklearn', 'pulp') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
