"""Registered quantization methods; importing this package registers them all."""
from mpq_plugin.methods import lsq  # noqa: F401
from mpq_plugin.methods import csq  # noqa: F401
from mpq_plugin.methods import sdq  # noqa: F401
from mpq_plugin.methods import learned_range  # noqa: F401
