"""LSQ (Esser et al., ICLR 2020): uniform fixed-bit quantizer with a learned step size.

The uniform baseline every mixed-precision result is compared with.
``x_hat = s * clamp(round(x / s), -Q_N, Q_P)``; the step's gradient is scaled by
``g = 1 / sqrt(N * Q_P)`` (N: weights per scale, or features per example for activations);
initial step ``2 <|x|> / sqrt(Q_P)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from mpq_plugin.config import MethodOptions
from mpq_plugin.core.affine import float_range, int_range, quantize_codes, reshape_for_axis
from mpq_plugin.core.state import QuantState
from mpq_plugin.kernels import fake_quantize as kernel_fake_quantize
from mpq_plugin.core.ste import ROUNDING_MODES, grad_scale
from mpq_plugin.nn.fake_quantizer import FakeQuantizer, QuantizerSpec
from mpq_plugin.registry import register_method


@dataclass(frozen=True)
class LSQOptions(MethodOptions):
    """Options of the LSQ baseline.

    Attributes:
        scale_grad: apply LSQ's gradient scale ``1/sqrt(N*Q_P)`` to the step.
        rounding: ``half_even`` (torch) or ``half_away`` (C ``round``).
        init: ``lsq`` (``2<|x|>/sqrt(Q_P)``, the paper) or ``minmax`` (``max|x|/Q_P``: plain
            round-to-nearest, the PTQ baseline when no training follows).
    """

    scale_grad: bool = True
    rounding: str = "half_even"
    init: str = "lsq"

    def __post_init__(self) -> None:
        if self.rounding not in ROUNDING_MODES:
            raise ValueError(f"rounding={self.rounding!r}; use one of {ROUNDING_MODES}")
        if self.init not in ("lsq", "minmax"):
            raise ValueError(f"init={self.init!r}; use 'lsq' or 'minmax'")


def _abs_stat(x: torch.Tensor, axis: Optional[int], channels: Optional[int], stat: str) -> torch.Tensor:
    a = x.abs().reshape(1, -1) if channels is None else x.abs().transpose(0, axis or 0).reshape(channels, -1)
    return a.mean(dim=1) if stat == "mean" else a.amax(dim=1)



@register_method("lsq", LSQOptions)
class LSQQuantizer(FakeQuantizer):
    """LSQ: uniform bit-width, learned step (the uniform baseline)."""

    supports_per_channel = True
    budget_penalty = "none"
    searches_bits = False
    bit_state = ()

    def __init__(self, spec: QuantizerSpec, options: Optional[LSQOptions] = None) -> None:
        super().__init__(spec, options)
        if not spec.fixed:
            raise ValueError(
                f"lsq is a fixed-bit baseline but got a bit range {spec.bits}; "
                f"set {'weight_bits' if spec.role == 'weight' else 'act_bits'} to one integer, e.g. 4"
            )
        self.bits = spec.bits[1]
        self.step = nn.Parameter(torch.ones(spec.channels or 1))

    def _range(self) -> tuple:
        return float_range(self.bits, self.signed)

    def initialize(self, x: torch.Tensor) -> None:
        _, qmax = self._range()
        if self.options.init == "minmax":
            s = _abs_stat(x, self.spec.axis, self.spec.channels, "max") / max(qmax, 1.0)
        else:
            s = 2 * _abs_stat(x, self.spec.axis, self.spec.channels, "mean") / math.sqrt(max(qmax, 1.0))
        self.step.copy_(s.clamp_min(1e-8))

    def _grad_factor(self, x: torch.Tensor) -> float:
        if not self.options.scale_grad:
            return 1.0
        _, qmax = self._range()
        n = x.numel() // (self.spec.channels or 1) if self.role == "weight" else x[0].numel()
        return 1.0 / math.sqrt(max(n * qmax, 1.0))

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        s = grad_scale(self.step, self._grad_factor(x)).abs().clamp_min(1e-8)
        return reshape_for_axis(s, x, self.spec.axis if self.per_channel else None)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        qmin, qmax = self._range()
        return kernel_fake_quantize(x, self._scale(x), 0.0, qmin, qmax, self.options.rounding)

    def bit_width(self) -> torch.Tensor:
        return torch.tensor(float(self.bits), device=self.step.device)

    def freeze(self, x: Optional[torch.Tensor] = None) -> QuantState:
        qmin, qmax = self._range()
        with torch.no_grad():
            scale = self.step.abs().clamp_min(1e-8)
            codes = None
            if x is not None:
                codes = quantize_codes(x, reshape_for_axis(scale, x, self.spec.axis if self.per_channel else None),
                                       0.0, qmin, qmax, self.options.rounding)
        return QuantState(
            bits=self.bits, signed=self.signed,
            scale=scale.clone() if self.per_channel else scale.reshape(()).clone(),
            zero_point=torch.zeros_like(scale, dtype=torch.int64) if self.per_channel
            else torch.zeros((), dtype=torch.int64),
            codes=codes, axis=self.spec.axis if self.per_channel else None, method=self.method,
        )
