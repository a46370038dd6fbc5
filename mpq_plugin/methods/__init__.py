"""Registered quantization methods; importing this package registers them all."""
from mpq_plugin.methods import lsq  # noqa: F401
