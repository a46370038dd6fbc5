"""Triton SDQ pair quantizer: ``Q_hi(x)`` if ``z`` else ``Q_lo(x)``, fused forward and backward.

Forward (one pass: read x, write y): loads the layer's sample ``z`` (drawn outside, so the result
is the reference's), picks that candidate's step and bounds and quantizes as the LSQ kernel.
Backward (one pass: read x and g, write grad_x, plus three floats per block): both candidates are
recomputed in registers; grad_x is the sampled candidate's masked gradient, the partial sums are
grad s_hi, grad s_lo (each only where sampled) and ``<g, Q_hi(x) - Q_lo(x)>``, the gradient of
the sample's stand-in (``beta`` or the relaxed Gumbel sample). Partials are summed in a fixed
order (deterministic, no atomics). Per-tensor or per-channel steps, float32; forward and grad_x
bit-exact against :func:`mpq_plugin.core.mixture.sdq_select`, reductions to float tolerance.
"""
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from mpq_plugin.kernels.triton_lsq import BLOCK, _grid, _round, to_rows


@triton.jit
def _sdq_fwd_kernel(x_ptr, y_ptr, z_ptr, shi_ptr, slo_ptr, m_row, zp, lo_h, hi_h, lo_l, hi_l,
                    HALF_EVEN: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < m_row
    base = c * m_row
    x = tl.load(x_ptr + base + offs, mask=m, other=0.0)
    sel = tl.load(z_ptr) != 0.0
    s = tl.where(sel, tl.load(shi_ptr + c), tl.load(slo_ptr + c))
    lo = tl.where(sel, lo_h, lo_l)
    hi = tl.where(sel, hi_h, hi_l)
    # zp is the reference's zero point 0.0, a runtime value: round(v) + 0.0 turns -0.0 into +0.0
    q = _round(tl.minimum(tl.maximum(tl.div_rn(x, s), lo), hi), HALF_EVEN) + zp
    tl.store(y_ptr + base + offs, (q - zp) * s, mask=m)


@triton.jit
def _lsq_parts(x, g, s, zp, lo, hi, HALF_EVEN: tl.constexpr):
    """(y, grad_x, grad_s per element) of the zero-point-0 LSQ quantizer, as autograd computes them."""
    v = tl.div_rn(x, s)
    inside = (v >= lo) & (v <= hi)
    q = _round(tl.minimum(tl.maximum(v, lo), hi), HALF_EVEN) + zp
    gq = g * s
    gx = tl.where(inside, tl.div_rn(gq, s), 0.0)
    gs = g * (q - zp) + tl.where(inside, tl.div_rn(-(gq * x), s * s), 0.0)
    return (q - zp) * s, gx, gs


@triton.jit
def _sdq_bwd_kernel(x_ptr, g_ptr, gx_ptr, phi_ptr, plo_ptr, pz_ptr, z_ptr, shi_ptr, slo_ptr, m_row, n_blocks,
                    zp, lo_h, hi_h, lo_l, hi_l, HALF_EVEN: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    c = tl.program_id(1)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < m_row
    base = c * m_row
    x = tl.load(x_ptr + base + offs, mask=m, other=0.0)
    g = tl.load(g_ptr + base + offs, mask=m, other=0.0)
    sel = tl.load(z_ptr) != 0.0
    y_h, gx_h, gs_h = _lsq_parts(x, g, tl.load(shi_ptr + c), zp, lo_h, hi_h, HALF_EVEN)
    y_l, gx_l, gs_l = _lsq_parts(x, g, tl.load(slo_ptr + c), zp, lo_l, hi_l, HALF_EVEN)
    tl.store(gx_ptr + base + offs, tl.where(sel, gx_h, gx_l), mask=m)
    i = c * n_blocks + pid
    tl.store(phi_ptr + i, tl.sum(tl.where(sel, gs_h, 0.0), axis=0))
    tl.store(plo_ptr + i, tl.sum(tl.where(sel, 0.0, gs_l), axis=0))
    tl.store(pz_ptr + i, tl.sum(g * (y_h - y_l), axis=0))


class TritonSDQSelect(torch.autograd.Function):
    """Autograd wrapper: fused forward (sampled candidate), fused backward (grad_x, s_hi, s_lo, z)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, z: torch.Tensor, z_grad: torch.Tensor, s_hi: torch.Tensor,
                s_lo: torch.Tensor, qmin_hi: float, qmax_hi: float, qmin_lo: float, qmax_lo: float,
                rounding: str) -> torch.Tensor:
        xr, back = to_rows(x, s_hi)
        sh, sl = s_hi.detach().reshape(-1).contiguous(), s_lo.detach().reshape(-1).contiguous()
        zf = z.detach().reshape(1).to(torch.float32)
        y = torch.empty_like(xr)
        channels, m_row = xr.shape
        bounds = (float(qmin_hi), float(qmax_hi), float(qmin_lo), float(qmax_lo))
        half_even = rounding == "half_even"
        if xr.numel():
            _sdq_fwd_kernel[_grid(m_row, channels)](xr, y, zf, sh, sl, m_row, 0.0, *bounds,
                                                    HALF_EVEN=half_even, BLOCK=BLOCK)
        ctx.save_for_backward(xr, zf, sh, sl)
        ctx.cfg = (bounds, half_even, s_hi.shape, s_lo.shape, z_grad.shape, back)
        return back(y)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        xr, zf, sh, sl = ctx.saved_tensors
        bounds, half_even, shape_hi, shape_lo, shape_z, back = ctx.cfg
        gr, _ = to_rows(g, sh.reshape(shape_hi))
        channels, m_row = xr.shape
        grid = _grid(m_row, channels)
        gx = torch.empty_like(xr)
        parts = torch.zeros((3, channels, grid[0]), dtype=torch.float32, device=xr.device)
        if xr.numel():
            _sdq_bwd_kernel[grid](xr, gr, gx, parts[0], parts[1], parts[2], zf, sh, sl, m_row, grid[0], 0.0, *bounds,
                                  HALF_EVEN=half_even, BLOCK=BLOCK)
        need = ctx.needs_input_grad
        return (back(gx) if need[0] else None, None,
                parts[2].sum().reshape(shape_z) if need[2] else None,
                parts[0].sum(dim=1).reshape(shape_hi) if need[3] else None,
                parts[1].sum(dim=1).reshape(shape_lo) if need[4] else None,
                None, None, None, None, None)


def sdq_select(x: torch.Tensor, z: torch.Tensor, z_grad: torch.Tensor, s_hi: torch.Tensor, s_lo: torch.Tensor,
               qmin_hi: float, qmax_hi: float, qmin_lo: float, qmax_lo: float,
               rounding: str = "half_even") -> torch.Tensor:
    """:func:`mpq_plugin.core.mixture.sdq_select` on the Triton kernels (float32)."""
    return TritonSDQSelect.apply(x, z, z_grad, s_hi, s_lo, qmin_hi, qmax_hi, qmin_lo, qmax_lo, rounding)
