"""``mpq_plugin.hf``: short alias of :mod:`mpq_plugin.integrations.transformers`.

Importing it registers ``quant_method="mpq"`` with transformers (idempotent)::

    from mpq_plugin.hf import MpqConfig
"""
from mpq_plugin.integrations.transformers import (  # noqa: F401
    MPQSearchCallback,
    MPQTrainer,
    MpqConfig,
    MpqHfQuantizer,
    QuantGPT2Conv1D,
    calibrate,
    current_bit_plan,
    register,
)

__all__ = ["MPQSearchCallback", "MPQTrainer", "MpqConfig", "MpqHfQuantizer", "QuantGPT2Conv1D",
           "calibrate", "current_bit_plan", "register"]
