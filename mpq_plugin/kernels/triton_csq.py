"""Triton CSQ bit-plane weight synthesis, fused forward and backward.

``W = s * sum_i m_i c_i (sigmoid(T p_i) - sigmoid(T n_i))`` over the ``N`` planes (last axis of
``p``/``n``). Forward (one pass: read p and n, write W). Backward (one pass: read p, n and g,
write grad_p and grad_n, plus ``N + 1`` floats per block): the partial sums are the plane
gradients ``sum_w g s (sigmoid(T p_i) - sigmoid(T n_i))`` (chained to the masks by ``c_i``) and
the scale gradient ``sum_w g W / s``, summed afterwards in a fixed order (deterministic, no
atomics). Not bit-exact: the reference sums the planes with a BLAS matrix-vector product and
uses torch's sigmoid, so forward and gradients match to float tolerance (a few ulp). The
temperature carries no gradient (a buffer in CSQ).
"""
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from mpq_plugin.core.bitplane import plane_coefficients

BLOCK = 256


@triton.jit
def _sig(v):
    return 1.0 / (1.0 + tl.exp(-v))


@triton.jit
def _csq_fwd_kernel(p_ptr, n_ptr, mc_ptr, y_ptr, s_ptr, t_ptr, m_rows, N: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < m_rows
    t = tl.load(t_ptr)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in tl.static_range(N):
        p = tl.load(p_ptr + offs * N + i, mask=m, other=0.0)
        n = tl.load(n_ptr + offs * N + i, mask=m, other=0.0)
        acc += (_sig(t * p) - _sig(t * n)) * tl.load(mc_ptr + i)
    tl.store(y_ptr + offs, acc * tl.load(s_ptr), mask=m)


@triton.jit
def _csq_bwd_kernel(p_ptr, n_ptr, mc_ptr, g_ptr, gp_ptr, gn_ptr, part_ptr, s_ptr, t_ptr, m_rows,
                    N: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < m_rows
    t = tl.load(t_ptr)
    g = tl.load(g_ptr + offs, mask=m, other=0.0)
    gm = g * tl.load(s_ptr)  # gradient of the plane sum
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in tl.static_range(N):
        p = tl.load(p_ptr + offs * N + i, mask=m, other=0.0)
        n = tl.load(n_ptr + offs * N + i, mask=m, other=0.0)
        sp = _sig(t * p)
        sn = _sig(t * n)
        mc = tl.load(mc_ptr + i)
        b = sp - sn
        acc += b * mc
        gb = gm * mc
        tl.store(gp_ptr + offs * N + i, gb * (1.0 - sp) * sp * t, mask=m)
        tl.store(gn_ptr + offs * N + i, -gb * (1.0 - sn) * sn * t, mask=m)
        tl.store(part_ptr + pid * (N + 1) + i, tl.sum(tl.where(m, gm * b, 0.0), axis=0))
    tl.store(part_ptr + pid * (N + 1) + N, tl.sum(tl.where(m, g * acc, 0.0), axis=0))


class TritonBitplaneWeight(torch.autograd.Function):
    """Autograd wrapper: fused synthesis, fused backward (grad_p, grad_n, grad_masks, grad_s)."""

    @staticmethod
    def forward(ctx: Any, p: torch.Tensor, n: torch.Tensor, masks: torch.Tensor, s: torch.Tensor,
                temp: torch.Tensor) -> torch.Tensor:
        planes = p.shape[-1]
        pc, nc = p.detach().contiguous(), n.detach().contiguous()
        coef = plane_coefficients(planes, p)
        mc = (masks.detach() * coef).contiguous()
        ss, tt = s.detach().reshape(1).contiguous(), temp.detach().reshape(1).contiguous()
        rows = pc.numel() // planes if planes else 0
        y = torch.empty(p.shape[:-1], dtype=p.dtype, device=p.device)
        if rows:
            _csq_fwd_kernel[(triton.cdiv(rows, BLOCK),)](pc, nc, mc, y, ss, tt, rows, N=planes, BLOCK=BLOCK)
        ctx.save_for_backward(pc, nc, mc, coef, ss, tt)
        ctx.s_shape = s.shape
        return y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        pc, nc, mc, coef, ss, tt = ctx.saved_tensors
        planes = pc.shape[-1]
        rows = pc.numel() // planes if planes else 0
        nb = max(triton.cdiv(rows, BLOCK), 1)
        gp, gn = torch.empty_like(pc), torch.empty_like(nc)
        parts = torch.zeros((nb, planes + 1), dtype=torch.float32, device=pc.device)
        if rows:
            _csq_bwd_kernel[(nb,)](pc, nc, mc, g.contiguous(), gp, gn, parts, ss, tt, rows, N=planes, BLOCK=BLOCK)
        tot = parts.sum(dim=0)
        need = ctx.needs_input_grad
        return (gp if need[0] else None, gn if need[1] else None,
                tot[:planes] * coef if need[2] else None,
                tot[planes].reshape(ctx.s_shape) if need[3] else None, None)


def bitplane_weight(p: torch.Tensor, n: torch.Tensor, masks: torch.Tensor, s: torch.Tensor,
                    temp: torch.Tensor) -> torch.Tensor:
    """:func:`mpq_plugin.core.bitplane.bitplane_weight` on the Triton kernels (float32)."""
    return TritonBitplaneWeight.apply(p, n, masks, s, temp)
