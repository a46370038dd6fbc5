"""Integer reference executor: runs an integer bundle with numpy int64 arithmetic only.

The one float step is the entry: the network input is quantized with the first layer's input
quantizer (float32 ``x / s``, then the quantizer's tie rule and clamp), exactly as the PyTorch
fake-quant model does; :meth:`IntegerExecutor.run_codes` skips it for integer inputs. After that
every value is an int64 integer: convolutions and matrix products accumulate in int64, biases
add in accumulator units, ReLU/max-pool compare integers, average pooling sums its window and
requantization is ``clamp(round((N * m) / 2^k), lo, hi)`` with an integer rounding shift.

Every declared width is checked on every run (accumulator, pooling sums, requantization
products, activation codes); a value outside raises :class:`WidthOverflowError` naming the layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict

import numpy as np

from mpq_plugin.export.intmath import round_shift
from mpq_plugin.export.plan import Bundle
from mpq_plugin.export.thresholds import apply_thresholds


_TOKEN_WISE = ("quant_linear", "relu")


class WidthOverflowError(OverflowError):
    """A value left the width the bundle declares for it (names the layer)."""


@dataclass
class Trace:
    """Result of one run: integer logits, their float value, and every layer's input codes."""

    output: np.ndarray  # int64
    output_float: np.ndarray  # float64: output * unit
    codes: Dict[str, np.ndarray] = field(default_factory=dict)
    accumulators: Dict[str, np.ndarray] = field(default_factory=dict)
    #: per layer: ``N * m / 2^k`` before rounding, as float64 (diagnostics: distance to a tie)
    requant_values: Dict[str, np.ndarray] = field(default_factory=dict)


def _check(name: str, what: str, v: np.ndarray, bits: int, signed: bool = True) -> None:
    if v.size == 0:
        return
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    vmin, vmax = int(v.min()), int(v.max())
    if vmin < lo or vmax > hi:
        raise WidthOverflowError(f"layer {name}: {what} spans [{vmin}, {vmax}], outside its declared "
                                 f"{bits}-bit {'signed' if signed else 'unsigned'} range [{lo}, {hi}]")


def conv2d_int(x: np.ndarray, w: np.ndarray, stride, padding, dilation, groups: int) -> np.ndarray:
    """Exact integer 2-D convolution (cross-correlation, as PyTorch), int64 in and out."""
    x = np.pad(x, ((0, 0), (0, 0), (padding[0], padding[0]), (padding[1], padding[1])))
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    eh, ew = dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1
    win = np.lib.stride_tricks.sliding_window_view(x, (eh, ew), axis=(2, 3))
    win = win[:, :, ::stride[0], ::stride[1], ::dilation[0], ::dilation[1]]  # (n, c, oh, ow, kh, kw)
    og = o // groups
    outs = []
    for g in range(groups):
        xs = win[:, g * cg:(g + 1) * cg]
        ws = w[g * og:(g + 1) * og]
        outs.append(np.einsum("ncyxij,ocij->noyx", xs, ws, optimize=True))
    return np.concatenate(outs, axis=1).astype(np.int64)


def _round_float(v: np.ndarray, mode: str) -> np.ndarray:
    """Round float32 values exactly (float64 holds every float32 exactly)."""
    v = v.astype(np.float64)
    if mode == "half_even":
        return np.round(v)
    t = np.trunc(v)
    return t + np.sign(v) * (np.abs(v - t) >= 0.5)


class IntegerExecutor:
    """Runs a :class:`~mpq_plugin.export.plan.Bundle` (in memory or loaded from disk)."""

    def __init__(self, bundle: Bundle, use_thresholds: bool = False) -> None:
        """``use_thresholds``: requantize with the bundle's FINN-style thresholds (exported with
        ``thresholds=True``) instead of multiply+shift; both give the same codes."""
        self.bundle = bundle
        self.use_thresholds = use_thresholds
        for name, info in bundle.layers.items():
            if info["accumulator"]["bits"] > 62:
                raise ValueError(f"layer {name}: a {info['accumulator']['bits']}-bit accumulator does not fit the "
                                 "int64 reference executor; lower bias_frac_bits or the layer's bits")

    # -- entry ----------------------------------------------------------------------------
    def quantize_input(self, x: np.ndarray) -> np.ndarray:
        """Codes of the float network input under the first layer's input quantizer."""
        first = self.bundle.layers[self.bundle.manifest["input"]["quantizer_of"]]["input"]
        v = np.asarray(x, dtype=np.float32) / np.float32(first["scale"])
        q = _round_float(v, first["rounding"])
        return np.clip(q, first["code_min"], first["code_max"]).astype(np.int64)

    def run(self, x: np.ndarray) -> Trace:
        """Run on a float input batch (NCHW or NC float32)."""
        return self.run_codes(self.quantize_input(x))

    # -- integer pipeline -------------------------------------------------------------------
    def token_wise(self) -> bool:
        """Every op acts on the last axis only (Linear/ReLU chains: MLP blocks, attention
        projections), so inputs ``(batch, tokens, ..., features)`` run token by token."""
        return all(e["op"] in _TOKEN_WISE for e in self.bundle.manifest["graph"])

    def run_codes(self, codes: np.ndarray) -> Trace:
        """Run on integer input codes. A token-wise graph (:meth:`token_wise`) takes any number
        of leading axes, as ``nn.Linear`` does: they are folded into the batch and restored."""
        v = np.asarray(codes, dtype=np.int64)
        if v.ndim > 2 and self.token_wise():
            lead = v.shape[:-1]
            t = self._run_codes(v.reshape(-1, v.shape[-1]))
            fold = lambda a: a.reshape(*lead, *a.shape[1:])  # noqa: E731
            return Trace(output=fold(t.output), output_float=fold(t.output_float),
                         codes={k: fold(a) for k, a in t.codes.items()},
                         accumulators={k: fold(a) for k, a in t.accumulators.items()},
                         requant_values={k: fold(a) for k, a in t.requant_values.items()})
        return self._run_codes(v)

    def _run_codes(self, v: np.ndarray) -> Trace:
        b, arrays = self.bundle, self.bundle.arrays
        trace_codes: Dict[str, np.ndarray] = {}
        accs: Dict[str, np.ndarray] = {}
        pre: Dict[str, np.ndarray] = {}
        in_codes = True  # v holds activation codes of the next layer (only before the first layer)
        for entry in b.manifest["graph"]:
            kind, name = entry["op"], entry["name"]
            if kind.startswith("quant_"):
                info = b.layers[name]
                inp = info["input"]
                if not in_codes and self.use_thresholds:
                    if "thresholds_file" not in inp["requant"]:
                        raise ValueError(f"layer {name}: the bundle has no thresholds; export with thresholds=True")
                    v = apply_thresholds(v, arrays[inp["requant"]["thresholds_file"]], inp["code_min"])
                elif not in_codes:
                    v, pre[name] = self._requant(name, v, inp, arrays)
                _check(name, "input codes", v, inp["bits"], inp["signed"])
                trace_codes[name] = v
                w = arrays[info["weight"]["file"]].astype(np.int64)
                bias = arrays[info["bias"]["file"]].astype(np.int64)
                f = int(info["bias"]["frac_bits"])
                if kind == "quant_conv2d":
                    a = info["attrs"]
                    acc = conv2d_int(v, w, a["stride"], a["padding"], a["dilation"], a["groups"])
                    n = (acc << np.int64(f)) + bias.reshape(1, -1, 1, 1)
                else:
                    acc = v.reshape(v.shape[0], -1) @ w.T
                    n = (acc << np.int64(f)) + bias.reshape(1, -1)
                _check(name, "accumulator", n, info["accumulator"]["bits"])
                accs[name] = n
                v, in_codes = n, False
            elif kind == "flatten":
                v = v.reshape(v.shape[0], -1)
            elif kind == "relu":
                v = np.maximum(v, 0)
            elif kind == "maxpool2d":
                v = self._maxpool(v, entry)
            elif kind in ("avgpool2d", "global_avgpool"):
                v = v.sum(axis=(2, 3), keepdims=True) if kind == "global_avgpool" else self._sumpool(v, entry)
                _check(name, "pooling sum", v, entry["sum_bits"])
            else:
                raise ValueError(f"{name}: unknown op {kind!r} in the bundle")
        unit = arrays[b.manifest["output"]["unit_file"]].astype(np.float64)
        unit = unit.reshape(1, -1, *([1] * (v.ndim - 2))) if unit.size == v.shape[1] else unit.reshape(1, -1)
        return Trace(output=v, output_float=v * unit, codes=trace_codes, accumulators=accs, requant_values=pre)

    @staticmethod
    def _requant(name: str, n: np.ndarray, inp: Dict[str, Any], arrays: Dict[str, np.ndarray]):
        req = inp["requant"]
        m = arrays[req["multiplier_file"]].astype(np.int64)
        k = arrays[req["shift_file"]].astype(np.int64)
        shape = (1, -1) + (1,) * (n.ndim - 2)
        prod = n * m.reshape(shape)
        _check(name, "requantization product", prod, req["product_bits"])
        if np.all(k == k.flat[0]):
            q = round_shift(prod, int(k.flat[0]), inp["rounding"])
        else:  # per-feature shifts
            q = np.empty_like(prod)
            for i, ki in enumerate(k.tolist()):
                q[:, i] = round_shift(prod[:, i], int(ki), inp["rounding"])
        kk = k.reshape(shape) if k.size > 1 else k.reshape(())
        exact = prod.astype(np.float64) * np.exp2(-kk.astype(np.float64))
        return np.clip(q, inp["code_min"], inp["code_max"]), exact

    @staticmethod
    def _windows(v: np.ndarray, kernel, stride) -> np.ndarray:
        win = np.lib.stride_tricks.sliding_window_view(v, tuple(kernel), axis=(2, 3))
        return win[:, :, ::stride[0], ::stride[1]]

    def _maxpool(self, v: np.ndarray, e: Dict[str, Any]) -> np.ndarray:
        p = e["padding"]
        if p != [0, 0]:
            lo = np.iinfo(np.int64).min
            v = np.pad(v, ((0, 0), (0, 0), (p[0], p[0]), (p[1], p[1])), constant_values=lo)
        return self._windows(v, e["kernel"], e["stride"]).max(axis=(-2, -1))

    def _sumpool(self, v: np.ndarray, e: Dict[str, Any]) -> np.ndarray:
        return self._windows(v, e["kernel"], e["stride"]).sum(axis=(-2, -1), dtype=np.int64)
