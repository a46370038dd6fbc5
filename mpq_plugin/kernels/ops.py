"""Dispatched entry points of every method's quantizer (same signatures as the core references).

Each runs :func:`mpq_plugin.kernels.dispatch.run`: Triton, compiled or eager, same results
(see ``docs/kernels.md`` for the exactness of each path).
"""
from __future__ import annotations

from typing import Any

import torch

from mpq_plugin.kernels.dispatch import run


def sdq_select(x: torch.Tensor, z: torch.Tensor, z_grad: torch.Tensor, s_hi: torch.Tensor, s_lo: torch.Tensor,
               qmin_hi: float, qmax_hi: float, qmin_lo: float, qmax_lo: float,
               rounding: str = "half_even") -> torch.Tensor:
    """:func:`mpq_plugin.core.mixture.sdq_select` (SDQ sampled pair) on the best path."""
    return run("sdq_select", x, z, z_grad, s_hi, s_lo, qmin_hi, qmax_hi, qmin_lo, qmax_lo, rounding)


def sdq_interpolate(x: torch.Tensor, w: torch.Tensor, s_hi: torch.Tensor, s_lo: torch.Tensor,
                    qmin_hi: float, qmax_hi: float, qmin_lo: float, qmax_lo: float,
                    rounding: str = "half_even") -> torch.Tensor:
    """:func:`mpq_plugin.core.mixture.sdq_interpolate` (SDQ soft Gumbel mix) on the best path."""
    return run("sdq_interpolate", x, w, s_hi, s_lo, qmin_hi, qmax_hi, qmin_lo, qmax_lo, rounding)


def uniform_fake_quant(x: torch.Tensor, d: torch.Tensor, q: torch.Tensor, signed: bool,
                       rounding: str = "half_away", grad_variant: str = "paper") -> torch.Tensor:
    """:func:`mpq_plugin.core.range_quant.uniform_fake_quant` (learned range U1-U3) on the best path."""
    return run("uniform_fake_quant", x, d, q, signed, rounding, grad_variant)


def pow2_fake_quant(x: torch.Tensor, q_min: torch.Tensor, q_max: torch.Tensor, signed: bool,
                    with_zero: bool) -> torch.Tensor:
    """:func:`mpq_plugin.core.range_quant.pow2_fake_quant` (learned range P1-P3) on the best path."""
    return run("pow2_fake_quant", x, q_min, q_max, signed, with_zero)


def bitplane_weight(p: torch.Tensor, n: torch.Tensor, masks: torch.Tensor, s: torch.Tensor,
                    temp: torch.Tensor) -> torch.Tensor:
    """:func:`mpq_plugin.core.bitplane.bitplane_weight` (CSQ weight synthesis) on the best path."""
    return run("bitplane_weight", p, n, masks, s, temp)


def pact_quantize(x: torch.Tensor, alpha: torch.Tensor, qmin: Any, qmax: Any, div: Any) -> torch.Tensor:
    """:func:`mpq_plugin.core.bitplane.pact_quantize` (CSQ activations) on the best path."""
    return run("pact_quantize", x, alpha, qmin, qmax, div)
