"""QuantState: what a frozen quantizer is, as integers plus a scale."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch


@dataclass
class QuantState:
    """A frozen tensor quantizer.

    ``dequantize()`` reproduces the fake-quant output bit for bit:
    ``(codes - zero_point) * scale`` in float32.

    Attributes:
        bits: storage width of one code, sign bit included when ``signed``.
        signed: whether codes are two's-complement signed.
        scale: float32 tensor, shape ``()`` (per tensor) or ``(C,)`` along ``axis``.
        zero_point: int64 tensor of the same shape as ``scale`` (0 for symmetric quantizers).
        codes: int64 integer codes of the tensor (weights); ``None`` for activations.
        axis: channel axis of a per-channel scale, else ``None``.
        pow2_exponent: integer ``e`` with ``scale == 2**e`` when the scale is a power of two.
        method: registry name of the method that produced the state.
        extra: method-specific facts (e.g. CSQ kept bit planes), JSON-serializable.
    """

    bits: int
    signed: bool
    scale: torch.Tensor
    zero_point: torch.Tensor
    codes: Optional[torch.Tensor] = None
    axis: Optional[int] = None
    pow2_exponent: Optional[torch.Tensor] = None
    method: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    def _bcast(self, p: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if self.axis is None or p.dim() == 0:
            return p
        shape = [1] * like.dim()
        shape[self.axis] = -1
        return p.reshape(shape)

    def dequantize(self, codes: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Float values of ``codes`` (default: the stored weight codes)."""
        c = self.codes if codes is None else codes
        if c is None:
            raise ValueError("this QuantState has no codes (activation state); pass codes=")
        zp = self._bcast(self.zero_point, c).to(torch.float32)
        return (c.to(torch.float32) - zp) * self._bcast(self.scale, c)

    def quantize(self, x: torch.Tensor, rounding: str = "half_even") -> torch.Tensor:
        """Integer codes of ``x`` under this state (used for activations at inference)."""
        from mpq_plugin.core.affine import quantize_codes

        s = self._bcast(self.scale, x)
        z = self._bcast(self.zero_point, x).to(x.dtype)
        return quantize_codes(x, s, z, self.qmin, self.qmax, rounding)

    def check(self) -> None:
        """Raise ``ValueError`` when codes fall outside the declared ``bits``."""
        if self.codes is not None and self.codes.numel():
            lo, hi = int(self.codes.min()), int(self.codes.max())
            if lo < self.qmin or hi > self.qmax:
                raise ValueError(
                    f"codes span [{lo}, {hi}], outside the {self.bits}-bit "
                    f"{'signed' if self.signed else 'unsigned'} range [{self.qmin}, {self.qmax}]"
                )
