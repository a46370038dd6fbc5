"""Standard ONNX Q/Clip/DQ export run by onnxruntime (graph optimizations off) == PyTorch."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mpq_plugin import MPQConfig
from mpq_plugin.export import to_onnx_qdq
from tests.test_export_executor import build_cnn, build_mlp

ort = pytest.importorskip("onnxruntime")


def _session(path):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # QDQ fusion rounds differently
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def test_small_cnn_qdq_equals_pytorch(tmp_path):
    m, x = build_cnn("learned_range", n=256, rounding="half_even")
    with torch.no_grad():
        y = m(x).numpy()
    path = to_onnx_qdq(m, (x[:1],), tmp_path / "cnn_qdq.onnx")
    out = _session(path).run(None, {"input": x.numpy()})[0]
    assert np.array_equal(out, y), float(np.abs(out - y).max())


def test_mlp_qdq_matches_pytorch(tmp_path):
    m, x = build_mlp(MPQConfig(method="lsq", weight_bits=3, act_bits=4, per_channel=True), n=256)
    with torch.no_grad():
        y = m(x).numpy()
    out = _session(to_onnx_qdq(m, (x[:1],), tmp_path / "mlp.onnx")).run(None, {"input": x.numpy()})[0]
    assert (out.argmax(1) == y.argmax(1)).all()
    np.testing.assert_allclose(out, y, atol=1e-5)


def test_half_away_rounding_is_refused(tmp_path):
    m, x = build_cnn("learned_range", n=4)  # learned range rounds half away from zero by default
    with pytest.raises(ValueError, match="half_away.*to_qonnx"):
        to_onnx_qdq(m, (x[:1],), tmp_path / "x.onnx")
