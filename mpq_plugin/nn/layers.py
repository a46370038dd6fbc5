"""Quantized Conv1d/Conv2d/Linear/Embedding: the float layer plus weight and input quantizers.

``wrap_layer`` turns a float layer into its quantized subclass *in place of* the original,
sharing the same parameter objects, so state-dict keys of the float model are unchanged
(``conv.weight`` stays ``conv.weight``) and an optimizer built before the swap still works.
``to_float`` reverses it.
"""
from __future__ import annotations

from typing import Dict, Iterator, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from mpq_plugin.core.cost import LayerGeometry, conv_geometry, embedding_geometry, linear_geometry
from mpq_plugin.nn.fake_quantizer import FakeQuantizer


class QuantLayer:
    """Mixin shared by the quantized layers."""

    weight_quantizer: FakeQuantizer
    input_quantizer: Optional[FakeQuantizer]
    _float_cls: Type[nn.Module]
    _in_shape: Optional[Tuple[int, ...]]
    _out_shape: Optional[Tuple[int, ...]]

    def weight_to_quantize(self) -> torch.Tensor:
        """The float tensor the weight quantizer sees (and export freezes): the weight, or the
        BN-folded weight for a fused Conv-BN layer."""
        return self.weight  # type: ignore[attr-defined]

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.weight_to_quantize())

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.input_quantizer(x) if self.input_quantizer is not None else x

    def _record(self, x: torch.Tensor, y: torch.Tensor) -> None:
        # per-sample shapes, for cost accounting (activation memory, MACs)
        self._in_shape = tuple(x.shape[1:])
        self._out_shape = tuple(y.shape[1:])

    def geometry(self, name: str = "") -> LayerGeometry:
        """Per-sample geometry; conv/linear need one forward pass to know their input shape."""
        raise NotImplementedError


class QuantConv1d(QuantLayer, nn.Conv1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._conv_forward(self.quantize_input(x), self.quantized_weight(), self.bias)
        self._record(x, y)
        return y

    def geometry(self, name: str = "") -> LayerGeometry:
        _require_shapes(self, name)
        return conv_geometry(name, tuple(self.weight.shape), self.bias is not None, self.groups,
                             self._in_shape, self._out_shape)  # type: ignore[arg-type]


class QuantConv2d(QuantLayer, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._conv_forward(self.quantize_input(x), self.quantized_weight(), self.bias)
        self._record(x, y)
        return y

    def geometry(self, name: str = "") -> LayerGeometry:
        _require_shapes(self, name)
        return conv_geometry(name, tuple(self.weight.shape), self.bias is not None, self.groups,
                             self._in_shape, self._out_shape)  # type: ignore[arg-type]


class QuantLinear(QuantLayer, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(self.quantize_input(x), self.quantized_weight(), self.bias)
        self._record(x, y)
        return y

    def geometry(self, name: str = "") -> LayerGeometry:
        in_shape = self._in_shape if self._in_shape is not None else (self.in_features,)
        return linear_geometry(name, self.in_features, self.out_features, self.bias is not None, in_shape)


class QuantEmbedding(QuantLayer, nn.Embedding):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, self.quantized_weight(), self.padding_idx, self.max_norm,
                           self.norm_type, self.scale_grad_by_freq, self.sparse)

    def geometry(self, name: str = "") -> LayerGeometry:
        return embedding_geometry(name, self.num_embeddings, self.embedding_dim)


def _require_shapes(layer: QuantLayer, name: str) -> None:
    if layer._in_shape is None:
        raise RuntimeError(
            f"layer {name or type(layer).__name__} has not run yet, so its activation size is unknown; "
            "pass example_inputs to quantize_/model_cost or run one forward pass first"
        )


QUANT_LAYER_TYPES: Dict[Type[nn.Module], Type[nn.Module]] = {
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Linear: QuantLinear,
    nn.Embedding: QuantEmbedding,
}


def register_quant_layer(float_cls: Type[nn.Module], quant_cls: Type[nn.Module]) -> None:
    """Teach ``quantize_`` a new float layer type (e.g. a fused Conv-BN from an adapter)."""
    if not issubclass(quant_cls, QuantLayer):
        raise TypeError(f"{quant_cls.__name__} must derive from QuantLayer")
    QUANT_LAYER_TYPES[float_cls] = quant_cls


def _clone_module_as(module: nn.Module, cls: Type[nn.Module]) -> nn.Module:
    """A new ``cls`` instance sharing ``module``'s parameters, buffers and children."""
    new = cls.__new__(cls)
    new.__dict__ = module.__dict__.copy()
    for attr in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
        new.__dict__[attr] = type(module.__dict__[attr])(module.__dict__[attr])
    return new


def wrap_layer(module: nn.Module, weight_quantizer: FakeQuantizer,
               input_quantizer: Optional[FakeQuantizer], *, initialize: bool = True,
               quant_cls: Optional[Type[nn.Module]] = None) -> nn.Module:
    """Quantized version of a supported float layer (exact type match, not subclasses).

    Args:
        initialize: initialize the weight quantizer from the float weight now (and freeze the
            weight of weight-replacing methods). ``False`` for a skeleton whose weights are not
            loaded yet (meta tensors): the caller initializes after loading.
        quant_cls: the quantized class to use (a ``QuantLayer`` subclass of ``type(module)``) for a
            host-library layer that ``quantize_`` itself should not learn (GPT-2's ``Conv1D``);
            ``None``: from :data:`QUANT_LAYER_TYPES`.
    """
    qcls = quant_cls if quant_cls is not None else QUANT_LAYER_TYPES.get(type(module))
    if quant_cls is not None and not (issubclass(quant_cls, QuantLayer) and issubclass(quant_cls, type(module))):
        raise TypeError(f"quant_cls={quant_cls.__name__} must derive from QuantLayer and {type(module).__name__}")
    if qcls is None:
        raise TypeError(
            f"cannot quantize {type(module).__name__}; supported layers: "
            f"{', '.join(t.__name__ for t in QUANT_LAYER_TYPES)} (exclude it or add an adapter)"
        )
    new = _clone_module_as(module, qcls)
    new._float_cls = type(module)  # type: ignore[attr-defined]
    new._in_shape = None  # type: ignore[attr-defined]
    new._out_shape = None  # type: ignore[attr-defined]
    new.weight_quantizer = weight_quantizer
    new.input_quantizer = input_quantizer
    if not initialize:
        return new
    with torch.no_grad():
        weight_quantizer(new.weight_to_quantize())  # initialize from the float weight now
    if weight_quantizer.replaces_weight:
        new.weight.requires_grad_(False)  # the quantizer's own parameters carry the weight
    return new


def to_float(layer: nn.Module) -> nn.Module:
    """The float layer back, with the weight the quantizer currently represents for
    weight-replacing methods (CSQ), else the original float weight."""
    if not isinstance(layer, QuantLayer):
        return layer
    wq = layer.weight_quantizer
    new = _clone_module_as(layer, layer._float_cls)
    for attr in ("weight_quantizer", "input_quantizer"):
        new._modules.pop(attr, None)
    for attr in ("_float_cls", "_in_shape", "_out_shape"):
        new.__dict__.pop(attr, None)
    if wq.replaces_weight:
        new.weight = nn.Parameter(wq.float_weight().detach().clone())
    return new


def quant_layers(model: nn.Module) -> Iterator[Tuple[str, QuantLayer]]:
    """``(name, layer)`` for every quantized layer of ``model``, in module order."""
    for name, m in model.named_modules():
        if isinstance(m, QuantLayer):
            yield name, m
