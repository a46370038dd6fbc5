"""SDQ's two-bit-width mixture as pure functions (moved here from ``methods/sdq.py`` for the kernels).

The layer's weight is ``Q_hi(x)`` or ``Q_lo(x)`` by one Bernoulli sample ``z`` per layer (drawn
outside, so every kernel path sees the same sample); the gradient of the sample is that of the
expectation ``z_grad Q_hi + (1 - z_grad) Q_lo``. Bit-widths enter as tensor bounds, so a decay
to lower candidates never recompiles a compiled graph.
"""
from __future__ import annotations

from typing import Any

import torch

from mpq_plugin.core.affine import TensorOrFloat, fake_quantize


class _StochasticSelect(torch.autograd.Function):
    """Forward ``q_hi if z else q_lo`` exactly; backward ``d/dz_grad = <g, q_hi - q_lo>``.

    ``z_grad`` is what the sample stands for in the backward pass: ``beta`` (STE on the
    Bernoulli sample, i.e. the gradient of ``beta q_hi + (1 - beta) q_lo``) or the relaxed Gumbel
    sample. Only the sampled quantizer gets the upstream gradient (its own LSQ STE).
    """

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, z_grad: torch.Tensor, q_hi: torch.Tensor,
                q_lo: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(z, q_hi, q_lo)
        ctx.z_shape = z_grad.shape
        return torch.where(z, q_hi, q_lo)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        z, q_hi, q_lo = ctx.saved_tensors
        gz = g_hi = g_lo = None
        if ctx.needs_input_grad[1]:
            gz = (g * (q_hi - q_lo)).sum().reshape(ctx.z_shape)
        zero = torch.zeros((), dtype=g.dtype, device=g.device)
        if ctx.needs_input_grad[2]:
            g_hi = torch.where(z, g, zero)
        if ctx.needs_input_grad[3]:
            g_lo = torch.where(z, zero, g)
        return None, gz, g_hi, g_lo


def stochastic_select(z: torch.Tensor, z_grad: torch.Tensor, q_hi: torch.Tensor, q_lo: torch.Tensor) -> torch.Tensor:
    """Exact sampled forward with the interpolation gradient (see :class:`_StochasticSelect`)."""
    return _StochasticSelect.apply(z, z_grad, q_hi, q_lo)


def interpolate(beta: torch.Tensor, q_hi: torch.Tensor, q_lo: torch.Tensor) -> torch.Tensor:
    """``beta q_hi + (1 - beta) q_lo``: the expectation whose gradient the STE sample carries."""
    return beta * q_hi + (1.0 - beta) * q_lo


def sdq_select(x: torch.Tensor, z: torch.Tensor, z_grad: torch.Tensor, s_hi: torch.Tensor, s_lo: torch.Tensor,
               qmin_hi: TensorOrFloat, qmax_hi: TensorOrFloat, qmin_lo: TensorOrFloat, qmax_lo: TensorOrFloat,
               rounding: str = "half_even") -> torch.Tensor:
    """SDQ's sampled weight: ``Q_hi(x)`` if ``z`` else ``Q_lo(x)`` (LSQ quantizers, zero point 0).

    ``s_hi``/``s_lo`` broadcast against ``x``; ``z`` is a 0-dim bool tensor, ``z_grad`` the
    0-dim tensor its gradient goes to (``beta`` or the relaxed Gumbel sample).
    """
    q_hi = fake_quantize(x, s_hi, 0.0, qmin_hi, qmax_hi, rounding)
    q_lo = fake_quantize(x, s_lo, 0.0, qmin_lo, qmax_lo, rounding)
    return stochastic_select(z, z_grad, q_hi, q_lo)


def sdq_interpolate(x: torch.Tensor, w: torch.Tensor, s_hi: torch.Tensor, s_lo: torch.Tensor,
                    qmin_hi: TensorOrFloat, qmax_hi: TensorOrFloat, qmin_lo: TensorOrFloat,
                    qmax_lo: TensorOrFloat, rounding: str = "half_even") -> torch.Tensor:
    """SDQ's soft Gumbel mix ``w Q_hi(x) + (1 - w) Q_lo(x)`` (``gumbel_hard=False``)."""
    q_hi = fake_quantize(x, s_hi, 0.0, qmin_hi, qmax_hi, rounding)
    q_lo = fake_quantize(x, s_lo, 0.0, qmin_lo, qmax_lo, rounding)
    return interpolate(w, q_hi, q_lo)
