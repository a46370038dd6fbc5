"""Triton learned-range uniform quantizer ``d * round(clip(x, -q or 0, q) / d)``, fused fwd and bwd.

Forward (one pass: read x, write y). Backward (one pass: read x and g, write grad_x, plus two
floats per block): grad_x is ``g`` inside the clip range; the partial sums are the step gradient
``g (round(c/d) - c/d)`` (inside only for ``grad_variant="paper"``, Eq. 3) and the range
gradient ``+g`` above ``q`` / ``-g`` below ``-q`` (signed), summed afterwards in a fixed order
(deterministic, no atomics). Scalar ``d``/``q``, float32. Forward and grad_x are bit-exact
against :func:`mpq_plugin.core.range_quant.uniform_fake_quant`; the reductions match to float
tolerance.
"""
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from mpq_plugin.kernels.triton_lsq import BLOCK, _round


@triton.jit
def _clamp(x, lo, hi):
    # as torch.clamp (std::max then std::min): keeps x = -0.0 at a 0.0 bound, propagates NaN
    c = tl.where(x < lo, lo, x)
    return tl.where(hi < c, hi, c)


@triton.jit
def _lr_fwd_kernel(x_ptr, y_ptr, d_ptr, q_ptr, n, SIGNED: tl.constexpr, HALF_EVEN: tl.constexpr,
                   BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0)
    d = tl.load(d_ptr)
    q = tl.load(q_ptr)
    lower = -q if SIGNED else 0.0
    c = _clamp(x, lower, q)
    r = _round(tl.div_rn(c, d), HALF_EVEN)
    tl.store(y_ptr + offs, d * r, mask=m)


@triton.jit
def _lr_bwd_kernel(x_ptr, g_ptr, gx_ptr, pd_ptr, pq_ptr, d_ptr, q_ptr, n, SIGNED: tl.constexpr,
                   HALF_EVEN: tl.constexpr, PAPER: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0)
    g = tl.load(g_ptr + offs, mask=m, other=0.0)
    d = tl.load(d_ptr)
    q = tl.load(q_ptr)
    lower = -q if SIGNED else 0.0
    c = _clamp(x, lower, q)
    v = tl.div_rn(c, d)
    r = _round(v, HALF_EVEN)
    above = x > q
    below = x < lower
    inside = ~(above | below)
    tl.store(gx_ptr + offs, tl.where(inside, g, 0.0), mask=m)
    gd = g * (r - v)
    if PAPER:
        gd = tl.where(inside, gd, 0.0)
    gq = tl.where(above, g, 0.0)
    if SIGNED:
        gq = gq - tl.where(below, g, 0.0)
    tl.store(pd_ptr + pid, tl.sum(gd, axis=0))
    tl.store(pq_ptr + pid, tl.sum(gq, axis=0))


class TritonUniformFakeQuant(torch.autograd.Function):
    """Autograd wrapper: fused forward kernel, fused backward kernel (grad_x, grad_d, grad_q)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, d: torch.Tensor, q: torch.Tensor, signed: bool, rounding: str,
                paper_grad: bool) -> torch.Tensor:
        xc = x.contiguous()
        dd, qq = d.detach().reshape(1).contiguous(), q.detach().reshape(1).contiguous()
        y = torch.empty_like(xc)
        n = xc.numel()
        half_even = rounding == "half_even"
        if n:
            _lr_fwd_kernel[(triton.cdiv(n, BLOCK),)](xc, y, dd, qq, n, SIGNED=signed, HALF_EVEN=half_even,
                                                     BLOCK=BLOCK)
        ctx.save_for_backward(xc, dd, qq)
        ctx.cfg = (signed, half_even, paper_grad, d.shape, q.shape)
        return y.reshape(x.shape)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        xc, dd, qq = ctx.saved_tensors
        signed, half_even, paper, d_shape, q_shape = ctx.cfg
        gc = g.contiguous()
        n = xc.numel()
        nb = max(triton.cdiv(n, BLOCK), 1)
        gx = torch.empty_like(xc)
        parts = torch.zeros((2, nb), dtype=torch.float32, device=xc.device)
        if n:
            _lr_bwd_kernel[(nb,)](xc, gc, gx, parts[0], parts[1], dd, qq, n, SIGNED=signed, HALF_EVEN=half_even,
                                  PAPER=paper, BLOCK=BLOCK)
        need = ctx.needs_input_grad
        return (gx.reshape(xc.shape) if need[0] else None,
                parts[0].sum().reshape(d_shape) if need[1] else None,
                parts[1].sum().reshape(q_shape) if need[2] else None, None, None, None)


def uniform_fake_quant(x: torch.Tensor, d: torch.Tensor, q: torch.Tensor, signed: bool,
                       rounding: str = "half_away", grad_variant: str = "paper") -> torch.Tensor:
    """:func:`mpq_plugin.core.range_quant.uniform_fake_quant` on the Triton kernels (scalar d, q; float32)."""
    return TritonUniformFakeQuant.apply(x, d, q, signed, rounding, grad_variant == "paper")
