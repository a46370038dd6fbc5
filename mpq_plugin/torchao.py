"""``mpq_plugin.torchao``: torchao ``quantize_`` / ``FqnToConfig`` integration
(:mod:`mpq_plugin.integrations.torchao`) and the PT2E quantization configs
(:mod:`mpq_plugin.integrations.pt2e`, when present). Importing it imports torchao."""
from mpq_plugin.integrations.torchao import MPQQATConfig, is_quantizable  # noqa: F401

__all__ = ["MPQQATConfig", "is_quantizable"]
