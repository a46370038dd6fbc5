"""Plan the integer computation of a frozen model: the in-memory form of an integer bundle.

Walks the op chain (:mod:`mpq_plugin.export.graph`) and tracks, for the tensor between ops,
its *domain*: integers ``N`` whose real value is ``N * unit[c]`` per channel ``c``.

* A quantized layer takes activation codes ``x`` (scale ``s_x``, zero point 0), integer weight
  codes ``w`` (scale ``s_w[c]``) and computes ``N = sum(x * w) * 2^f + b`` in int64, with the
  bias ``b = round_half_even(bias / (s_x s_w[c] 2^-f))`` (``f = bias_frac_bits``) so
  ``unit[c] = s_x s_w[c] 2^-f``.
* ReLU / max pooling act on ``N`` directly; average pooling sums its window (the divisor ``D``
  joins the unit: ``unit / D``); flatten repeats each channel's unit over its ``H*W`` features.
* The next layer's input quantizer requantizes: ``code = clamp(round(N * m >> k), lo, hi)`` with
  the dyadic multiplier ``m 2^-k ~= unit / s_next`` (exact, ``m = ±1``, when the ratio is a power
  of two) and the quantizer's own tie rule.

Widths are derived from the actual codes (worst case over all inputs in the code ranges), so
they are guarantees, not estimates.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
from torch import nn

from mpq_plugin.export.graph import ExportOp, trace_chain
from mpq_plugin.export.intmath import dyadic, dyadic_value, pow2_exponent_of, signed_bits_for
from mpq_plugin.export.layer_params import ActQuant, act_quant, check_frozen, float_bias, weight_quant

FORMAT = "mpq_integer_bundle"
VERSION = 1


@dataclass
class Bundle:
    """Manifest (JSON-able dicts) plus named int64 arrays, before or after writing to disk."""

    manifest: Dict[str, Any]
    layers: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    arrays: Dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class _Domain:
    unit: np.ndarray  # float64 per channel: real value of one integer step
    lo: int
    hi: int
    repeat: int = 1  # features per channel along axis 1 (after flatten)
    source: str = ""
    shape: Tuple[int, ...] = ()  # per-sample shape (C, H, W) or (F,)


def _requant(name: str, dom: _Domain, aq: ActQuant, n_features: int,
             mult_bits: int) -> Tuple[Dict[str, Any], np.ndarray, np.ndarray]:
    ratios = dom.unit / aq.scale
    mk = [dyadic(float(r), mult_bits) for r in ratios]
    m = np.array([a for a, _ in mk], dtype=np.int64)
    k = np.array([b for _, b in mk], dtype=np.int64)
    approx = np.array([dyadic_value(a, b) for a, b in mk])
    rel_err = float(np.max(np.abs(approx - ratios) / np.abs(ratios)))
    exact = bool(np.all(np.abs(m) == 1))
    if dom.repeat > 1:
        m, k = np.repeat(m, dom.repeat), np.repeat(k, dom.repeat)
    if m.size not in (1, n_features):
        raise ValueError(f"layer {name}: {m.size} requantization channels do not match its {n_features} inputs")
    prod_max = max(abs(dom.lo), abs(dom.hi)) * int(np.max(np.abs(m)))
    return dict(source=dom.source, multiplier_file=f"{name}.requant_m", shift_file=f"{name}.requant_k",
                per_feature=bool(m.size > 1 and not (np.all(m == m[0]) and np.all(k == k[0]))),
                exact_pow2=exact, max_rel_error=rel_err,
                input_range=[int(dom.lo), int(dom.hi)],
                product_bits=signed_bits_for(-prod_max, prod_max)), m, k


def _quant_layer(op: ExportOp, dom: Optional[_Domain], bundle: Bundle, f: Optional[int], mult_bits: int,
                 auto_f: Any) -> _Domain:
    name, layer = op.name, op.module
    check_frozen(name, layer)
    aq = act_quant(name, layer)
    if aq is None:
        raise ValueError(f"layer {name} has a float input (no input quantizer), so it has no integer path; "
                         "quantize it with act_bits (vision adapter: quantize_first_input=True)")
    wq = weight_quant(name, layer)
    w = wq.codes
    c_out = w.shape[0]
    fan_in = int(np.prod(w.shape[1:]))
    s_acc = aq.scale * wq.scale  # float64, per output channel
    if f is None:
        f = auto_f(float(s_acc.max()))
    unit = s_acc * 2.0 ** (-f)
    bias_f = float_bias(layer).astype(np.float64)
    b = np.round(bias_f / unit).astype(np.int64)  # np.round: half to even
    amax = max(abs(aq.code_min), abs(aq.code_max))
    prod = np.abs(w.reshape(c_out, -1)).sum(axis=1) * amax  # worst case |sum x w| per channel
    nmax = prod * (2**f) + np.abs(b)
    lo_n, hi_n = int(-(nmax.max())), int(nmax.max())
    acc_bits = signed_bits_for(lo_n, hi_n)
    formula = aq.bits + wq.bits + math.ceil(math.log2(max(fan_in, 1)))
    w_scales = wq.scale if wq.per_channel else wq.scale[:1]
    info: Dict[str, Any] = dict(
        name=name, op=op.kind, attrs={k: list(v) if isinstance(v, tuple) else v for k, v in op.attrs.items()},
        weight=dict(file=f"{name}.weight", shape=list(w.shape), bits=wq.bits, signed=wq.signed,
                    encoding=wq.encoding, narrow=bool(int(w.min(initial=0)) > -(2 ** (wq.bits - 1))),
                    code_min=int(w.min()), code_max=int(w.max()), zero_point=0, method=wq.method,
                    per_channel=wq.per_channel,
                    scale=[float(s) for s in w_scales],
                    scale_pow2_exponent=[pow2_exponent_of(float(s)) for s in w_scales]),
        input=aq.manifest(),
        bias=dict(file=f"{name}.bias", frac_bits=f,
                  bits=signed_bits_for(int(b.min(initial=0)), int(b.max(initial=0))),
                  unit=[float(u) for u in unit],
                  max_abs_rounding_error=float(np.max(np.abs(b * unit - bias_f), initial=0.0))),
        accumulator=dict(bits=acc_bits, bits_formula=formula, fan_in=fan_in,
                         bound=[lo_n, hi_n], note="bits covers sum(x*w)*2^frac_bits + bias for every input "
                         "in the input code range (derived from the actual weight codes)"),
        output=dict(unit=[float(u) for u in unit], channels=c_out),
    )
    bundle.arrays[f"{name}.weight"] = w
    bundle.arrays[f"{name}.bias"] = b
    if dom is None:
        info["input"]["requant"] = None  # float network input: quantize with the input quantizer
    else:
        n_features = w.shape[1] * (op.attrs.get("groups", 1) if op.kind == "quant_conv2d" else 1)
        req, m, k = _requant(name, dom, aq, n_features, mult_bits)
        req["rounding"] = aq.rounding
        info["input"]["requant"] = req
        bundle.arrays[f"{name}.requant_m"] = m
        bundle.arrays[f"{name}.requant_k"] = k
    bundle.layers[name] = info
    shape = getattr(layer, "_out_shape", None)
    if shape is None:
        raise ValueError(f"layer {name} has not run yet, so its output shape is unknown; run one forward "
                         "pass (quantize_(..., example_inputs=...)) before exporting")
    info["output"]["shape"] = list(shape)
    return _Domain(unit=unit, lo=lo_n, hi=hi_n, source=name, shape=tuple(shape))


#: ``bias_frac_bits="auto"``: bias error at most 2^-AUTO_MARGIN of the next activation step
AUTO_MARGIN = 16
#: ``"auto"`` for the last layer (no next quantizer): bias error <= 2^-(f+1) output units
AUTO_LAST = 8


def _auto_frac_bits(ops: List[ExportOp], i: int, unit0: float) -> int:
    """Fraction bits of layer ``ops[i]``'s bias so that its rounding error (``unit0 2^-(f+1)``)
    stays below ``2^-AUTO_MARGIN`` of the step of the next input quantizer (pool divisors
    included): the integer result then differs from the exact one by far less than a code."""
    div, resized = 1, False  # pool divisors so far; whether a pool changed H, W
    for op in ops[i + 1:]:
        if op.kind.startswith("quant_"):
            q = op.module.input_quantizer
            if q is None:
                break
            s_next = float(q.freeze().scale.reshape(()))
            return int(min(AUTO_MARGIN, max(0, math.ceil(math.log2(unit0 / (div * s_next))) + AUTO_MARGIN)))
        if op.kind == "global_avgpool":
            shape = getattr(ops[i].module, "_out_shape", None)
            if shape is None or len(shape) != 3 or resized:
                return AUTO_LAST
            div *= shape[1] * shape[2]
        elif op.kind in ("avgpool2d", "maxpool2d"):
            resized = True
            if op.kind == "avgpool2d":
                div *= op.attrs["kernel"][0] * op.attrs["kernel"][1]
    return AUTO_LAST


def plan(model: nn.Module, bias_frac_bits: Union[int, str] = "auto", mult_bits: int = 24,
         pow2_tolerance: float = 0.0, max_bits: int = 16) -> Bundle:
    """Build the :class:`Bundle` of a frozen, quantized model (eval semantics).

    ``bias_frac_bits``: an int for every layer, or ``"auto"`` (per layer, see
    :func:`_auto_frac_bits`).
    """
    if bias_frac_bits != "auto" and (not isinstance(bias_frac_bits, int) or bias_frac_bits < 0):
        raise ValueError(f"bias_frac_bits={bias_frac_bits!r}; use an integer >= 0 or 'auto'")
    was_training = model.training
    model.eval()
    try:
        ops = trace_chain(model)
        bundle = Bundle(manifest={})
        graph: List[Dict[str, Any]] = []
        dom: Optional[_Domain] = None
        seen_quant = False
        for i, op in enumerate(ops):
            entry: Dict[str, Any] = {"op": op.kind, "name": op.name}
            if op.kind.startswith("quant_"):
                f = bias_frac_bits if isinstance(bias_frac_bits, int) else None
                dom = _quant_layer(op, dom, bundle, f, mult_bits,
                                   lambda unit0, i=i: _auto_frac_bits(ops, i, unit0))
                seen_quant = True
                li = bundle.layers[op.name]
                for what in ("weight", "input"):
                    if li[what]["bits"] > max_bits:
                        raise ValueError(f"layer {op.name}: {what} has {li[what]['bits']} bits, above the bundle "
                                         f"maximum max_bits={max_bits}; raise max_bits or lower the layer's bits")
                entry["layer"] = f"layers/{op.name}.json"
            elif not seen_quant:
                if op.kind != "flatten":
                    raise ValueError(f"{op.name} ({op.kind}) runs before the first quantized layer on float "
                                     "values; the integer path starts at the first layer's input quantizer")
                entry["on"] = "float input"
            else:
                assert dom is not None
                entry.update({k: list(v) if isinstance(v, tuple) else v for k, v in op.attrs.items()})
                dom = _step(op, dom, entry)
            graph.append(entry)
        assert dom is not None
        bundle.manifest = dict(
            format=FORMAT, version=VERSION, graph=graph,
            input=dict(layout="NCHW" if ops and any(o.kind == "quant_conv2d" for o in ops) else "NC",
                       quantizer_of=next(o.name for o in ops if o.kind.startswith("quant_"))),
            output=dict(source=dom.source, unit_file="output.unit", range=[int(dom.lo), int(dom.hi)],
                        note="integer logits N; real value = N * unit[channel] (float64)"),
            options=dict(bias_frac_bits=bias_frac_bits, mult_bits=mult_bits, pow2_tolerance=pow2_tolerance,
                         max_bits=max_bits),
        )
        # float64: the one non-integer array, for reporting real-valued logits
        bundle.arrays["output.unit"] = np.repeat(dom.unit, max(dom.repeat, 1))
        return bundle
    finally:
        model.train(was_training)


def _pool_out(n: int, k: int, st: int, pad: int) -> int:
    return (n + 2 * pad - k) // st + 1


def _step(op: ExportOp, dom: _Domain, entry: Dict[str, Any]) -> _Domain:
    """Domain after a non-quantized op (ReLU, pooling, flatten) on accumulator integers."""
    a = op.attrs
    if op.kind == "relu":
        return _Domain(dom.unit, max(dom.lo, 0), max(dom.hi, 0), dom.repeat, dom.source, dom.shape)
    if len(dom.shape) != 3 and op.kind != "flatten":
        raise ValueError(f"{op.name}: {op.kind} needs a (C, H, W) input, got per-sample shape {dom.shape}")
    if op.kind == "maxpool2d":  # padding is -inf in PyTorch: the range is unchanged
        c, h, w = dom.shape
        shape = (c, _pool_out(h, a["kernel"][0], a["stride"][0], a["padding"][0]),
                 _pool_out(w, a["kernel"][1], a["stride"][1], a["padding"][1]))
        return _Domain(dom.unit, dom.lo, dom.hi, dom.repeat, dom.source, shape)
    if op.kind in ("avgpool2d", "global_avgpool"):
        c, h, w = dom.shape
        if op.kind == "global_avgpool":
            win, shape = h * w, (c, 1, 1)
        else:
            win = a["kernel"][0] * a["kernel"][1]
            shape = (c, _pool_out(h, a["kernel"][0], a["stride"][0], 0),
                     _pool_out(w, a["kernel"][1], a["stride"][1], 0))
        lo, hi = dom.lo * win, dom.hi * win
        entry.update(divisor=win, divisor_pow2=pow2_exponent_of(float(win)) is not None,
                     sum_bits=signed_bits_for(min(lo, 0), max(hi, 0)),
                     note="integer window sum; the divisor joins the next requantization multiplier")
        return _Domain(dom.unit / win, lo, hi, dom.repeat, dom.source, shape)
    if op.kind == "flatten":
        entry["note"] = "channel-major (NCHW) flatten"
        if len(dom.shape) == 3:
            c, h, w = dom.shape
            return _Domain(dom.unit, dom.lo, dom.hi, h * w, dom.source, (c * h * w,))
        return dom
    raise ValueError(f"{op.name}: no integer step for {op.kind}")
