"""``mpq_plugin.torchao``: torchao ``quantize_`` / ``FqnToConfig`` integration
(:mod:`mpq_plugin.integrations.torchao`) and the PT2E quantization configs
(:mod:`mpq_plugin.integrations.pt2e`, when present). Importing it imports torchao."""
from mpq_plugin.integrations.torchao import MPQQATConfig, is_quantizable  # noqa: F401

from mpq_plugin.integrations.ao_convert import (  # noqa: F401
    apply_torchao_weights,
    convert_mpq,
    kernel_table_markdown,
    torchao_inference_configs,
)

__all__ = ["MPQQATConfig", "apply_torchao_weights", "convert_mpq", "is_quantizable", "kernel_table_markdown", "torchao_inference_configs"]
