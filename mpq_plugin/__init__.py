"""mpq_plugin: learned mixed-precision quantization (SDQ, learned range, CSQ) for PyTorch.

Public surface::

    import mpq_plugin
    mpq_plugin.quantize_(model, mpq_plugin.MPQConfig(method="sdq", budget=mpq_plugin.Budget(avg_weight_bits=3)))
    ...train...
    plan = mpq_plugin.freeze(model)
"""
from mpq_plugin import methods as _methods  # noqa: F401  (registers the built-in methods)
from mpq_plugin.api import dequantize_, freeze, quantize_
from mpq_plugin.config import BitPlan, Budget, LayerBits, MPQConfig
from mpq_plugin.nn.costing import model_cost
from mpq_plugin.registry import list_methods, register_method

__version__ = "0.1.0"

__all__ = [
    "BitPlan",
    "Budget",
    "LayerBits",
    "MPQConfig",
    "dequantize_",
    "freeze",
    "list_methods",
    "model_cost",
    "quantize_",
    "register_method",
]
