"""hls4ml (1.3.0) C simulation of our QONNX, for bit-exact checks against the integer executor.

hls4ml types every constant it is not told about with its default precision (``fixed<16,6>``),
and derives a layer's accumulator from its input and weight types only. A float bias finer than
the accumulator grid is therefore truncated, and the result differs from PyTorch and from our
bundle. The flow here follows hls4ml's convention instead (FINN's too): biases on the accumulator
grid ``s_x * s_w``, i.e. the bundle exported with ``bias_frac_bits=0``; the QONNX biases are
replaced by that bundle's integer biases times their unit, so hls4ml, qonnx and
:class:`~mpq_plugin.export.IntegerExecutor` (on that bundle) compute the same integers.

Inputs must be on the first quantizer's grid (``codes * scale``, what hardware receives), so the
input cast to hls4ml's default type is exact. hls4ml's global average pooling is wrong
(``docs/export.md``): models with pooling after a conv are refused here.

Needs ``hls4ml`` (``pip install -e .[export]``) and ``g++``; no vendor tools.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Tuple, Union

import numpy as np
from torch import nn

from mpq_plugin.export.plan import Bundle, plan


def hls_bundle(model: nn.Module) -> Bundle:
    """The integer bundle hls4ml computes: biases on the accumulator grid (``bias_frac_bits=0``)."""
    return plan(model, bias_frac_bits=0)


def _rewrite_biases(onnx_model: Any, bundle: Bundle) -> None:
    """Replace each Gemm/Conv float bias by the bundle's integer bias times its unit (in order)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in onnx_model.graph.initializer}
    layers = list(bundle.layers.values())
    nodes = [n for n in onnx_model.graph.node if n.op_type in ("Gemm", "Conv")]
    if len(nodes) != len(layers):
        raise ValueError(f"the QONNX graph has {len(nodes)} Gemm/Conv nodes, the bundle {len(layers)} layers")
    for node, li in zip(nodes, layers):
        if len(node.input) < 3:
            raise ValueError(f"QONNX node {node.name} has no bias input")
        b = bundle.arrays[li["bias"]["file"]].astype(np.float64) * np.asarray(li["bias"]["unit"], dtype=np.float64)
        b32 = b.astype(np.float32)
        if not np.array_equal(b32.astype(np.float64), b):
            raise ValueError(f"layer bias of {node.name} is not exact in float32 (bias too wide)")
        inits[node.input[2]].CopyFrom(numpy_helper.from_array(b32, node.input[2]))


def _default_precision(bundle: Bundle) -> str:
    """hls4ml's type for constants and the input it does not derive (biases, the network input):
    wide enough for every bias step and value of the bundle and for the input grid, so no cast truncates."""
    frac, ints = 0, 1
    for li in bundle.layers.values():
        unit = np.asarray(li["bias"]["unit"], dtype=np.float64)
        frac = max(frac, int(np.ceil(-np.log2(unit.min()))))
        b = np.abs(bundle.arrays[li["bias"]["file"]].astype(np.float64) * unit).max(initial=0.0)
        ints = max(ints, int(np.ceil(np.log2(b + 1))) + 1)
    first = bundle.layers[bundle.manifest["input"]["quantizer_of"]]["input"]
    frac = max(frac, int(np.ceil(-np.log2(first["scale"]))))
    ints = max(ints, int(np.ceil(np.log2(max(abs(first["code_min"]), first["code_max"]) * first["scale"] + 1))) + 1)
    return f"fixed<{frac + ints},{ints}>"


def input_grid(model_bundle: Bundle, x: np.ndarray) -> np.ndarray:
    """``x`` snapped to the first quantizer's grid (``codes * scale``), float32."""
    from mpq_plugin.export.executor import IntegerExecutor

    first = model_bundle.layers[model_bundle.manifest["input"]["quantizer_of"]]["input"]
    return (IntegerExecutor(model_bundle).quantize_input(x) * first["scale"]).astype(np.float32)


def to_hls4ml(model: nn.Module, example_input: Any, out_dir: Union[str, Path], *, io_type: str = "io_parallel",
              compile: bool = True, allow_pooling: bool = False) -> Tuple[Any, Bundle]:
    """Convert the model through our QONNX into an hls4ml (Vitis backend) project and compile its
    C simulation with g++. ``allow_pooling=True`` converts pooling anyway (to watch upstream's bug).
    Returns ``(hls_model, bundle)``; ``hls_model.predict`` takes NCHW inputs
    already channels-last transposed (NHWC) for conv models and 2-D inputs for MLPs."""
    import hls4ml
    import onnx
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.channels_last import ConvertToChannelsLastAndClean
    from qonnx.transformation.gemm_to_matmul import GemmToMatMul
    from qonnx.util.cleanup import cleanup_model

    from mpq_plugin.export.onnx_export import to_qonnx

    bundle = hls_bundle(model)
    ops = [e["op"] for e in bundle.manifest["graph"]]
    if not allow_pooling and "quant_conv2d" in ops and any(o in ops for o in ("avgpool2d", "global_avgpool")):
        raise ValueError("hls4ml 1.3.0 averages over the wrong axes after a channels-last conversion "
                         "(global/average pooling gives wrong results silently); use a flatten head or max pooling")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = to_qonnx(model, (example_input[:1],), out / "model.qonnx.onnx")
    m = onnx.load(str(path))
    _rewrite_biases(m, bundle)
    hls_path = out / "model.hls.qonnx.onnx"
    onnx.save(m, str(hls_path))
    mw = cleanup_model(ModelWrapper(str(hls_path)))
    if "quant_conv2d" in ops:
        mw = mw.transform(ConvertToChannelsLastAndClean(make_input_channels_last=True))
    mw = cleanup_model(mw.transform(GemmToMatMul()))
    default_precision = _default_precision(bundle)
    cfg = hls4ml.utils.config_from_onnx_model(mw, granularity="name", backend="Vitis",
                                              default_precision=default_precision)
    hm = hls4ml.converters.convert_from_onnx_model(mw, output_dir=str(out / "hls_prj"), io_type=io_type,
                                                   backend="Vitis", hls_config=cfg)
    if compile:
        hm.compile()
    return hm, bundle
