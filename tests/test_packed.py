"""Packed inference layers against the frozen fake-quant model, for every registered method."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mpq_plugin
from mpq_plugin.kernels import packed_dispatch, packed_ref
from mpq_plugin.nn.layers import quant_layers
from mpq_plugin.nn.packed import PackedConv2d, PackedLinear, convert_to_packed_
from mpq_plugin.registry import get_method
from tests.conftest import TinyConvNet

METHODS = mpq_plugin.list_methods()
X = torch.randn(7, 24, generator=torch.Generator().manual_seed(3))


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 33), nn.ReLU(), nn.Linear(33, 20), nn.ReLU(), nn.Linear(20, 5))


def _config(method: str, per_channel: bool = False, act_bits=8) -> mpq_plugin.MPQConfig:
    # mixed widths: 3, 2 and 4/8 bits on the three layers
    over = {"0": {"weight_bits": 3}, "2": {"weight_bits": 2}, "4": {"weight_bits": 4}}
    pc = per_channel and get_method(method).quantizer_cls.supports_per_channel
    return mpq_plugin.MPQConfig(method=method, weight_bits=8, act_bits=act_bits, layer_overrides=over,
                                per_channel=pc)


def _frozen(method: str, **kw) -> nn.Module:
    model = mpq_plugin.quantize_(_mlp(), _config(method, **kw), example_inputs=(X,))
    mpq_plugin.freeze(model)
    return model.eval()


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_round_trip(bits: int) -> None:
    qmin = -(2 ** (bits - 1))
    codes = torch.randint(qmin, -qmin, (6, 37), generator=torch.Generator().manual_seed(bits))
    packed = packed_ref.pack_rows(codes, bits, qmin)
    assert packed.dtype == torch.int32 and packed.shape == (6, -(-37 // (32 // bits)))
    assert torch.equal(packed_ref.unpack_rows(packed, bits, 37) + qmin, codes)


def test_three_bit_layout_is_ten_codes_per_word() -> None:
    codes = torch.arange(10).reshape(1, 10) % 8  # unsigned 3-bit 0..7, 0, 1
    word = int(packed_ref.pack_rows(codes, 3, 0)[0, 0]) & 0xFFFFFFFF
    assert word == sum(int(c) << (3 * i) for i, c in enumerate(codes[0]))


def test_pack_rejects_out_of_range_codes_and_bits() -> None:
    with pytest.raises(ValueError, match="outside the 2-bit range"):
        packed_ref.pack_rows(torch.tensor([[0, 2]]), 2, -2)
    with pytest.raises(ValueError, match="1..8 bits"):
        PackedLinear(4, 4, bits=9, qmin=-256)


@pytest.mark.parametrize("method", METHODS)
def test_packed_matches_frozen_fake_quant(method: str) -> None:
    model = _frozen(method, per_channel=True)
    ref_layers = {n: copy.deepcopy(layer) for n, layer in quant_layers(model)}
    with torch.no_grad():
        y_fq = model(X)
    packed = copy.deepcopy(model)
    report = convert_to_packed_(packed)
    assert set(report["layers"]) == set(ref_layers)
    for name, layer in ref_layers.items():
        p = packed.get_submodule(name)
        assert isinstance(p, PackedLinear)
        with torch.no_grad():
            fq_w = layer.quantized_weight()
        assert torch.equal(p.dequantized_weight_2d(), fq_w), f"{method}/{name}: packed weight != fake-quant"
        assert p.bits == report["layers"][name]["bits"] <= 8
        assert report["layers"][name]["packed_bytes"] < report["layers"][name]["float_bytes"]
    with torch.no_grad():
        y_p = packed(X)
    assert torch.equal(y_p, y_fq), f"{method}: packed model output != fake-quant output"
    assert report["saved_bytes"] == report["float_bytes"] - report["packed_bytes"] > 0


@pytest.mark.parametrize("method", METHODS)
def test_integer_activation_path_matches_fake_quant(method: str) -> None:
    model = _frozen(method)
    with torch.no_grad():
        y_fq = model(X)
    report = convert_to_packed_(model, int_activations=True)
    int_layers = [n for n, v in report["layers"].items() if v["int_path"]]
    assert int_layers, f"{method}: no layer took the integer path"
    with torch.no_grad():
        y_int = model(X)
    torch.testing.assert_close(y_int, y_fq, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("x_lo, x_hi", [(-128, 128), (0, 256)])  # int8 (_int_mm) and int64 paths
def test_integer_path_accumulates_exactly(x_lo: int, x_hi: int) -> None:
    g = torch.Generator().manual_seed(0)
    wc = torch.randint(-8, 8, (9, 50), generator=g)
    xc = torch.randint(x_lo, x_hi, (4, 50), generator=g)
    packed = packed_ref.pack_rows(wc, 4, -8)
    y = packed_ref.int_linear(xc, 0, torch.tensor(1.0), packed, 4, 50, -8,
                              torch.zeros(9), torch.ones(9))
    assert torch.equal(y, (xc @ wc.t()).to(torch.float32))
    packed8 = packed_ref.pack_rows(torch.full((2, 50), 127), 8, -128)
    with pytest.raises(ValueError, match="int32 accumulator would overflow"):  # |x - zx| ~ 2^24
        packed_ref.int_linear(torch.full((1, 50), 255), -(2**24), torch.tensor(1.0), packed8, 8, 50, -128,
                              torch.zeros(2), torch.ones(2))


def test_state_dict_round_trip_is_exact() -> None:
    a, b = _frozen("lsq", per_channel=True), _frozen("lsq", per_channel=True)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.05)  # same bits, different weights and scales
    for m in (a, b):
        for layer in m.modules():
            if hasattr(layer, "weight_quantizer"):
                layer.weight_quantizer.fix_bits()
    convert_to_packed_(a)
    convert_to_packed_(b)
    assert not torch.equal(a(X), b(X))
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert torch.equal(a(X), b(X))


def test_state_dict_with_other_bits_is_refused() -> None:
    a = PackedLinear(10, 4, bits=4, qmin=-8)
    b = PackedLinear(10, 4, bits=3, qmin=-4)
    with pytest.raises(ValueError, match="packed layout"):
        b.load_state_dict(a.state_dict())


def test_unfrozen_layer_is_a_clear_error() -> None:
    model = mpq_plugin.quantize_(_mlp(), _config("lsq"), example_inputs=(X,))
    with pytest.raises(ValueError, match=r"layer 0 is not frozen.*mpq_plugin.freeze"):
        convert_to_packed_(model)


def test_unsupported_bits_raise_or_are_skipped() -> None:
    cfg = mpq_plugin.MPQConfig(method="lsq", weight_bits=4, act_bits=8, layer_overrides={"2": {"weight_bits": 12}})
    model = mpq_plugin.quantize_(_mlp(), cfg, example_inputs=(X,))
    mpq_plugin.freeze(model)
    with pytest.raises(ValueError, match="layer 2 has 12-bit weights"):
        convert_to_packed_(copy.deepcopy(model))
    report = convert_to_packed_(model, skip_unsupported=True)
    assert report["skipped"] == ["2"] and set(report["layers"]) == {"0", "4"}


def test_int_activations_refused_without_input_quantizer() -> None:
    model = mpq_plugin.quantize_(_mlp(), _config("lsq", act_bits=None))
    mpq_plugin.freeze(model)
    layer = model.get_submodule("0")
    with pytest.raises(ValueError, match="needs a quantized input"):
        PackedLinear.from_quant_layer(layer, int_activations=True)
    report = convert_to_packed_(model, int_activations=True)  # falls back to weight-only per layer
    assert not any(v["int_path"] for v in report["layers"].values())


@pytest.mark.parametrize("method", ["lsq", "sdq"])
def test_conv_layers_pack_weight_only(method: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 1, 8, 8)
    cfg = mpq_plugin.MPQConfig(method=method, weight_bits=4, act_bits=8)
    model = mpq_plugin.quantize_(TinyConvNet(), cfg, example_inputs=(x,))
    mpq_plugin.freeze(model)
    model.eval()
    with torch.no_grad():
        y = model(x)
    report = convert_to_packed_(model)
    assert isinstance(model.conv2, PackedConv2d) and isinstance(model.fc, PackedLinear)
    assert len(report["layers"]) == 3
    with torch.no_grad():
        assert torch.equal(model(x), y)


def test_dispatch_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(2, 3)
    monkeypatch.delenv("MPQ_KERNELS", raising=False)
    assert packed_dispatch.select(x) == "reference"  # CPU tensor
    monkeypatch.setenv("MPQ_KERNELS", "eager")
    assert packed_dispatch.select(x) == "reference"
    monkeypatch.setenv("MPQ_KERNELS", "bogus")
    with pytest.raises(ValueError, match="MPQ_KERNELS='bogus'"):
        packed_dispatch.select(x)


def test_sdq_binary_weights_pack_with_half_zero_point() -> None:
    cfg = mpq_plugin.MPQConfig(method="sdq", weight_bits=4, act_bits=8, layer_overrides={"2": {"weight_bits": 1}})
    model = mpq_plugin.quantize_(_mlp(), cfg, example_inputs=(X,))
    mpq_plugin.freeze(model)
    model.eval()
    fq_w = model.get_submodule("2").quantized_weight().detach()
    with torch.no_grad():
        y = model(X)
    with pytest.raises(ValueError, match="integer weight zero points"):
        PackedLinear.from_quant_layer(model.get_submodule("2"), int_activations=True, name="2")
    report = convert_to_packed_(model, int_activations=True)
    p = model.get_submodule("2")
    assert p.bits == 1 and float(p.zero_point) == 0.5 and not report["layers"]["2"]["int_path"]
    assert torch.equal(p.dequantized_weight_2d(), fq_w)
    with torch.no_grad():
        torch.testing.assert_close(model(X), y, rtol=1e-4, atol=1e-5)


def test_compiled_path_is_bit_exact_with_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-4, 4, (16, 40), generator=g)
    packed = packed_ref.pack_rows(codes, 3, -4)
    scale, zp, x = torch.rand(16, generator=g), torch.zeros(16), torch.randn(5, 40, generator=g)
    monkeypatch.setenv("MPQ_KERNELS", "compiled")
    assert packed_dispatch.select(x) == "compiled"
    y = packed_dispatch.packed_linear(x, packed, 3, 40, -4, zp, scale)
    assert torch.equal(y, packed_ref.packed_linear(x, packed, 3, 40, -4, zp, scale))
    monkeypatch.delenv("MPQ_KERNELS")
    assert packed_dispatch.select(x, weight_numel=1 << 20) == "compiled"  # large CPU weights


def test_importing_packed_layers_does_not_import_triton() -> None:
    import subprocess
    import sys

    code = "import sys, mpq_plugin.nn.packed; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
