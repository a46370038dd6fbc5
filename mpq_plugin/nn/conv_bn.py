"""Fused Conv-BN: a float ``ConvBn1d/2d`` and its QAT version with BN folding.

``ConvBn2d`` is a ``nn.Conv2d`` that holds its BatchNorm as the child ``bn`` and computes
``bn(conv(x))`` with the same ops, so swapping it in for a Conv->BN pair changes nothing.
``fuse_conv_bn(conv, bn)`` builds one that shares the conv's and the BN's parameters.

``QuantConvBn2d`` trains with BN folded into the quantized weight, as torch.ao's ``_ConvBnNd``
and Jacob et al. (CVPR 2018, §3.2) do. With ``s = gamma / sqrt(running_var + eps)``:

* the weight quantizer sees the folded weight ``w_fold = w * s`` (what deploys, and what
  :meth:`QuantLayer.weight_to_quantize` hands to the export);
* BN in training mode: ``y = bn(conv(x, q(w_fold)) / s + b)``; BN normalizes with the batch
  statistics and updates its running statistics (division by ``s`` undoes the fold, so BN sees
  conv outputs at their float scale);
* BN in eval mode: ``y = conv(x, q(w_fold)) + b_fold`` with
  ``b_fold = beta + (b - running_mean) * s``: the deployed computation, bit for bit.

The path follows ``self.bn.training``, so ``layer.bn.eval()`` during QAT ("freeze BN", a late
finetune phase in Jacob et al.) trains the deployed computation directly.

Rule for weight-replacing methods (``replaces_weight = True``, e.g. CSQ, whose quantizer
synthesizes the weight from bit planes and ignores the float weight): the weight cannot be
folded during QAT, because the quantizer has no float weight to scale. Such layers keep BN
unfolded: ``y = bn(conv(x, q(w)) + b)`` in both modes; BN folds only at export
(``folded_weight(layer.quantized_weight())``, ``folded_bias()``), which re-quantizes the folded
weight, so that export is not bit-exact with the QAT forward.
"""
from __future__ import annotations

from typing import Optional, Tuple, Type

import torch
from torch import nn

from mpq_plugin.core.cost import LayerGeometry, conv_geometry
from mpq_plugin.nn.layers import QuantLayer, _clone_module_as, _require_shapes, register_quant_layer


class _ConvBnMixin:
    """Folding arithmetic shared by the float and quantized Conv-BN layers."""

    bn: nn.modules.batchnorm._BatchNorm
    weight: nn.Parameter
    bias: Optional[nn.Parameter]
    _conv_cls: Type[nn.Module]
    _bn_cls: Type[nn.Module]

    def bn_scale(self) -> torch.Tensor:
        """Per-channel ``s = gamma / sqrt(running_var + eps)`` (differentiable in gamma)."""
        bn = self.bn
        std = torch.sqrt(bn.running_var + bn.eps)  # type: ignore[operator]
        return bn.weight / std if bn.affine else 1.0 / std

    def _per_channel(self, v: torch.Tensor, like: torch.Tensor, axis: int) -> torch.Tensor:
        shape = [1] * like.dim()
        shape[axis] = -1
        return v.reshape(shape)

    def folded_weight(self, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``weight * s`` per output channel (default: the conv weight)."""
        w = self.weight if weight is None else weight
        return w * self._per_channel(self.bn_scale(), w, 0)

    def folded_bias(self) -> torch.Tensor:
        """``beta + (b - running_mean) * s`` (``b = 0`` for a conv without bias)."""
        bn = self.bn
        mean = bn.running_mean
        b = self.bias if self.bias is not None else torch.zeros_like(mean)  # type: ignore[arg-type]
        beta = bn.bias if bn.affine else torch.zeros_like(mean)  # type: ignore[arg-type]
        return beta + (b - mean) * self.bn_scale()

    def unfuse(self) -> Tuple[nn.Module, nn.Module]:
        """``(conv, bn)`` as plain float modules sharing this layer's parameters."""
        if isinstance(self, QuantLayer):
            raise TypeError("unfuse a float ConvBn layer; call mpq_plugin.nn.to_float(layer) first")
        conv = _clone_module_as(self, self._conv_cls)  # type: ignore[arg-type]
        conv._modules.pop("bn", None)
        return conv, self.bn


class _FloatConvBn(_ConvBnMixin):
    """Constructor and ``bn(conv(x))`` forward of the float ConvBn layers (``_bn_cls`` picks the BN)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = False, padding_mode: str = "zeros",
                 eps: float = 1e-5, momentum: Optional[float] = 0.1, device=None, dtype=None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,  # type: ignore[call-arg]
                         groups, bias, padding_mode, device=device, dtype=dtype)
        self.bn = self._bn_cls(out_channels, eps, momentum, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self._conv_forward(x, self.weight, self.bias))  # type: ignore[attr-defined]


class ConvBn1d(_FloatConvBn, nn.Conv1d):
    """``nn.Conv1d`` followed by its ``nn.BatchNorm1d`` (child ``bn``); forward ``bn(conv(x))``."""

    _conv_cls = nn.Conv1d
    _bn_cls = nn.BatchNorm1d


class ConvBn2d(_FloatConvBn, nn.Conv2d):
    """``nn.Conv2d`` followed by its ``nn.BatchNorm2d`` (child ``bn``); forward ``bn(conv(x))``.

    Example:
        >>> conv, bn = nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8)
        >>> fused = fuse_conv_bn(conv, bn)
        >>> x = torch.randn(2, 3, 8, 8)
        >>> torch.equal(fused.eval()(x), bn.eval()(conv(x)))
        True
    """

    _conv_cls = nn.Conv2d
    _bn_cls = nn.BatchNorm2d


_FUSED_FOR = {nn.Conv1d: (nn.BatchNorm1d, ConvBn1d), nn.Conv2d: (nn.BatchNorm2d, ConvBn2d)}


def fuse_conv_bn(conv: nn.Module, bn: nn.Module) -> nn.Module:
    """A ``ConvBn1d``/``ConvBn2d`` computing ``bn(conv(x))``, sharing both modules' parameters.

    Raises:
        TypeError: ``conv`` is not exactly ``nn.Conv1d``/``nn.Conv2d`` or ``bn`` is not the
            matching ``nn.BatchNorm1d``/``nn.BatchNorm2d``.
        ValueError: channel counts differ, or the BN keeps no running statistics (nothing to fold).
    """
    entry = _FUSED_FOR.get(type(conv))
    if entry is None:
        raise TypeError(f"fuse_conv_bn needs an nn.Conv1d or nn.Conv2d, got {type(conv).__name__}")
    bn_cls, fused_cls = entry
    if type(bn) is not bn_cls:
        raise TypeError(f"{type(conv).__name__} fuses with {bn_cls.__name__}, got {type(bn).__name__}")
    if bn.num_features != conv.out_channels:  # type: ignore[union-attr]
        raise ValueError(f"BN has {bn.num_features} features but the conv has {conv.out_channels} "
                         "output channels; they are not a Conv->BN pair")
    if not bn.track_running_stats or bn.running_var is None:  # type: ignore[union-attr]
        raise ValueError("BN with track_running_stats=False has no running statistics to fold; "
                         "keep it unfused (prepare_vision_model(..., fold_bn=False))")
    fused = _clone_module_as(conv, fused_cls)
    fused.bn = bn
    return fused


class _QuantConvBnMixin(QuantLayer):
    """QAT of a fused Conv-BN with BN folded into the quantized weight (see the module docstring)."""

    @property
    def folds_bn(self) -> bool:
        """``False`` for weight-replacing quantizers (CSQ): BN stays unfolded until export."""
        return not self.weight_quantizer.replaces_weight

    def weight_to_quantize(self) -> torch.Tensor:
        return self.folded_weight() if self.folds_bn else self.weight  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = self.quantize_input(x)
        wq = self.quantized_weight()
        conv, bn = self._conv_forward, self.bn  # type: ignore[attr-defined]
        if not self.folds_bn:
            y = bn(conv(xq, wq, self.bias))  # type: ignore[attr-defined]
        elif bn.training:
            s = self.bn_scale()  # type: ignore[attr-defined]
            s = torch.where(s == 0, torch.ones_like(s), s)  # gamma = 0: channel is beta anyway
            y = conv(xq, wq, None)
            y = y / self._per_channel(s, y, 1)  # type: ignore[attr-defined]
            if self.bias is not None:  # type: ignore[attr-defined]
                y = y + self._per_channel(self.bias, y, 1)  # type: ignore[attr-defined]
            y = bn(y)
        else:
            y = conv(xq, wq, None)
            y = y + self._per_channel(self.folded_bias(), y, 1)  # type: ignore[attr-defined]
        self._record(x, y)
        return y

    def geometry(self, name: str = "") -> LayerGeometry:
        """Conv geometry with the folded bias counted (BN deploys as that bias)."""
        _require_shapes(self, name)
        return conv_geometry(name, tuple(self.weight.shape), True, self.groups,  # type: ignore[attr-defined]
                             self._in_shape, self._out_shape)  # type: ignore[arg-type]


class QuantConvBn1d(_QuantConvBnMixin, ConvBn1d):
    """Quantized ``ConvBn1d`` (BN folded into the quantized weight)."""


class QuantConvBn2d(_QuantConvBnMixin, ConvBn2d):
    """Quantized ``ConvBn2d`` (BN folded into the quantized weight)."""


register_quant_layer(ConvBn1d, QuantConvBn1d)
register_quant_layer(ConvBn2d, QuantConvBn2d)

__all__ = ["ConvBn1d", "ConvBn2d", "QuantConvBn1d", "QuantConvBn2d", "fuse_conv_bn"]
