"""Export of frozen quantized models: integer bundle + integer executor, QONNX, ONNX Q/DQ.

* :func:`to_integer_params`: a self-describing integer bundle (manifest, per-layer JSON,
  smallest-dtype ``.npy`` tensors, README) for FPGA/ASIC flows;
* :class:`IntegerExecutor`: numpy int64 reference executor of a bundle (overflow-checked;
  multiply+shift or FINN-style thresholds);
* :func:`to_qonnx`: QONNX ``Quant`` nodes at the learned bit-widths (needs ``onnx``);
* :func:`to_onnx_qdq`: standard ONNX QuantizeLinear/Clip/DequantizeLinear (needs ``onnx``).

``onnx``/``qonnx``/``onnxruntime`` are imported only when the functions that need them run.
"""
from mpq_plugin.export.bundle_io import read_bundle, write_bundle
from mpq_plugin.export.compare import Agreement, compare, torch_codes
from mpq_plugin.export.executor import IntegerExecutor, Trace, WidthOverflowError
from mpq_plugin.export.integer_params import to_integer_params
from mpq_plugin.export.onnx_export import to_onnx_qdq, to_qonnx
from mpq_plugin.export.plan import Bundle
from mpq_plugin.export.readme import width_table

__all__ = ["Agreement", "Bundle", "IntegerExecutor", "Trace", "WidthOverflowError", "compare", "read_bundle",
           "to_integer_params", "to_onnx_qdq", "to_qonnx", "torch_codes", "width_table", "write_bundle"]
