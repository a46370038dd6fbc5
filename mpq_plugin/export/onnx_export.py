"""ONNX exports of a frozen quantized model, built node by node with ``onnx.helper``.

* :func:`to_qonnx`: QONNX ``Quant`` nodes (domain ``qonnx.custom_op.general``) at the learned
  bit-widths on every quantized layer's input and weight, as qonnx and hls4ml expect
  (``/work/shared/design/fpga.md``): scale/zeropt/bitwidth initializers, zero-point 0, weights
  ``signed=1``, Conv with all five attributes, Linear as ``Gemm(transB=1)``.
* :func:`to_onnx_qdq`: standard ONNX ``QuantizeLinear -> Clip -> DequantizeLinear`` for
  activations (Clip keeps sub-8-bit ranges, which a bare Q/DQ pair loses) and integer weight
  initializers with ``DequantizeLinear``; runs in onnxruntime.

Both reuse the integer export's graph tracing and layer parameters, so they cover the same
Sequential-style models. The float bias is kept as a float initializer (what PyTorch adds).
``onnx`` is imported only inside these functions.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from mpq_plugin.export.graph import trace_chain
from mpq_plugin.export.layer_params import ActQuant, act_quant, check_frozen, float_bias, weight_quant

QONNX_DOMAIN = "qonnx.custom_op.general"
_QONNX_ROUNDING = {"half_even": "ROUND", "half_away": "HALF_UP"}


class _Builder:
    def __init__(self, fmt: str) -> None:
        from onnx import helper, numpy_helper

        self.h, self.nh, self.fmt = helper, numpy_helper, fmt
        self.nodes: List[Any] = []
        self.inits: List[Any] = []
        self.n = 0

    def name(self, base: str) -> str:
        self.n += 1
        return f"{base.replace('.', '_')}_{self.n}"

    def const(self, base: str, arr: np.ndarray) -> str:
        nm = self.name(base)
        self.inits.append(self.nh.from_array(np.asarray(arr), nm))
        return nm

    def node(self, op: str, inputs: Sequence[str], base: str, domain: str = "", **attrs: Any) -> str:
        out = self.name(base)
        self.nodes.append(self.h.make_node(op, list(inputs), [out], name=self.name(op), domain=domain, **attrs))
        return out

    # -- quantizers ---------------------------------------------------------------------------
    def act(self, x: str, aq: ActQuant, base: str, layer: str) -> str:
        lo_b, hi_b = (-(2 ** (aq.bits - 1)), 2 ** (aq.bits - 1) - 1) if aq.signed else (0, 2**aq.bits - 1)
        narrow = aq.signed and aq.code_min == -(2 ** (aq.bits - 1)) + 1 and aq.code_max == 2 ** (aq.bits - 1) - 1
        if self.fmt == "qonnx":
            y = self.node("Quant", [x, self.const(base + "_scale", np.float32(aq.scale)),
                                    self.const(base + "_zeropt", np.float32(0)),
                                    self.const(base + "_bitwidth", np.float32(aq.bits))], base, domain=QONNX_DOMAIN,
                          signed=int(aq.signed), narrow=int(narrow), rounding_mode=_QONNX_ROUNDING[aq.rounding])
            lo_q = lo_b + 1 if narrow else lo_b
            if (aq.code_min, aq.code_max) != (lo_q, hi_b):  # learned clip level inside the bits range
                y = self.node("Clip", [y, self.const(base + "_lo", np.float32(aq.code_min * aq.scale)),
                                       self.const(base + "_hi", np.float32(aq.code_max * aq.scale))], base + "_clip")
            return y
        if aq.rounding != "half_even":
            raise ValueError(f"layer {layer}: its input quantizer rounds {aq.rounding}, but ONNX QuantizeLinear "
                             "rounds half to even; use to_qonnx (rounding_mode HALF_UP) or a half_even quantizer")
        zdt = _int_dtype(aq.bits, aq.signed)
        zp = self.const(base + "_zp", np.array(0, dtype=zdt))
        sc = self.const(base + "_scale", np.float32(aq.scale))
        q = self.node("QuantizeLinear", [x, sc, zp], base + "_q")
        q = self.node("Clip", [q, self.const(base + "_lo", np.array(aq.code_min, dtype=zdt)),
                               self.const(base + "_hi", np.array(aq.code_max, dtype=zdt))], base + "_clip")
        return self.node("DequantizeLinear", [q, sc, zp], base + "_dq")

    def weight(self, codes: np.ndarray, scale: np.ndarray, per_channel: bool, bits: int, base: str) -> str:
        shape = (-1,) + (1,) * (codes.ndim - 1)
        if self.fmt == "qonnx":
            deq = (codes.astype(np.float32) * scale.astype(np.float32).reshape(shape)).astype(np.float32)
            s = scale.astype(np.float32).reshape(shape) if per_channel else np.float32(scale[0])
            narrow = int(codes.min(initial=0) > -(2 ** (bits - 1)))
            return self.node("Quant", [self.const(base + "_w", deq), self.const(base + "_wscale", s),
                                       self.const(base + "_wzeropt", np.float32(0)),
                                       self.const(base + "_wbits", np.float32(bits))], base + "_wq",
                             domain=QONNX_DOMAIN, signed=1, narrow=narrow, rounding_mode="ROUND")
        zdt = _int_dtype(bits, True)
        s = scale.astype(np.float32) if per_channel else np.float32(scale[0])
        zp = np.zeros(scale.shape, dtype=zdt) if per_channel else np.array(0, dtype=zdt)
        attrs = {"axis": 0} if per_channel else {}
        return self.node("DequantizeLinear", [self.const(base + "_wcodes", codes.astype(zdt)),
                                              self.const(base + "_wscale", s), self.const(base + "_wzp", zp)],
                         base + "_wdq", **attrs)


def _int_dtype(bits: int, signed: bool) -> type:
    if bits <= 8:
        return np.int8 if signed else np.uint8
    if bits <= 16:
        return np.int16 if signed else np.uint16
    raise ValueError(f"{bits}-bit values have no ONNX QuantizeLinear type (at most 16 bits)")


def _build(model: nn.Module, example_inputs: Tuple[Any, ...], fmt: str, opset: int) -> Any:
    from onnx import TensorProto, helper

    if not isinstance(example_inputs, tuple) or len(example_inputs) != 1:
        raise ValueError("example_inputs must be a tuple holding one input tensor, e.g. (x,)")
    x0 = example_inputs[0]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x0)  # records layer shapes
        ops = trace_chain(model)
        b = _Builder(fmt)
        cur = "input"
        for op in ops:
            if op.kind.startswith("quant_"):
                layer = op.module
                check_frozen(op.name, layer)
                aq = act_quant(op.name, layer)
                if aq is None:
                    raise ValueError(f"layer {op.name} has a float input (no input quantizer); "
                                     "quantize it with act_bits to export")
                wq = weight_quant(op.name, layer)
                xq = b.act(cur, aq, op.name + "_in", op.name)
                w = b.weight(wq.codes, wq.scale, wq.per_channel, wq.bits, op.name)
                bias = b.const(op.name + "_bias", float_bias(layer).astype(np.float32))
                if op.kind == "quant_conv2d":
                    a = op.attrs
                    kh, kw = wq.codes.shape[2:]
                    cur = b.node("Conv", [xq, w, bias], op.name, dilations=list(a["dilation"]), group=a["groups"],
                                 kernel_shape=[int(kh), int(kw)], pads=[*a["padding"], *a["padding"]],
                                 strides=list(a["stride"]))
                else:
                    cur = b.node("Gemm", [xq, w, bias], op.name, transB=1)
            elif op.kind == "relu":
                cur = b.node("Relu", [cur], op.name)
            elif op.kind == "flatten":
                cur = b.node("Flatten", [cur], op.name, axis=1)
            elif op.kind == "global_avgpool":
                cur = b.node("GlobalAveragePool", [cur], op.name)
            elif op.kind == "maxpool2d":
                a = op.attrs
                cur = b.node("MaxPool", [cur], op.name, kernel_shape=list(a["kernel"]), strides=list(a["stride"]),
                             pads=[*a["padding"], *a["padding"]])
            elif op.kind == "avgpool2d":
                a = op.attrs
                cur = b.node("AveragePool", [cur], op.name, kernel_shape=list(a["kernel"]), strides=list(a["stride"]))
            else:
                raise ValueError(f"{op.name}: no ONNX translation for {op.kind}")
        with torch.no_grad():
            out_shape = list(model(x0).shape)
    finally:
        model.train(was)
    batch: Any = x0.shape[0] if fmt == "qonnx" else "N"  # qonnx execution needs a fixed batch size
    in_shape = [batch, *x0.shape[1:]]
    graph = helper.make_graph(
        b.nodes, "mpq_" + fmt,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info(cur, TensorProto.FLOAT, [batch, *out_shape[1:]])], b.inits)
    imports = [helper.make_opsetid("", opset)]
    if fmt == "qonnx":
        imports.append(helper.make_opsetid(QONNX_DOMAIN, 1))
    return helper.make_model(graph, opset_imports=imports, producer_name="mpq_plugin")


def to_qonnx(model: nn.Module, example_inputs: Tuple[Any, ...], path: Union[str, Path]) -> Path:
    """Write a QONNX model (``Quant`` nodes at the learned bit-widths) to ``path``.

    The graph input has the batch size of ``example_inputs[0]`` (qonnx executes fixed shapes;
    hls4ml flows use batch 1).

    Rounding: ``half_even`` quantizers become ``rounding_mode="ROUND"``, ``half_away`` ones
    (learned range) ``"HALF_UP"`` (qonnx: ``sign(x) floor(|x| + 0.5)``). A learned clip level
    inside the bit range (learned range ``code_max``) adds a ``Clip`` after the ``Quant``.
    Run ``qonnx.util.cleanup.cleanup_model`` before handing the file to hls4ml or FINN.
    """
    import onnx

    m = _build(model, example_inputs, "qonnx", opset=13)
    path = Path(path)
    onnx.save(m, str(path))
    return path


def to_onnx_qdq(model: nn.Module, example_inputs: Tuple[Any, ...], path: Union[str, Path]) -> Path:
    """Write standard ONNX (opset 21): activations ``QuantizeLinear -> Clip -> DequantizeLinear``,
    weights as int8/int16 initializers with ``DequantizeLinear``. Needs ``half_even`` activation
    rounding (what ``QuantizeLinear`` does). For exact results in onnxruntime disable graph
    optimizations (``ORT_DISABLE_ALL``): its QDQ fusion into integer kernels rounds differently.
    """
    import onnx

    m = _build(model, example_inputs, "qdq", opset=21)
    onnx.checker.check_model(m)
    path = Path(path)
    onnx.save(m, str(path))
    return path
