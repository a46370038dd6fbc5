"""Cost accounting: weight memory, activation memory (sum and max) and BOPs.

A layer is described by a :class:`LayerGeometry` (counts per sample); bit-widths come in as
tensors so every cost is differentiable with respect to learned bit-widths. Units follow the
learned-range paper: 1 KB = 1024 bytes, 1 MB = 2^20 bytes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from math import prod
from typing import Dict, Sequence, Union

import torch

BitsLike = Union[torch.Tensor, Sequence[float]]


@dataclass(frozen=True)
class LayerGeometry:
    """Per-sample counts of one quantized layer.

    Attributes:
        name: module name in the model.
        kind: ``conv1d``, ``conv2d``, ``linear`` or ``embedding``.
        weight_numel: elements of the weight tensor.
        bias_numel: elements of the bias (0 if none).
        macs: multiply-accumulates for one sample.
        act_numel: elements of the quantized input activation for one sample.
    """

    name: str
    kind: str
    weight_numel: int
    bias_numel: int
    macs: int
    act_numel: int

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)


def conv_geometry(name: str, weight_shape: Sequence[int], bias: bool, groups: int,
                  in_shape: Sequence[int], out_shape: Sequence[int]) -> LayerGeometry:
    """Geometry of a Conv1d/2d from its weight shape and per-sample input/output shapes (no batch).

    ``weight_shape = (C_out, C_in / groups, *kernel)``; MACs = output elements times the
    per-output fan-in ``C_in/groups * prod(kernel)`` (so depthwise convs cost ``prod(kernel)``).
    """
    fan_in = prod(weight_shape[1:])
    kind = "conv1d" if len(weight_shape) == 3 else "conv2d"
    return LayerGeometry(name, kind, prod(weight_shape), weight_shape[0] if bias else 0,
                         prod(out_shape) * fan_in, prod(in_shape))


def linear_geometry(name: str, in_features: int, out_features: int, bias: bool,
                    in_shape: Sequence[int]) -> LayerGeometry:
    """Geometry of a Linear applied to a per-sample input of ``in_shape`` (tokens x features)."""
    tokens = prod(in_shape) // in_features if in_shape else 1
    return LayerGeometry(name, "linear", in_features * out_features, out_features if bias else 0,
                         tokens * in_features * out_features, prod(in_shape) if in_shape else in_features)


def embedding_geometry(name: str, num_embeddings: int, dim: int) -> LayerGeometry:
    """An Embedding is a lookup: weight memory only, no MACs, no quantized input activation."""
    return LayerGeometry(name, "embedding", num_embeddings * dim, 0, 0, 0)


def _as_tensor(bits: BitsLike) -> torch.Tensor:
    # float64 stays float64 (gradcheck, large totals); everything else computes in float32
    if isinstance(bits, torch.Tensor):
        return bits if bits.dtype == torch.float64 else bits.float()
    return torch.tensor(list(bits), dtype=torch.float32)


def weight_bits_total(layers: Sequence[LayerGeometry], weight_bits: BitsLike,
                      count_bias: bool = True) -> torch.Tensor:
    """Total weight storage in bits: ``sum_l (W_l + B_l) * b_l`` (bias at the weight's bits, as
    the learned-range paper's Table 2 counts it)."""
    b = _as_tensor(weight_bits)
    n = torch.tensor([g.weight_numel + (g.bias_numel if count_bias else 0) for g in layers],
                     dtype=b.dtype, device=b.device)
    return (n * b).sum()


def weight_params(layers: Sequence[LayerGeometry], count_bias: bool = True) -> int:
    """Number of quantized parameters."""
    return sum(g.weight_numel + (g.bias_numel if count_bias else 0) for g in layers)


def avg_weight_bits(layers: Sequence[LayerGeometry], weight_bits: BitsLike,
                    count_bias: bool = False) -> torch.Tensor:
    """Parameter-weighted average weight bit-width."""
    return weight_bits_total(layers, weight_bits, count_bias) / max(weight_params(layers, count_bias), 1)


def weight_kb(layers: Sequence[LayerGeometry], weight_bits: BitsLike,
              count_bias: bool = True) -> torch.Tensor:
    """Weight memory in KB (1 KB = 1024 bytes)."""
    return weight_bits_total(layers, weight_bits, count_bias) / 8.0 / 1024.0


def activation_kb(act_numel: Sequence[int], act_bits: BitsLike, reduce: str = "sum") -> torch.Tensor:
    """Per-sample activation memory in KB, summed over tensors or the largest one (``max``).

    ``sum`` is the memory of a pipelined (FPGA) design holding every feature map; ``max`` the
    largest single feature map (learned-range paper, constraints 8b/8c).
    """
    b = _as_tensor(act_bits)
    kb = torch.tensor(list(act_numel), dtype=b.dtype, device=b.device) * b / 8.0 / 1024.0
    if kb.numel() == 0:
        return torch.zeros((), device=b.device)
    if reduce == "sum":
        return kb.sum()
    if reduce == "max":
        return kb.max()
    raise ValueError(f"reduce={reduce!r}; use 'sum' or 'max'")


def bops(layers: Sequence[LayerGeometry], weight_bits: BitsLike, act_bits: BitsLike) -> torch.Tensor:
    """Bit operations per sample: ``sum_l MACs_l * b_w,l * b_a,l``."""
    wb, ab = _as_tensor(weight_bits), _as_tensor(act_bits)
    macs = torch.tensor([g.macs for g in layers], dtype=torch.float64, device=wb.device)
    return (macs * wb.double() * ab.to(wb.device).double()).sum()
