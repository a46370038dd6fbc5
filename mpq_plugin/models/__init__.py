"""Reference models in plain torch (no torchvision): CIFAR ResNet-20, MobileNetV2, SmallCNN."""
from mpq_plugin.models.mobilenetv2 import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MobileNetV2,
    load_pretrained_mobilenet_v2,
    mobilenet_v2,
    pretrained_mobilenet_v2_path,
)
from mpq_plugin.models.resnet20 import ResNet20, resnet20
from mpq_plugin.models.small_cnn import SmallCNN

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MobileNetV2",
    "ResNet20",
    "SmallCNN",
    "load_pretrained_mobilenet_v2",
    "mobilenet_v2",
    "pretrained_mobilenet_v2_path",
    "resnet20",
]
