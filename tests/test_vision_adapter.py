"""Vision adapter: Conv-BN fusion, first/last/shortcut policy, quantize_vision_ on real CNNs."""
from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mpq_plugin
from mpq_plugin.adapters import (
    find_conv_bn_pairs,
    find_shortcut_convs,
    fuse_conv_bn_,
    layer_order,
    paper_policy,
    prepare_vision_model,
    quantize_vision_,
)
from mpq_plugin.models import IMAGENET_MEAN, IMAGENET_STD, SmallCNN, mobilenet_v2, resnet20
from mpq_plugin.nn.conv_bn import ConvBn2d
from mpq_plugin.nn.layers import QuantLayer, quant_layers
from tests.conftest import config_for

METHODS = mpq_plugin.list_methods()
X32 = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
X16 = X32[:2, :, :16, :16].clone()  # the method x model matrix: small and fast

# name -> (builder, Conv->BN pairs, first layer, last layer, 1x1 shortcut convs)
MODELS = {
    "resnet20A": (lambda: resnet20(shortcut="A"), 19, "conv1", "fc", []),
    "resnet20B": (lambda: resnet20(shortcut="B"), 21, "conv1", "fc",
                  ["layer2.0.downsample.0", "layer3.0.downsample.0"]),
    "mobilenet_v2": (lambda: mobilenet_v2(num_classes=10, width_mult=0.25), 52, "features.0.0", "classifier.1", []),
    "small_cnn": (lambda: SmallCNN(in_channels=3), 3, "features.0", "fc", []),
}


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = MODELS[name][0]()
    _randomize_bn(model)
    return model.eval()


def _randomize_bn(model: nn.Module) -> None:
    """Non-trivial BN statistics, so that a wrong fold cannot pass unnoticed."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


# -- fusion ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_fuses_every_pair_and_keeps_the_float_output(name: str) -> None:
    model = _build(name)
    expected = model(X32)
    pairs, how = find_conv_bn_pairs(model)
    assert how == "fx" and len(pairs) == MODELS[name][1]
    prepare_vision_model(model)
    fused = [n for n, m in model.named_modules() if type(m) is ConvBn2d]
    assert len(fused) == MODELS[name][1]
    left = [n for n, m in model.named_modules()
            if type(m) is nn.Conv2d or (type(m) is nn.BatchNorm2d and not n.endswith(".bn"))]
    assert not left, f"left unfused: {left}"
    torch.testing.assert_close(model(X32), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_layer_roles(name: str) -> None:
    _, _, first, last, shortcuts = MODELS[name]
    model = _build(name)
    order = layer_order(model)
    assert order[0] == first and order[-1] == last
    assert sorted(find_shortcut_convs(model)) == shortcuts


class _Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 main branch plus a 1x1 projection shortcut: only the latter is a shortcut."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv3, self.bn3 = nn.Conv2d(4, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.proj = nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        return torch.relu(self.bn3(self.conv3(y)) + self.proj(x))


def test_shortcut_detection_is_structural() -> None:
    model = _Bottleneck()
    assert find_shortcut_convs(model) == ["proj.0"]
    assert len(find_conv_bn_pairs(model)[0]) == 4


def test_fold_bn_false_keeps_bn() -> None:
    model = _build("resnet20B")
    overrides = prepare_vision_model(model, fold_bn=False)
    assert not any(isinstance(m, ConvBn2d) for m in model.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 21
    assert overrides["conv1"] == {"weight_bits": (8, 8), "act_bits": None}


class _Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, the fallback must pair by names."""

    def __init__(self, reuse_conv_output: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.fc = nn.Linear(4, 2)
        self.reuse = reuse_conv_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv1(x)
        y = self.bn1(c)
        if self.reuse:
            y = y + c  # the conv output is used twice: fusing conv1/bn1 would be wrong
        if y.sum() > -1e9:  # data dependent: not traceable
            y = self.block(y)
        return self.fc(y.mean((2, 3)))


def test_untraceable_model_uses_module_fallback() -> None:
    torch.manual_seed(0)
    model = _Untraceable().eval()
    _randomize_bn(model)
    expected = model(X32)
    pairs, how = find_conv_bn_pairs(model)
    assert how == "modules" and sorted(pairs) == [("block.0", "block.1"), ("conv1", "bn1")]
    assert layer_order(model, (X32,)) == ["conv1", "block.0", "fc"]
    quantize_vision_(model, config_for("lsq"), (X32,))
    assert isinstance(model.conv1, ConvBn2d) and isinstance(model.bn1, nn.Identity)
    assert model.conv1.weight_quantizer.bits == 8 and model.conv1.input_quantizer is None
    assert model.block[0].weight_quantizer.bits == 4
    assert torch.isfinite(model(X32)).all() and expected.shape == (4, 2)


def test_wrong_name_heuristic_is_detected_and_undone() -> None:
    torch.manual_seed(0)
    model = _Untraceable(reuse_conv_output=True).eval()
    _randomize_bn(model)
    conv1, bn1 = model.conv1, model.bn1
    with pytest.raises(ValueError, match="changed the model's output"):
        fuse_conv_bn_(model, example_inputs=(X32,))
    assert model.conv1 is conv1 and model.bn1 is bn1 and type(model.block[0]) is nn.Conv2d


# -- policy ----------------------------------------------------------------------------------------
def test_default_policy_pins_first_and_last_to_8_bits() -> None:
    model = _build("resnet20B")
    quantize_vision_(model, config_for("lsq", weight_bits=4, act_bits=4), (X32,))
    layers = dict(quant_layers(model))
    assert layers["conv1"].weight_quantizer.bits == 8 and layers["conv1"].input_quantizer is None
    assert layers["fc"].weight_quantizer.bits == 8 and layers["fc"].input_quantizer.bits == 8
    others = [n for n in layers if n not in ("conv1", "fc")]
    assert len(others) == 20 and all(layers[n].weight_quantizer.bits == 4 for n in others)
    assert all(layers[n].input_quantizer.bits == 4 for n in others)
    assert isinstance(layers["layer2.0.downsample.0"], ConvBn2d)  # shortcuts quantized by default


def test_policy_variants() -> None:
    model = _build("resnet20B")
    ov = prepare_vision_model(model, first_layer_bits="same", last_layer_bits=None,
                              quantize_shortcuts=False)
    assert ov == {"conv1": {"act_bits": None}, "fc": {"skip": True},
                  "layer2.0.downsample.0": {"skip": True}, "layer3.0.downsample.0": {"skip": True}}
    mpq_plugin.quantize_(model, config_for("lsq", weight_bits=4, layer_overrides=ov), (X32,))
    assert model.conv1.weight_quantizer.bits == 4 and model.conv1.input_quantizer is None
    assert type(model.fc) is nn.Linear
    ds = model.layer2[0].downsample[0]
    assert type(ds) is ConvBn2d and not isinstance(ds, QuantLayer)

    model = _build("resnet20A")
    ov = prepare_vision_model(model, first_layer_bits=6, quantize_first_input=True)
    assert ov["conv1"] == {"weight_bits": (6, 6), "act_bits": (6, 6)}
    assert prepare_vision_model(_build("resnet20A"), first_layer_bits=None)["conv1"] == {"skip": True}
    assert "conv1" not in prepare_vision_model(_build("resnet20A"), first_layer_bits="same",
                                               quantize_first_input=True)


def test_paper_policies() -> None:
    assert paper_policy("lsq")["first_layer_bits"] == 8
    assert paper_policy("learned_range") == dict(first_layer_bits="same", last_layer_bits="same",
                                                 fold_bn=False, quantize_shortcuts=True)
    assert paper_policy("csq")["quantize_shortcuts"] is False
    assert paper_policy("unknown_method") == paper_policy("lsq")
    model = _build("resnet20B")
    quantize_vision_(model, config_for("lsq"), (X32,), **paper_policy("learned_range"))
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 21
    assert model.conv1.weight_quantizer.bits == 4 and model.fc.weight_quantizer.bits == 4


def test_config_overrides_win_and_act_bits_none_adds_no_activation_quantizer() -> None:
    model = _build("resnet20A")
    cfg = config_for("lsq", act_bits=None, layer_overrides={"fc": {"weight_bits": 5}})
    quantize_vision_(model, cfg, (X32,))
    assert model.fc.weight_quantizer.bits == 5 and model.conv1.weight_quantizer.bits == 8
    assert all(layer.input_quantizer is None for _, layer in quant_layers(model))


def test_bad_policy_and_quantized_model_raise() -> None:
    with pytest.raises(ValueError, match="first_layer_bits"):
        prepare_vision_model(_build("small_cnn"), first_layer_bits="eight")
    with pytest.raises(ValueError, match="last_layer_bits"):
        prepare_vision_model(_build("small_cnn"), last_layer_bits=0)
    model = quantize_vision_(_build("small_cnn"), config_for("lsq"), (X32,))
    with pytest.raises(ValueError, match="already quantized"):
        prepare_vision_model(model)
    with pytest.raises(TypeError, match="MPQConfig"):
        quantize_vision_(_build("small_cnn"), {"method": "lsq"}, (X32,))


def test_calibration_does_not_touch_bn_running_stats() -> None:
    model = _build("small_cnn").train()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    quantize_vision_(model, config_for("lsq"), (X32,))
    after = model.state_dict()
    for k, v in before.items():
        fused_key = k.replace("features.1.", "features.0.bn.").replace("features.4.", "features.3.bn.") \
                     .replace("features.7.", "features.6.bn.")
        assert torch.equal(after[fused_key], v), k
    assert model.training


# -- every method on every model ------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("method", METHODS)
def test_quantized_forward_backward_and_freeze(method: str, name: str) -> None:
    model = _build(name).train()
    policy = paper_policy(method) if method != "lsq" else {}
    quantize_vision_(model, config_for(method), (X16,), **policy)
    layers = dict(quant_layers(model))
    first, last = MODELS[name][2], MODELS[name][3]
    if policy.get("first_layer_bits", 8) == 8:
        assert layers[first].weight_quantizer.spec.bits == (8, 8)
        assert layers[last].weight_quantizer.spec.bits == (8, 8)
    assert layers[first].input_quantizer is None
    out = model(X16)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{method}/{name}: no gradient reached {missing}"
    plan = mpq_plugin.freeze(model)
    assert set(plan) == set(layers)
    model.eval()
    for lname, layer in quant_layers(model):
        state = layer.weight_quantizer.freeze(layer.weight_to_quantize())
        assert torch.equal(state.dequantize(), layer.quantized_weight()), f"{method}/{name}/{lname}"


def test_depthwise_convs_are_fused_and_quantized() -> None:
    model = _build("mobilenet_v2")
    quantize_vision_(model, config_for("lsq"), (X32,))
    dw = [layer for _, layer in quant_layers(model) if getattr(layer, "groups", 1) > 1]
    assert len(dw) == 17 and all(isinstance(m, ConvBn2d) and m.groups == m.in_channels == m.out_channels
                                 for m in dw)
    cost = mpq_plugin.model_cost(model)
    assert cost["layers"]["features.1.conv.0.0"]["macs"] == 8 * 16 * 16 * 9  # depthwise: 9 MACs per output


# -- the pretrained ImageNet MobileNetV2 ---------------------------------------------------------
def _photo(image: Callable) -> torch.Tensor:
    """Resize shorter side to 256, centre-crop 224, ImageNet normalization: (1, 3, 224, 224)."""
    x = torch.from_numpy(image()).permute(2, 0, 1).float().div(255).unsqueeze(0)
    h, w = x.shape[-2:]
    s = 256 / min(h, w)
    x = F.interpolate(x, size=(round(h * s), round(w * s)), mode="bilinear", align_corners=False, antialias=True)
    top, left = (x.shape[-2] - 224) // 2, (x.shape[-1] - 224) // 2
    x = x[..., top:top + 224, left:left + 224]
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def pretrained():
    """The ImageNet MobileNetV2 and one photo, fused, then quantized with LSQ W8/A8 (once per module)."""
    from mpq_plugin.models import load_pretrained_mobilenet_v2

    try:
        float_model = load_pretrained_mobilenet_v2()
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(str(e))
    data = pytest.importorskip("skimage.data")
    x = _photo(data.chelsea)
    model = copy.deepcopy(float_model)
    with torch.no_grad():
        expected = float_model(x)
    pairs, how = find_conv_bn_pairs(model)
    overrides = prepare_vision_model(model)
    with torch.no_grad():
        fused_out = model(x)
    n_fused = sum(type(m) is ConvBn2d for m in model.modules())
    cfg = mpq_plugin.MPQConfig(method="lsq", weight_bits=8, act_bits=8, layer_overrides=overrides)
    mpq_plugin.quantize_(model, cfg, (x,))
    return dict(x=x, expected=expected, pairs=pairs, how=how, fused_out=fused_out, n_fused=n_fused,
                model=model)


@pytest.mark.slow
def test_pretrained_mobilenet_v2_fusion_and_8bit_agreement(pretrained) -> None:
    x, expected, model = pretrained["x"], pretrained["expected"], pretrained["model"]
    assert int(expected.argmax()) == 285  # Egyptian cat
    assert pretrained["how"] == "fx" and len(pretrained["pairs"]) == 52 and pretrained["n_fused"] == 52
    torch.testing.assert_close(pretrained["fused_out"], expected, rtol=0, atol=1e-5)
    layers = dict(quant_layers(model))
    assert len(layers) == 53 and layers["features.0.0"].input_quantizer is None
    assert layers["features.0.0"].weight_quantizer.bits == 8 and layers["classifier.1"].weight_quantizer.bits == 8
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert int(out.argmax()) == int(expected.argmax())
    p, q = expected.softmax(-1), out.softmax(-1)
    assert float((p * (p.log() - q.log())).sum()) < 0.2  # KL(float || W8A8)


@pytest.mark.slow
def test_pretrained_mobilenet_v2_quantized_training_step(pretrained) -> None:
    model, x = copy.deepcopy(pretrained["model"]).train(), pretrained["x"]
    tracked = int(model.features[4].conv[1][0].bn.num_batches_tracked)
    loss = F.cross_entropy(model(x), torch.tensor([285]))
    loss.backward()
    assert torch.isfinite(loss)
    dw = model.features[4].conv[1][0]  # a depthwise ConvBn2d
    assert dw.groups == dw.in_channels and dw.weight.grad.abs().sum() > 0 and dw.bn.weight.grad.abs().sum() > 0
    assert model.classifier[1].weight_quantizer.step.grad is not None
    assert int(dw.bn.num_batches_tracked) == tracked + 1  # train mode: BN used batch statistics and updated
