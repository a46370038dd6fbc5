"""Integer parameters of one quantized layer: weight codes, activation quantizer, bias.

Reads the layer only through ``freeze() -> QuantState``, ``weight_to_quantize()`` and
``folded_bias()`` (fused Conv-BN), and normalizes the method-specific encodings:

* SDQ 1-bit layers (codes {0, 1}, zero point 0.5, scale ``2s``) become bipolar codes {-1, +1}
  at scale ``s``: ``(c - 0.5) * 2s == (2c - 1) * s`` exactly;
* learned-range states clip codes at their learned level ``extra["code_min"/"code_max"]``
  and round with ``extra["rounding"]``;
* every other state clips at its ``bits`` range and rounds with the quantizer's ``rounding``
  option (``half_even`` when it has none).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np
import torch

from mpq_plugin.core.state import QuantState
from mpq_plugin.nn.layers import QuantLayer


@dataclass
class ActQuant:
    """An activation quantizer as the integer path needs it (zero point 0)."""

    bits: int
    signed: bool
    scale: float
    code_min: int
    code_max: int
    rounding: str
    method: str

    def manifest(self) -> Dict[str, Any]:
        from mpq_plugin.export.intmath import pow2_exponent_of

        return dict(bits=self.bits, signed=self.signed, scale=self.scale,
                    scale_pow2_exponent=pow2_exponent_of(self.scale), zero_point=0,
                    code_min=self.code_min, code_max=self.code_max, rounding=self.rounding, method=self.method)


@dataclass
class WeightQuant:
    codes: np.ndarray  # int64, layer weight shape
    scale: np.ndarray  # float64, shape (C_out,) (per tensor: repeated)
    per_channel: bool
    bits: int
    signed: bool
    encoding: str  # "int" | "bipolar"
    method: str


def _rounding(quantizer: Any, state: QuantState) -> str:
    r = state.extra.get("rounding") or getattr(getattr(quantizer, "options", None), "rounding", None)
    return r or "half_even"


def check_frozen(name: str, layer: QuantLayer) -> None:
    for q in (layer.weight_quantizer, layer.input_quantizer):
        if q is not None and not bool(getattr(q, "bits_fixed", torch.tensor(True))):
            raise ValueError(f"layer {name} is not frozen: its bit-width may still change; call "
                             "mpq_plugin.freeze(model) (after training) before exporting")


def act_quant(name: str, layer: QuantLayer) -> Optional[ActQuant]:
    """The layer's input quantizer in integer form, or ``None`` when its input is float."""
    q = layer.input_quantizer
    if q is None:
        return None
    st = q.freeze()
    if st.extra.get("format") == "pow2":
        raise ValueError(f"layer {name}: power-of-two-valued (non-uniform) activation codes have no "
                         "integer requantization path; use a uniform parametrization (U1-U3) for activations")
    if st.scale.numel() != 1:
        raise ValueError(f"layer {name}: per-channel activation scales are not supported by the export")
    if float(st.zero_point.float().abs().max()) != 0:
        raise ValueError(f"layer {name}: activation zero point {st.zero_point.tolist()} != 0; "
                         "the integer path needs symmetric (zero-point 0) activations")
    lo = int(st.extra.get("code_min", st.qmin))
    hi = int(st.extra.get("code_max", st.qmax))
    return ActQuant(bits=int(st.bits), signed=bool(st.signed), scale=float(st.scale.reshape(())),
                    code_min=lo, code_max=hi, rounding=_rounding(q, st), method=st.method or q.method)


def weight_quant(name: str, layer: QuantLayer) -> WeightQuant:
    """Weight codes at the learned bits (BN folded for fused Conv-BN layers)."""
    if getattr(layer, "folds_bn", True) is False:
        raise ValueError(f"layer {name}: its weight quantizer ({layer.weight_quantizer.method}) replaces the "
                         "weight, so BN stays unfolded and folding at export would re-quantize the weight "
                         "(not bit-exact); fuse without BN or use a method that folds BN during QAT")
    with torch.no_grad():
        st = layer.weight_quantizer.freeze(layer.weight_to_quantize().detach())
    if st.codes is None:
        raise ValueError(f"layer {name}: the weight quantizer returned no codes")
    codes = st.codes.detach().cpu().to(torch.int64).numpy()
    c_out = codes.shape[0]
    scale = st.scale.detach().cpu().double().reshape(-1).numpy()
    zp = st.zero_point.detach().cpu().double().reshape(-1).numpy()
    encoding, bits, signed = "int", int(st.bits), bool(st.signed)
    if st.bits == 1 and np.all(zp == 0.5):  # SDQ binary: (c - 0.5) * 2s == (2c - 1) * s
        codes, scale, zp = 2 * codes - 1, scale / 2, np.zeros_like(zp)
        encoding, signed = "bipolar", True
    if np.any(zp != 0):
        raise ValueError(f"layer {name}: weight zero point {zp.tolist()} != 0; FPGA flows need symmetric weights")
    per_channel = scale.size > 1
    if st.axis not in (None, 0):
        raise ValueError(f"layer {name}: weight scales along axis {st.axis}; only output channels (axis 0) export")
    full = scale if per_channel else np.full(c_out, float(scale[0]))
    return WeightQuant(codes=codes, scale=full, per_channel=per_channel, bits=bits, signed=signed,
                       encoding=encoding, method=st.method or layer.weight_quantizer.method)


def float_bias(layer: QuantLayer) -> np.ndarray:
    """The float bias the eval forward adds: BN-folded for fused Conv-BN, zeros when absent."""
    with torch.no_grad():
        if hasattr(layer, "folded_bias") and hasattr(layer, "bn"):
            b = layer.folded_bias()  # type: ignore[attr-defined]
        elif layer.bias is not None:  # type: ignore[attr-defined]
            b = layer.bias  # type: ignore[attr-defined]
        else:
            return np.zeros(layer.weight.shape[0], dtype=np.float32)  # type: ignore[attr-defined]
    return b.detach().cpu().to(torch.float32).numpy()
