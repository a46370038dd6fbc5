"""Modules: the FakeQuantizer base, quantized layers and per-layer name matching."""
from mpq_plugin.nn.fake_quantizer import FakeQuantizer, QuantizerSpec
from mpq_plugin.nn.layers import (
    QUANT_LAYER_TYPES,
    QuantConv1d,
    QuantConv2d,
    QuantEmbedding,
    QuantLayer,
    QuantLinear,
    quant_layers,
    register_quant_layer,
    to_float,
    wrap_layer,
)
from mpq_plugin.nn.matching import resolve_layer
from mpq_plugin.nn.packed import PackedConv2d, PackedLinear, convert_to_packed_

__all__ = [
    "FakeQuantizer",
    "PackedConv2d",
    "PackedLinear",
    "QUANT_LAYER_TYPES",
    "QuantConv1d",
    "QuantConv2d",
    "QuantEmbedding",
    "QuantLayer",
    "QuantLinear",
    "QuantizerSpec",
    "convert_to_packed_",
    "quant_layers",
    "register_quant_layer",
    "resolve_layer",
    "to_float",
    "wrap_layer",
]
