"""A test-only quantizer with a learnable float bit-width, for search/budget tests.

Registered under a test-only name inside fixtures and removed afterwards, so the conformance
suite never sees it.
"""
import math
from dataclasses import dataclass

import torch
from torch import nn

from mpq_plugin.config import MethodOptions
from mpq_plugin.core.affine import fake_quantize, int_range, quantize_codes
from mpq_plugin.core.state import QuantState
from mpq_plugin.nn.fake_quantizer import FakeQuantizer

@dataclass(frozen=True)
class Opts(MethodOptions):
    budget_ratio: str = "weighted"


class LearnableBits(FakeQuantizer):
    """Float bit-width ``b`` (a parameter), hard bits ``round(b)``; the output interpolates the
    two neighbouring integer quantizers, so the task loss has a gradient to ``b``."""

    budget_penalty = "hinge_sq"

    def __init__(self, spec, options=None):
        super().__init__(spec, options)
        self.b = nn.Parameter(torch.tensor(float(spec.bits[1])))
        self.register_buffer("amax", torch.tensor(1.0))
        self.progress_seen = None

    def initialize(self, x):
        self.amax.copy_(x.abs().max().clamp_min(1e-8))

    def set_progress(self, progress):
        self.progress_seen = progress

    def bit_width(self):
        return self.b.clamp(*self.spec.bits)

    def _q(self, x, bits):
        qmin, qmax = int_range(bits, self.signed)
        return fake_quantize(x, self.amax / qmax.clamp_min(1.0), 0.0, qmin, qmax)

    def quantize(self, x):
        b = self.bit_width()
        lo = math.floor(float(b.detach()))
        frac = b - lo
        return (1 - frac) * self._q(x, lo) + frac * self._q(x, min(lo + 1, self.spec.bits[1]))

    def fix_bits(self):
        with torch.no_grad():
            self.b.copy_(torch.round(self.bit_width()))
        super().fix_bits()

    def force_bits(self, bits):
        with torch.no_grad():
            self.b.fill_(float(bits))

    def freeze(self, x=None):
        bits = int(self.hard_bit_width())
        qmin, qmax = int_range(bits, self.signed)
        s = (self.amax / qmax.clamp_min(1.0)).detach()
        codes = quantize_codes(x, s, 0.0, qmin, qmax) if x is not None else None
        return QuantState(bits, self.signed, s, torch.zeros((), dtype=torch.int64), codes)


class NoRepair(LearnableBits):
    """Same, without the optional ``force_bits`` hook."""

    force_bits = None
