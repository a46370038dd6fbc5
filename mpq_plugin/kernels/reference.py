"""The eager reference path: the pure core function, unchanged (every other path is tested against it)."""
from __future__ import annotations

from mpq_plugin.core.affine import fake_quantize

__all__ = ["fake_quantize"]
