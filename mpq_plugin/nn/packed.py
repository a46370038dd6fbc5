"""Packed mixed-precision inference layers: frozen weights stored at their learned bit-width.

``PackedLinear.from_quant_layer(layer)`` turns a frozen :class:`QuantLinear` into a layer that
keeps only the integer weight codes, packed ``32 // bits`` per int32 word (layout in
:mod:`mpq_plugin.kernels.packed_ref`), plus per-channel (or per-tensor) scales, zero points and
the bias. Its dequantized weight equals the fake-quant weight bit for bit, and its output equals
the frozen fake-quant layer's output (bit-exact on the reference path, to float tolerance on the
fused Triton path). The input-activation quantizer is kept as a module (a copy), so activations
are fake-quantized exactly as in training.

With ``int_activations=True`` (input quantizer per tensor, at most 8 bits, integer zero points)
the layer computes ``(x_codes - zx) @ (w_codes - zw)^T`` with exact integer accumulation (checked
to fit int32) and rescales by ``s_x * s_w``: the arithmetic of an int8 x intN GEMM; it matches the
fake-quant output to float tolerance.

``convert_to_packed_(model)`` swaps every frozen quantized Linear (and plain quantized Conv2d,
weight-only: unpacked before ``conv2d``) and reports the weight memory saved.

Example:
    >>> import torch, mpq_plugin
    >>> from mpq_plugin.nn.packed import convert_to_packed_
    >>> m = torch.nn.Sequential(torch.nn.Linear(16, 8))
    >>> _ = mpq_plugin.quantize_(m, mpq_plugin.MPQConfig(method="lsq", weight_bits=4, act_bits=None))
    >>> _ = mpq_plugin.freeze(m)
    >>> report = convert_to_packed_(m)
    >>> report["packed_bytes"] < report["float_bytes"]
    True
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mpq_plugin.core.state import QuantState
from mpq_plugin.kernels import packed_dispatch, packed_ref
from mpq_plugin.nn.fake_quantizer import FakeQuantizer
from mpq_plugin.nn.layers import QuantConv2d, QuantLayer, QuantLinear, quant_layers

log = logging.getLogger(__name__)


def _frozen_weight_state(layer: QuantLayer, name: str) -> QuantState:
    """The weight's QuantState, after checking the layer is frozen and its bits are packable."""
    label = name or type(layer).__name__
    wq = layer.weight_quantizer
    aq = layer.input_quantizer
    if not bool(wq.bits_fixed) or (aq is not None and not bool(aq.bits_fixed)):
        raise ValueError(f"layer {label} is not frozen; call mpq_plugin.freeze(model) before packing it")
    with torch.no_grad():
        state = wq.freeze(layer.weight_to_quantize())
    if state.codes is None:
        raise ValueError(f"layer {label}: its weight quantizer returned no integer codes; it cannot be packed")
    if not 1 <= state.bits <= packed_ref.MAX_BITS:
        raise ValueError(f"layer {label} has {state.bits}-bit weights; packed layers support 1..{packed_ref.MAX_BITS} "
                         f"bits (lower max_bits, or convert with skip_unsupported=True to keep it unpacked)")
    if state.axis not in (None, 0):
        raise ValueError(f"layer {label}: per-channel scales along axis {state.axis}; only output channels (0) pack")
    state.check()
    return state


class _PackedWeight(nn.Module):
    """Buffers shared by the packed layers: codes, scale, zero point, with a bit-exact unpack."""

    def _init_packed(self, rows: int, k: int, bits: int, qmin: int, per_channel: bool) -> None:
        packed_ref.codes_per_word(bits)  # validates bits
        self.bits, self.qmin, self.k = int(bits), int(qmin), int(k)
        shape = (rows,) if per_channel else ()
        self.register_buffer("packed", torch.zeros(rows, packed_ref.packed_words(k, bits), dtype=torch.int32))
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape))
        self.register_buffer("layout", torch.tensor([bits, qmin, k], dtype=torch.int64))

    def _set_weight(self, state: QuantState, codes_2d: torch.Tensor) -> None:
        with torch.no_grad():
            self.packed.copy_(packed_ref.pack_rows(codes_2d, self.bits, self.qmin))
            self.scale.copy_(state.scale.reshape(self.scale.shape))
            self.zero_point.copy_(state.zero_point.to(torch.float32).reshape(self.zero_point.shape))

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        layout = state_dict.get(prefix + "layout")
        if layout is not None and not torch.equal(layout.cpu(), self.layout.cpu()):
            raise ValueError(f"packed layout (bits, qmin, in) {layout.tolist()} does not match this layer's "
                             f"{self.layout.tolist()}; build the layer with the same bits before loading")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def dequantized_weight_2d(self) -> torch.Tensor:
        """Float32 ``(rows, k)`` weight, bit-exact with the frozen fake-quant weight."""
        return packed_ref.dequantize_packed(self.packed, self.bits, self.k, self.qmin, self.zero_point, self.scale)

    def packed_bytes(self) -> int:
        """Bytes of the packed weight plus its scales and zero points (bias not counted)."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.zero_point))


class PackedLinear(_PackedWeight):
    """Inference-only Linear with packed low-bit weights (see the module docstring).

    Args:
        in_features, out_features: as ``nn.Linear``.
        bits: weight bit-width (1..8); ``qmin``: the smallest code (``-2^(bits-1)`` signed, 0 unsigned).
        per_channel: one scale/zero point per output row, else one for the tensor.
        bias: whether the layer has a bias.
        input_quantizer: a frozen activation quantizer applied to the input (``None``: float input).
        int_activations: run the integer path (needs ``input_quantizer``).
    """

    def __init__(self, in_features: int, out_features: int, bits: int, qmin: int, per_channel: bool = True,
                 bias: bool = True, input_quantizer: Optional[FakeQuantizer] = None,
                 int_activations: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_packed(out_features, in_features, bits, qmin, per_channel)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.input_quantizer = input_quantizer
        if int_activations:
            _check_int_path(input_quantizer)
        self.int_activations = int_activations

    @classmethod
    def from_quant_layer(cls, layer: QuantLinear, int_activations: bool = False, name: str = "") -> "PackedLinear":
        """Pack a frozen :class:`QuantLinear` (``mpq_plugin.freeze`` must have run).

        Raises:
            ValueError: the layer is not frozen, its weight bits are outside 1..8, or
                ``int_activations`` is asked for a layer whose input quantizer does not allow it.
        """
        if not isinstance(layer, QuantLinear):
            raise TypeError(f"from_quant_layer wants a QuantLinear, got {type(layer).__name__}")
        state = _frozen_weight_state(layer, name)
        zw = state.zero_point.to(torch.float64)
        if int_activations and not torch.equal(zw, zw.round()):
            raise ValueError(f"layer {name or 'Linear'}: int_activations needs integer weight zero points "
                             "(SDQ's 1-bit weights are ±s/2 with zero point 0.5); use the weight-only path")
        aq = copy.deepcopy(layer.input_quantizer).eval() if layer.input_quantizer is not None else None
        new = cls(layer.in_features, layer.out_features, state.bits, state.qmin, state.axis == 0,
                  layer.bias is not None, aq, int_activations)
        new._set_weight(state, state.codes)
        if layer.bias is not None:
            new.bias.data.copy_(layer.bias.detach())
        new.to(layer.weight.device)
        if not torch.equal(new.dequantized_weight_2d(), state.dequantize().to(new.scale.device)):
            raise RuntimeError(f"layer {name or 'Linear'}: packed weight does not reproduce the frozen weight")
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int_activations:
            st = self.input_quantizer.freeze()  # type: ignore[union-attr]
            codes = st.quantize(x)
            return packed_ref.int_linear(codes, int(st.zero_point), st.scale, self.packed, self.bits, self.k,
                                         self.qmin, self.zero_point, self.scale, self.bias).to(x.dtype)
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return packed_dispatch.packed_linear(x, self.packed, self.bits, self.k, self.qmin,
                                             self.zero_point, self.scale, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"per_channel={self.scale.dim() == 1}, int_activations={self.int_activations}")


class PackedConv2d(_PackedWeight):
    """Inference-only Conv2d, weight-only: the packed ``(out, in/groups*kh*kw)`` weight is unpacked
    before a float ``conv2d`` (memory saving, no fused kernel). Built by :meth:`from_quant_layer`."""

    def __init__(self, conv: nn.Conv2d, bits: int, qmin: int, per_channel: bool,
                 input_quantizer: Optional[FakeQuantizer] = None) -> None:
        super().__init__()
        self.weight_shape: Tuple[int, ...] = tuple(conv.weight.shape)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        if conv.padding_mode != "zeros":
            raise ValueError(f"PackedConv2d supports padding_mode='zeros', got {conv.padding_mode!r}")
        rows = self.weight_shape[0]
        self._init_packed(rows, conv.weight[0].numel(), bits, qmin, per_channel)
        self.bias = nn.Parameter(torch.zeros(rows), requires_grad=False) if conv.bias is not None else None
        self.input_quantizer = input_quantizer

    @classmethod
    def from_quant_layer(cls, layer: QuantConv2d, name: str = "") -> "PackedConv2d":
        """Pack a frozen plain :class:`QuantConv2d` (fused Conv-BN layers are not packed)."""
        if type(layer) is not QuantConv2d:
            raise TypeError(f"PackedConv2d packs plain QuantConv2d layers, got {type(layer).__name__}")
        state = _frozen_weight_state(layer, name)
        aq = copy.deepcopy(layer.input_quantizer).eval() if layer.input_quantizer is not None else None
        new = cls(layer, state.bits, state.qmin, state.axis == 0, aq)
        new._set_weight(state, state.codes.reshape(state.codes.shape[0], -1))
        if layer.bias is not None:
            new.bias.data.copy_(layer.bias.detach())
        new.to(layer.weight.device)
        if not torch.equal(new.dequantized_weight_2d().reshape(new.weight_shape), state.dequantize()):
            raise RuntimeError(f"layer {name or 'Conv2d'}: packed weight does not reproduce the frozen weight")
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        w = self.dequantized_weight_2d().reshape(self.weight_shape).to(x.dtype)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _check_int_path(aq: Optional[FakeQuantizer]) -> None:
    """Raise ``ValueError`` unless ``aq`` allows the integer activation path."""
    if aq is None:
        raise ValueError("int_activations needs a quantized input (set act_bits in the config)")
    st = aq.freeze()
    zp = st.zero_point.to(torch.float64)
    if st.axis is not None or st.scale.numel() != 1:
        raise ValueError("int_activations needs a per-tensor activation scale")
    if st.bits > 8:
        raise ValueError(f"int_activations needs activations of at most 8 bits, this layer has {st.bits}")
    if not torch.equal(zp, zp.round()):
        raise ValueError("int_activations needs an integer activation zero point")


def convert_to_packed_(model: nn.Module, int_activations: bool = False, conv: bool = True,
                       skip_unsupported: bool = False) -> Dict[str, Any]:
    """Swap every frozen quantized Linear (and plain quantized Conv2d with ``conv``) for a packed one.

    Args:
        model: a model after ``mpq_plugin.quantize_`` and ``mpq_plugin.freeze`` (modified in place).
        int_activations: use the integer activation path where a layer allows it (per-tensor input
            quantizer of at most 8 bits); other layers stay weight-only and are listed in the report.
        conv: also pack plain ``QuantConv2d`` layers (weight-only unpack).
        skip_unsupported: keep layers with unpackable bits (> 8) unpacked instead of raising.

    Returns:
        ``{"layers": {name: {"bits", "float_bytes", "packed_bytes", "int_path"}}, "float_bytes",
        "packed_bytes", "saved_bytes", "skipped": [names]}``; bytes count the weight only
        (float32 weight vs packed words + scales + zero points).

    Raises:
        ValueError: a layer is not frozen, or has unsupported bits (unless ``skip_unsupported``).
    """
    layers: Dict[str, Dict[str, Any]] = {}
    skipped: List[str] = []
    for name, layer in list(quant_layers(model)):
        is_linear, is_conv = type(layer) is QuantLinear, conv and type(layer) is QuantConv2d
        if not (is_linear or is_conv):
            continue
        try:
            if is_linear:
                use_int = int_activations
                try:
                    new: _PackedWeight = PackedLinear.from_quant_layer(layer, use_int, name)
                except ValueError as e:
                    if not (use_int and "int_activations" in str(e)):
                        raise
                    log.info("layer %s stays weight-only: %s", name, e)
                    use_int = False
                    new = PackedLinear.from_quant_layer(layer, False, name)
            else:
                use_int = False
                new = PackedConv2d.from_quant_layer(layer, name)
        except ValueError as e:
            if skip_unsupported and "is not frozen" not in str(e):
                log.warning("keeping %s unpacked: %s", name, e)
                skipped.append(name)
                continue
            raise
        model.set_submodule(name, new)
        layers[name] = {"bits": new.bits, "float_bytes": layer.weight.numel() * 4,
                        "packed_bytes": new.packed_bytes(), "int_path": use_int}
    fb = sum(v["float_bytes"] for v in layers.values())
    pb = sum(v["packed_bytes"] for v in layers.values())
    log.info("convert_to_packed_: %d layers packed, weights %.1f KiB -> %.1f KiB (%.1f KiB saved)",
             len(layers), fb / 1024, pb / 1024, (fb - pb) / 1024)
    return {"layers": layers, "float_bytes": fb, "packed_bytes": pb, "saved_bytes": fb - pb, "skipped": skipped}
