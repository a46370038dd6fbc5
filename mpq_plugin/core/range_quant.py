"""Learned-range (Uhlich et al.) uniform and power-of-two quantizers as pure functions.

Moved here from ``methods/learned_range.py`` so the kernel paths (compiled, Triton) can share
them; ``d``/``q_max``/``q_min`` are tensors, so learned bit-widths never recompile.
"""
from __future__ import annotations

import math
from typing import Any, Tuple

import torch

from mpq_plugin.core.ste import round_nograd, round_ste


def _clip_round(x: torch.Tensor, d: torch.Tensor, q: torch.Tensor, signed: bool,
                rounding: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``c = clip(x, -q or 0, q)`` and the integer codes ``round(c / d)`` (one shared path)."""
    ct = torch.promote_types(x.dtype, d.dtype)
    xc, d, q = x.to(ct), d.to(ct), q.to(ct)
    c = torch.clamp(xc, -q if signed else torch.zeros_like(q), q)
    return c, round_nograd(c / d, rounding)


class _UniformFakeQuant(torch.autograd.Function):
    """``y = d * round(clip(x, lower, q) / d)``, the official U-quantizer, with paper gradients.

    Backward (Eq. 2/3c): ``dy/dx = 1`` inside ``[lower, q]``; ``dy/dd = round(c/d) - c/d``
    inside (``grad_variant="code"``: everywhere); ``dy/dq = +1`` above ``q``, ``-1`` below
    ``-q`` (signed) — the sign-aware routing of nnabla's ``clip_by_value``.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, d: torch.Tensor, q: torch.Tensor, signed: bool,
                rounding: str, paper_grad: bool) -> torch.Tensor:
        ctx.save_for_backward(x, d, q)
        ctx.cfg = (signed, rounding, paper_grad)
        _, r = _clip_round(x, d, q, signed, rounding)
        return (d * r).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        x, d, q = ctx.saved_tensors
        signed, rounding, paper_grad = ctx.cfg
        c, r = _clip_round(x, d, q, signed, rounding)
        xc = x.to(c.dtype)
        g = g.to(c.dtype)
        above = xc > q
        below = xc < (-q if signed else torch.zeros_like(q))
        inside = ~(above | below)
        zero = torch.zeros_like(g)
        gx = torch.where(inside, g, zero).to(x.dtype) if ctx.needs_input_grad[0] else None
        gd = gq = None
        if ctx.needs_input_grad[1]:
            err = r - c / d  # in [-1/2, 1/2]
            gd_el = g * err
            if paper_grad:
                gd_el = torch.where(inside, gd_el, zero)
            gd = gd_el.sum_to_size(d.shape).to(d.dtype)
        if ctx.needs_input_grad[2]:
            gq_el = torch.where(above, g, zero)
            if signed:
                gq_el = gq_el - torch.where(below, g, zero)
            gq = gq_el.sum_to_size(q.shape).to(q.dtype)
        return gx, gd, gq, None, None, None


def uniform_fake_quant(x: torch.Tensor, d: torch.Tensor, q: torch.Tensor, signed: bool,
                       rounding: str = "half_away", grad_variant: str = "paper") -> torch.Tensor:
    """Official uniform quantizer ``d * round(clip(x, -q or 0, q) / d)`` (see :class:`_UniformFakeQuant`).

    ``d``/``q`` broadcast against ``x`` (scalars, or per-element for gradient tests).
    """
    return _UniformFakeQuant.apply(x, d, q, signed, rounding, grad_variant == "paper")


def _pow2_regions(a: torch.Tensor, q_min: torch.Tensor, q_max: torch.Tensor,
                  with_zero: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masks of the magnitudes ``a`` clipped to ``q_max`` (top), to ``q_min`` (low: only those at or
    above ``q_min/sqrt(2)`` when ``with_zero``, the rest become 0) and rounded in between (mid)."""
    top = a >= q_max
    low = a < q_min
    mid = ~(low | top)
    if with_zero:
        low = low & (a >= q_min / math.sqrt(2.0))
    return top, low, mid


def pow2_fake_quant(x: torch.Tensor, q_min: torch.Tensor, q_max: torch.Tensor, signed: bool,
                    with_zero: bool) -> torch.Tensor:
    """Official power-of-two quantizer (``parametric_pow2_*``), paper Eq. (4).

    Magnitudes below ``q_min`` -> ``q_min`` (or 0 below ``q_min/sqrt(2)`` when ``with_zero``),
    in ``[q_min, q_max)`` -> ``2^round(log2|x|)`` (STE: ``dQ/dx = 2^round(log2|x|)/|x|``),
    from ``q_max`` on -> ``q_max``; the sign and the region masks carry no gradient, so
    ``dQ/dq_min = sign(x)`` below, ``dQ/dq_max = sign(x)`` above, 0 elsewhere (Eq. 6).
    ``q_min``/``q_max`` must already be powers of two.
    """
    x = x.to(torch.promote_types(x.dtype, q_min.dtype))
    q_min, q_max = q_min.to(x.dtype), q_max.to(x.dtype)
    if not signed:
        x = torch.relu(x)
    a = x.abs()
    with torch.no_grad():
        s = torch.sign(x)
        top, low, mid = _pow2_regions(a, q_min, q_max, with_zero)
    a_mid = torch.where(mid, a, torch.ones_like(a))  # keeps log2 finite off the middle region
    mid_val = torch.pow(2.0, round_ste(torch.log2(a_mid)))
    zero = torch.zeros_like(a)
    y = torch.where(mid, mid_val, zero) + torch.where(low, q_min, zero) + torch.where(top, q_max, zero)
    return s * y


_LN2 = math.log(2.0)


class _Pow2Fused(torch.autograd.Function):
    """:func:`pow2_fake_quant` as one autograd op: same forward (it calls it), explicit backward.

    The backward recomputes the region masks from ``x`` and applies the chain autograd builds
    for the reference (``pow`` then ``log2`` through the STE exponent, ``abs``, ``relu``), so
    nothing but ``x`` is saved: written for ``torch.compile`` (one pass each way).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, q_min: torch.Tensor, q_max: torch.Tensor, signed: bool,
                with_zero: bool) -> torch.Tensor:
        ctx.save_for_backward(x, q_min, q_max)
        ctx.cfg = (signed, with_zero)
        _, q_lo, q_hi, _, a, s, top, low, mid, _, mid_val = _pow2_parts(x, q_min, q_max, signed, with_zero)
        zero = torch.zeros_like(a)  # the reference's sum, term for term
        y = torch.where(mid, mid_val, zero) + torch.where(low, q_lo, zero) + torch.where(top, q_hi, zero)
        return s * y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        x0, q_min0, q_max0 = ctx.saved_tensors
        signed, with_zero = ctx.cfg
        x, q_min, q_max, xr, a, s, top, low, mid, a_mid, mid_val = _pow2_parts(x0, q_min0, q_max0, signed, with_zero)
        zero = torch.zeros_like(a)
        gi = g.to(x.dtype) * s
        g_qmin = torch.where(low, gi, zero).sum().reshape(q_min0.shape).to(q_min0.dtype)
        g_qmax = torch.where(top, gi, zero).sum().reshape(q_max0.shape).to(q_max0.dtype)
        g_e = torch.where(mid, gi, zero) * (mid_val * _LN2)
        ga = torch.where(mid, g_e / (a_mid * _LN2), zero)
        gx = ga * s
        if not signed:
            gx = torch.where(xr <= 0, zero, gx)
        return gx.to(x0.dtype), g_qmin, g_qmax, None, None


def _pow2_parts(x0: torch.Tensor, q_min0: torch.Tensor, q_max0: torch.Tensor, signed: bool, with_zero: bool):
    """The intermediate tensors of :func:`pow2_fake_quant` (plain ops, no autograd Functions)."""
    x = x0.to(torch.promote_types(x0.dtype, q_min0.dtype))
    q_min, q_max = q_min0.to(x.dtype), q_max0.to(x.dtype)
    xr = x if signed else torch.relu(x)
    a = xr.abs()
    s = torch.sign(xr)
    top, low, mid = _pow2_regions(a, q_min, q_max, with_zero)
    a_mid = torch.where(mid, a, torch.ones_like(a))
    mid_val = torch.exp2(torch.round(torch.log2(a_mid)))  # = pow(2, e) exactly (integer e)
    return x, q_min, q_max, xr, a, s, top, low, mid, a_mid, mid_val


def pow2_fake_quant_fused(x: torch.Tensor, q_min: torch.Tensor, q_max: torch.Tensor, signed: bool,
                          with_zero: bool) -> torch.Tensor:
    """:func:`pow2_fake_quant` as one fused autograd op (the compiled path's form)."""
    return _Pow2Fused.apply(x, q_min, q_max, signed, with_zero)
