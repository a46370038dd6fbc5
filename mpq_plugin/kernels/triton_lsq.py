"""Triton LSQ / affine fake quantization (per-tensor and per-channel), fused forward and backward.

Forward (one pass: read x, write y): ``y = (round(clamp(x / s, qmin - z, qmax - z)) + z - z) * s``.
Backward (one pass: read x and g, write grad_x, plus one float per block): grad_x is the
masked upstream gradient and grad_s the LSQ step gradient, reduced per block in the same pass;
the per-block partials are summed in a fixed order (deterministic, no atomics).

Per-channel scales: the tensor is viewed as ``(C, M)`` rows (the channel axis moved first; free
for weights, whose channel axis is 0) and the grid is ``(blocks per row, C)``, so each block
reads one step and its partial grad_s belongs to one channel.

The arithmetic replays the reference autograd graph op for op (IEEE division via ``div_rn``,
exact floor-based rounding, ``(g * s) / s`` for grad_x), so the forward and grad_x are bit-exact
against :func:`mpq_plugin.core.affine.fake_quantize`; grad_s differs only in summation order.
Float32 only; the dispatcher sends everything else elsewhere. NaN inputs are not propagated like
``torch.clamp`` does.

Importing this module imports triton: only :mod:`mpq_plugin.kernels.dispatch` does so, lazily.
Set ``TRITON_INTERPRET=1`` *before* this module is imported to run it on CPU tensors.
"""
from __future__ import annotations

from typing import Any, Callable, Tuple

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _round(v, HALF_EVEN: tl.constexpr):
    if HALF_EVEN:
        f = tl.floor(v)
        d = v - f  # exact for |v| < 2^23
        odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
        up = (d > 0.5) | ((d == 0.5) & odd)
        r = f + tl.where(up, 1.0, 0.0)
        r = tl.where(r == 0.0, v * 0.0, r)  # keep the sign of zero as torch.round: round(-0.3) = -0.0
    else:  # half away from zero: trunc(v) + sign(v) * (|v - trunc(v)| >= 0.5), as core.ste
        t = tl.where(v >= 0.0, tl.floor(v), tl.ceil(v))
        sgn = tl.where(v > 0.0, 1.0, 0.0) - tl.where(v < 0.0, 1.0, 0.0)
        r = t + sgn * tl.where(tl.abs(v - t) >= 0.5, 1.0, 0.0)
    return r


@triton.jit
def _fq_fwd_kernel(x_ptr, y_ptr, s_ptr, m_row, z, lo, hi, HALF_EVEN: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < m_row
    base = c * m_row
    x = tl.load(x_ptr + base + offs, mask=m, other=0.0)
    s = tl.load(s_ptr + c)
    v = tl.minimum(tl.maximum(tl.div_rn(x, s), lo), hi)
    q = _round(v, HALF_EVEN) + z
    tl.store(y_ptr + base + offs, (q - z) * s, mask=m)


@triton.jit
def _fq_bwd_kernel(x_ptr, g_ptr, gx_ptr, part_ptr, s_ptr, m_row, n_blocks, z, lo, hi,
                   HALF_EVEN: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    c = tl.program_id(1)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < m_row
    base = c * m_row
    x = tl.load(x_ptr + base + offs, mask=m, other=0.0)
    g = tl.load(g_ptr + base + offs, mask=m, other=0.0)
    s = tl.load(s_ptr + c)
    v = tl.div_rn(x, s)
    inside = (v >= lo) & (v <= hi)
    q = _round(tl.minimum(tl.maximum(v, lo), hi), HALF_EVEN) + z
    gq = g * s  # d/dq of (q - z) * s, passed straight through the rounding
    tl.store(gx_ptr + base + offs, tl.where(inside, tl.div_rn(gq, s), 0.0), mask=m)
    # d/ds: g * (q - z) from the product, plus -(g s) x / s^2 through x / s where not clamped
    gs = g * (q - z) + tl.where(inside, tl.div_rn(-(gq * x), s * s), 0.0)
    tl.store(part_ptr + c * n_blocks + pid, tl.sum(gs, axis=0))


def _grid(m_row: int, channels: int) -> tuple:
    return (max(triton.cdiv(m_row, BLOCK), 1), channels)


def to_rows(x: torch.Tensor, scale: torch.Tensor) -> Tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """``x`` as contiguous ``(C, M)`` rows, one per element of ``scale``, and the inverse view."""
    from mpq_plugin.kernels.dispatch import channel_axis

    axis = channel_axis(x, scale)
    if axis is None:
        raise ValueError(f"scale of shape {tuple(scale.shape)} is neither per-tensor nor per-channel for "
                         f"x of shape {tuple(x.shape)}; use the compiled or eager path")
    if axis == -1:
        return x.contiguous().reshape(1, -1), lambda t: t.reshape(x.shape)
    xm = x.movedim(axis, 0).contiguous()
    return xm.reshape(xm.shape[0], -1), lambda t: t.reshape(xm.shape).movedim(0, axis)


class TritonFakeQuantize(torch.autograd.Function):
    """Autograd wrapper: fused forward kernel, fused backward kernel (grad_x and grad_s)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, zero_point: float, qmin: float,
                qmax: float, rounding: str) -> torch.Tensor:
        xr, back = to_rows(x, scale)
        s = scale.detach().reshape(-1).contiguous()
        y = torch.empty_like(xr)
        channels, m_row = xr.shape
        lo, hi, z = float(qmin) - float(zero_point), float(qmax) - float(zero_point), float(zero_point)
        half_even = rounding == "half_even"
        if xr.numel():
            _fq_fwd_kernel[_grid(m_row, channels)](xr, y, s, m_row, z, lo, hi, HALF_EVEN=half_even, BLOCK=BLOCK)
        ctx.save_for_backward(xr, s)
        ctx.params = (z, lo, hi, half_even)
        ctx.scale_shape = scale.shape
        ctx.back = back
        return back(y)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        xr, s = ctx.saved_tensors
        z, lo, hi, half_even = ctx.params
        gr, _ = to_rows(g, s.reshape(ctx.scale_shape))
        channels, m_row = xr.shape
        grid = _grid(m_row, channels)
        gx = torch.empty_like(xr)
        parts = torch.zeros((channels, grid[0]), dtype=torch.float32, device=xr.device)
        if xr.numel():
            _fq_bwd_kernel[grid](xr, gr, gx, parts, s, m_row, grid[0], z, lo, hi,
                                 HALF_EVEN=half_even, BLOCK=BLOCK)
        gs = parts.sum(dim=1).reshape(ctx.scale_shape)
        return (ctx.back(gx) if ctx.needs_input_grad[0] else None,
                gs if ctx.needs_input_grad[1] else None, None, None, None, None)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: float, qmin: float, qmax: float,
                  rounding: str = "half_even") -> torch.Tensor:
    """Per-tensor or per-channel fake quantization on the Triton kernels (float32)."""
    return TritonFakeQuantize.apply(x, scale, zero_point, qmin, qmax, rounding)
