"""Bit-width formulas of each method, differentiable where the method has a gradient path.

All take and return tensors so that a learned bit-width never recompiles a compiled graph.
"""
from __future__ import annotations

import torch

from mpq_plugin.core.ste import ceil_ste, round_ste


def learned_range_bits(d: torch.Tensor, q_max: torch.Tensor, signed: bool) -> torch.Tensor:
    """Inferred bit-width of a uniform quantizer with step ``d`` and range ``q_max``.

    Uhlich et al. §4 / official code: ``b = ceil(log2(round(q_max/d) + 1) + 1)`` for signed
    tensors (one sign bit), without the ``+1`` for unsigned activations. ``ceil`` and ``round``
    pass gradients straight through, so ``db/dq_max ~ 1/(ln2 (q_max + d))`` and
    ``db/dd ~ -(q_max/d)/(ln2 (q_max + d))`` reach the quantizer parameters from a size penalty.
    """
    levels = round_ste(q_max / d)  # positive levels above zero
    return ceil_ste(torch.log2(levels + 1.0) + (1.0 if signed else 0.0))


def learned_range_pow2_bits(q_min: torch.Tensor, q_max: torch.Tensor) -> torch.Tensor:
    """Bit-width of a power-of-two quantizer: ``ceil(log2(log2(q_max/q_min) + 1) + 1)``.

    The extra bit is the sign (weights) or the explicit zero flag (activations), as in the code.
    """
    return ceil_ste(torch.log2(torch.log2(q_max / q_min) + 1.0) + 1.0)


def bits_to_qmax(bits: torch.Tensor, signed: bool) -> torch.Tensor:
    """Largest positive integer code of a ``bits``-bit (signed/unsigned) symmetric quantizer."""
    return 2.0 ** (bits - 1) - 1 if signed else 2.0**bits - 1


def interpolated_bits(prob_high: torch.Tensor, b_low: float, b_high: float) -> torch.Tensor:
    """Expected bit-width of SDQ's stochastic choice: ``beta * b_high + (1 - beta) * b_low``."""
    return prob_high * b_high + (1.0 - prob_high) * b_low


def kept_plane_bits(mask: torch.Tensor, signed: bool) -> torch.Tensor:
    """CSQ bit-width: number of kept magnitude planes (sum of gates) plus a sign bit if signed."""
    return mask.sum() + (1.0 if signed else 0.0)
