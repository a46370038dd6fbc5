"""Shared fixtures: small models and a per-method config that every method accepts."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import mpq_plugin
from mpq_plugin.registry import get_method

# pytest-xdist runs one worker per core: one torch thread each avoids oversubscription, which
# made tiny ops ~1000x slower on a loaded 2-core machine
torch.set_num_threads(1)


def config_for(method: str, **kw) -> mpq_plugin.MPQConfig:
    """A config valid for ``method``: a bit range for searching methods, 4 bits for baselines."""
    searches = get_method(method).quantizer_cls.searches_bits
    kw.setdefault("weight_bits", (2, 8) if searches else 4)
    kw.setdefault("act_bits", 8)
    return mpq_plugin.MPQConfig(method=method, **kw)


class TinyConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.flatten(1))


@pytest.fixture
def tiny_conv() -> TinyConvNet:
    torch.manual_seed(0)
    return TinyConvNet()


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
