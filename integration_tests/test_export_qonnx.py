"""QONNX export checked by qonnx itself: cleanup, shape/datatype inference, execute_onnx == PyTorch."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mpq_plugin import MPQConfig
from mpq_plugin.export import IntegerExecutor, to_qonnx
from mpq_plugin.export.plan import plan
from tests.test_export_executor import build_cnn, build_mlp

qonnx = pytest.importorskip("qonnx")
onnx = pytest.importorskip("onnx")


def _run_qonnx(path, x: np.ndarray):
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.infer_datatypes import InferDataTypes
    from qonnx.transformation.infer_shapes import InferShapes
    from qonnx.util.cleanup import cleanup_model

    mw = cleanup_model(ModelWrapper(str(path)))
    mw = mw.transform(InferShapes()).transform(InferDataTypes(allow_scaledint_dtypes=True))
    out = execute_onnx(mw, {mw.graph.input[0].name: x})[mw.graph.output[0].name]
    return mw, out


def test_small_cnn_qonnx_equals_pytorch_and_integer_executor(tmp_path):
    m, x = build_cnn("learned_range", n=256)
    with torch.no_grad():
        y = m(x).numpy()
    path = to_qonnx(m, (x,), tmp_path / "cnn.onnx")
    onnx.checker.check_model(onnx.load(str(path)))
    mw, out = _run_qonnx(path, x.numpy())
    # pow2 scales: qonnx's float execution equals PyTorch's, element for element
    assert np.array_equal(out, y), float(np.abs(out - y).max())
    ints = IntegerExecutor(plan(m)).run(x.numpy())
    assert (out.argmax(1) == ints.output_float.argmax(1)).all()
    np.testing.assert_allclose(out, ints.output_float, atol=1e-5)
    # one Quant per activation and per weight, at the bundle's bit-widths
    quants = [n for n in mw.graph.node if n.op_type in ("Quant", "IntQuant")]
    bits = sorted(int(mw.get_initializer(n.input[3])) for n in quants)
    b = plan(m)
    want = sorted([li["input"]["bits"] for li in b.layers.values()]
                  + [li["weight"]["bits"] for li in b.layers.values()])
    assert bits == want
    rounding = {n.name: [a.s.decode() for a in n.attribute if a.name == "rounding_mode"][0] for n in quants}
    assert set(rounding.values()) <= {"HALF_UP", "ROUND"}


def test_channels_last_conversion_accepts_conv_nodes(tmp_path):
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.channels_last import ConvertToChannelsLastAndClean
    from qonnx.util.cleanup import cleanup_model

    m, x = build_cnn("learned_range", n=1)
    path = to_qonnx(m, (x,), tmp_path / "cnn1.onnx")
    mw = cleanup_model(ModelWrapper(str(path)))
    mw.transform(ConvertToChannelsLastAndClean(make_input_channels_last=True))  # needs all Conv attributes


@pytest.mark.parametrize("cfg", [MPQConfig(method="lsq", weight_bits=3, act_bits=4, per_channel=True),
                                 MPQConfig(method="sdq", weight_bits=1, act_bits=8)], ids=["lsq_pc", "sdq1"])
def test_mlp_qonnx_matches_pytorch(cfg, tmp_path):
    m, x = build_mlp(cfg, n=256)
    with torch.no_grad():
        y = m(x).numpy()
    _, out = _run_qonnx(to_qonnx(m, (x,), tmp_path / "mlp.onnx"), x.numpy())
    # non-power-of-two scales: float rounding order may differ in the last bits
    assert (out.argmax(1) == y.argmax(1)).all()
    np.testing.assert_allclose(out, y, atol=1e-5)
