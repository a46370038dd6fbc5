"""Triton packed-weight linear: unpack the low-bit weight and multiply in one pass (weight-only).

``y = x @ W^T + bias`` where ``W`` lives in the :mod:`mpq_plugin.kernels.packed_ref` layout
(``32 // bits`` unsigned codes per int32 word along K). Each program computes one
``BLOCK_M x BLOCK_N`` output tile: per K block it loads the packed words (``bits/32`` of the
fp32 weight traffic), extracts the codes with a shift and a mask, dequantizes them exactly as the
reference does (``((u + qmin) - zp[n]) * scale[n]`` in float32, so the weight tile is bit-exact),
and accumulates ``tl.dot`` in float32. Only the summation order differs from the reference
(results agree to float tolerance). float16/bfloat16 inputs multiply the weight in that dtype with
a float32 accumulator; float32 inputs use IEEE float32 products (no TF32).

Importing this module imports triton: only :mod:`mpq_plugin.kernels.packed_dispatch` does so,
lazily. Set ``TRITON_INTERPRET=1`` before the first import to run it on CPU tensors.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from mpq_plugin.kernels.packed_ref import codes_per_word


@triton.jit
def _packed_linear_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, W,
                          stride_xm, stride_ym, qmin,
                          BITS: tl.constexpr, CPW: tl.constexpr, HAS_BIAS: tl.constexpr,
                          IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    mm = rm < M
    mn = rn < N
    scale = tl.load(s_ptr + rn, mask=mn, other=0.0)  # (BN,) per-row (broadcast for per tensor)
    zp = tl.load(z_ptr + rn, mask=mn, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)  # (BK,)
        mk = rk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
        words = tl.load(w_ptr + rn[:, None] * W + (rk // CPW)[None, :], mask=mn[:, None] & mk[None, :], other=0)
        u = (words >> ((rk % CPW) * BITS)[None, :]) & ((1 << BITS) - 1)  # (BN, BK) unsigned codes
        w = ((u + qmin).to(tl.float32) - zp[:, None]) * scale[:, None]  # bit-exact dequantization
        w = tl.where(mk[None, :], w, 0.0).to(x.dtype)
        if IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mm[:, None] & mn[None, :])


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bits: int, k: int, qmin: int,
                  zero_point: torch.Tensor, scale: torch.Tensor,
                  bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Same contract as :func:`mpq_plugin.kernels.packed_ref.packed_linear` (fused, one pass)."""
    cpw = codes_per_word(bits)
    n = packed.shape[0]
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features, the packed weight expects {k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()  # (M, K)
    m = x2.shape[0]
    s = scale.to(device=x.device, dtype=torch.float32).reshape(-1).expand(n).contiguous()
    z = zero_point.to(device=x.device, dtype=torch.float32).reshape(-1).expand(n).contiguous()
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    b = bias.to(x.device).contiguous() if bias is not None else s  # dummy pointer when no bias
    block_m = 16 if m <= 16 else 64
    block_n, block_k = 64, 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _packed_linear_kernel[grid](x2, packed.contiguous(), s, z, b, y, m, n, k, packed.shape[1],
                                x2.stride(0), y.stride(0), int(qmin),
                                BITS=bits, CPW=cpw, HAS_BIAS=bias is not None,
                                IEEE=x.dtype == torch.float32,
                                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return y.reshape(*lead, n)
