"""CSQ's bit-plane weight synthesis and PACT activation quantizer as pure functions.

Moved here from ``methods/csq.py`` so the kernel paths (compiled, Triton) can share them; the
temperature and the masks are tensors, so annealing never recompiles a compiled graph.
"""
from __future__ import annotations

from typing import Any, Tuple

import torch


def plane_coefficients(n_planes: int, like: torch.Tensor) -> torch.Tensor:
    """``2^(N-1-i) / (2^N - 1)`` for planes ``i = 0..N-1`` (MSB first), fixed constants."""
    e = torch.arange(n_planes - 1, -1, -1, dtype=torch.float64)
    return (2.0**e / (2.0**n_planes - 1)).to(dtype=like.dtype, device=like.device)


def soft_masks(mu: torch.Tensor, temp: torch.Tensor, floor: int) -> torch.Tensor:
    """``sigmoid(T mu)``, with the ``floor`` most significant planes fixed at 1 (protected)."""
    m = torch.sigmoid(temp * mu)  # (N,)
    if floor == 0:
        return m
    return torch.cat([torch.ones_like(m[:floor]), m[floor:]])


def bitplane_weight(p: torch.Tensor, n: torch.Tensor, masks: torch.Tensor, s: torch.Tensor,
                    temp: torch.Tensor) -> torch.Tensor:
    """CSQ weight ``s * sum_i m_i (sigmoid(T p_i) - sigmoid(T n_i)) c_i`` (smooth, no STE)."""
    bits = torch.sigmoid(temp * p) - torch.sigmoid(temp * n)  # (*W, N) in (-1, 1)
    return torch.matmul(bits, masks * plane_coefficients(p.shape[-1], p)) * s


class _HardBit(torch.autograd.Function):
    """``1[logit > 0]`` forward; gradient of ``sigmoid(T logit)`` backward (surrogate)."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, temp: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(logits, temp)
        return (logits > 0).to(logits.dtype)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        logits, temp = ctx.saved_tensors
        sig = torch.sigmoid(temp * logits)
        return g * temp * sig * (1 - sig), None


class _ClipQuant(torch.autograd.Function):
    """``clamp(round(x / s), qmin, qmax) * s`` with ``s = alpha / div``; PACT gradients.

    ``dx = g`` strictly inside the clip range; ``dalpha = sum(g * (qmax 1[x >= hi] +
    qmin 1[x <= lo])) / div`` (the rounding error is ignored, as PACT). Unsigned with
    ``div = qmax``: ``dalpha = sum(g 1[x >= alpha])``.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, alpha: torch.Tensor, qmin: float, qmax: float,
                div: float) -> torch.Tensor:
        s = alpha / div
        ctx.save_for_backward(x, alpha)
        ctx.q = (qmin, qmax, div)
        return torch.clamp(torch.round(x / s), qmin, qmax) * s

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        x, alpha = ctx.saved_tensors
        qmin, qmax, div = ctx.q
        upper = x >= alpha * (qmax / div)  # unsigned: exactly x >= alpha
        lower = x <= alpha * (qmin / div)  # signed: exactly x <= -alpha
        dx = g * (~(upper | lower)).to(g.dtype)
        dalpha = (g * (upper.to(g.dtype) * qmax + lower.to(g.dtype) * qmin)).sum() / div
        return dx, dalpha.reshape(alpha.shape), None, None, None


def act_levels(bits: int, signed: bool) -> Tuple[float, float, float]:
    """``(qmin, qmax, div)`` of a PACT quantizer with ``scale = alpha / div``.

    Unsigned: codes ``[0, 2^b - 1]``, ``div = 2^b - 1`` (clip ``[0, alpha]``). Signed: two's
    complement codes ``[-2^(b-1), 2^(b-1) - 1]``, ``div = 2^(b-1)`` (clip ``[-alpha, alpha - s]``),
    so the frozen ``QuantState`` range is the forward's range.
    """
    if signed:
        return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1, 2.0 ** (bits - 1)
    return 0.0, 2.0**bits - 1, 2.0**bits - 1


def pact_quantize(x: torch.Tensor, alpha: torch.Tensor, qmin: Any, qmax: Any, div: Any) -> torch.Tensor:
    """PACT fake quantization ``clamp(round(x / (alpha/div)), qmin, qmax) * alpha/div`` (:class:`_ClipQuant`)."""
    return _ClipQuant.apply(x, alpha, qmin, qmax, div)


class _BitplaneFused(torch.autograd.Function):
    """:func:`bitplane_weight` with an explicit backward that recomputes the sigmoids from ``p, n``.

    Same function and gradients (to float rounding: planes summed elementwise, not by a BLAS
    product); written for ``torch.compile``, where it becomes one pass over ``p, n`` forward and
    one backward (nothing but the logits is saved). The temperature gets no gradient.
    """

    @staticmethod
    def forward(ctx: Any, p: torch.Tensor, n: torch.Tensor, masks: torch.Tensor, s: torch.Tensor,
                temp: torch.Tensor) -> torch.Tensor:
        coef = plane_coefficients(p.shape[-1], p)
        ctx.save_for_backward(p, n, masks, s, temp, coef)
        mc = masks * coef
        return ((torch.sigmoid(temp * p) - torch.sigmoid(temp * n)) * mc).sum(-1) * s

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        p, n, masks, s, temp, coef = ctx.saved_tensors
        mc = masks * coef
        sp, sn = torch.sigmoid(temp * p), torch.sigmoid(temp * n)
        b = sp - sn
        gm = (g * s).unsqueeze(-1)
        gb = gm * mc
        gp = gb * (1 - sp) * sp * temp
        gn = -gb * (1 - sn) * sn * temp
        gmc = (gm * b).reshape(-1, p.shape[-1]).sum(0)
        gs = (g.unsqueeze(-1) * b * mc).sum().reshape(s.shape)
        return gp, gn, gmc * coef, gs, None


def bitplane_weight_fused(p: torch.Tensor, n: torch.Tensor, masks: torch.Tensor, s: torch.Tensor,
                          temp: torch.Tensor) -> torch.Tensor:
    """:func:`bitplane_weight` as one fused autograd op (the compiled path's form; float tolerance)."""
    return _BitplaneFused.apply(p, n, masks, s, temp)
