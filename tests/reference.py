"""Slow, loop-style reference implementations used as ground truth by the unit tests.

A flat module of functions: each one is written element by element in exact arithmetic
(``fractions.Fraction`` for rounding, numpy float32 scalars where float32 rounding of the
library must be reproduced), never by calling the code under test.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch


def round_exact(v: float, mode: str) -> int:
    """Round a float exactly: ``half_even`` (banker's) or ``half_away`` (C ``std::round``)."""
    f = Fraction(float(v))
    if mode == "half_even":
        return round(f)  # Fraction.__round__ is exact, ties to even
    if mode == "half_away":
        n = math.floor(abs(f) + Fraction(1, 2))
        return n if f >= 0 else -n
    raise ValueError(mode)


def _broadcast_np(p: torch.Tensor, x: torch.Tensor) -> np.ndarray:
    return np.broadcast_to(p.detach().to(torch.float32).numpy(), tuple(x.shape))


def fake_quantize_loop(x: torch.Tensor, scale: torch.Tensor, zero_point: float, qmin: int, qmax: int,
                       rounding: str = "half_even") -> torch.Tensor:
    """``(clamp(round(x/s) + z, qmin, qmax) - z) * s`` element by element, float32 arithmetic.

    ``scale`` may be any shape that broadcasts against ``x`` (per-tensor or per-channel).
    """
    xs = x.detach().to(torch.float32).numpy()
    ss = _broadcast_np(scale, x)
    out = np.empty(xs.shape, dtype=np.float32)
    for idx in np.ndindex(*xs.shape):
        v = np.float32(xs[idx]) / np.float32(ss[idx])  # float32 division, as torch does
        q = min(max(round_exact(float(v), rounding) + zero_point, qmin), qmax)
        out[idx] = np.float32(q - zero_point) * np.float32(ss[idx])
    return torch.from_numpy(out)


def quantize_codes_loop(x: torch.Tensor, scale: torch.Tensor, zero_point: int, qmin: int, qmax: int,
                        rounding: str = "half_even") -> torch.Tensor:
    """Integer codes ``clamp(round(x/s) + z, qmin, qmax)`` element by element (int64)."""
    xs = x.detach().to(torch.float32).numpy()
    ss = _broadcast_np(scale, x)
    out = np.empty(xs.shape, dtype=np.int64)
    for idx in np.ndindex(*xs.shape):
        v = np.float32(xs[idx]) / np.float32(ss[idx])
        out[idx] = min(max(round_exact(float(v), rounding) + zero_point, qmin), qmax)
    return torch.from_numpy(out)


def lsq_grads_loop(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, grad_out: torch.Tensor,
                   rounding: str = "half_even") -> Tuple[torch.Tensor, torch.Tensor]:
    """LSQ's hand-written gradients (Esser et al. 2020, Eq. 3), zero point 0.

    With ``v = x/s``: inside (``qmin < v < qmax``) ``dx_hat/dx = 1`` and
    ``dx_hat/ds = round(v) - v``; at or below ``qmin``: ``0`` and ``qmin``; at or above ``qmax``:
    ``0`` and ``qmax``. Returns ``(dL/dx, dL/ds)`` with ``dL/ds`` summed over the elements that
    share each scale entry (``scale``'s own shape).
    """
    xs = x.detach().to(torch.float64).numpy()
    ss = _broadcast_np(scale, x).astype(np.float64)
    go = grad_out.detach().to(torch.float64).numpy()
    dx = np.zeros(xs.shape)
    ds_full = np.zeros(xs.shape)
    for idx in np.ndindex(*xs.shape):
        v = xs[idx] / ss[idx]
        v32 = float(np.float32(xs[idx]) / np.float32(ss[idx]))  # the library divides in float32
        if v <= qmin:
            ds_full[idx] = qmin * go[idx]
        elif v >= qmax:
            ds_full[idx] = qmax * go[idx]
        else:
            dx[idx] = go[idx]
            ds_full[idx] = (round_exact(v32, rounding) - v) * go[idx]
    # sum ds over the broadcast dimensions of scale
    s_shape = tuple(scale.shape)
    pad = (1,) * (xs.ndim - len(s_shape)) + s_shape
    axes = tuple(i for i, n in enumerate(pad) if n == 1 and xs.shape[i] != 1)
    ds = ds_full.sum(axis=axes, keepdims=True).reshape(s_shape) if axes else ds_full.reshape(s_shape)
    return torch.from_numpy(dx), torch.from_numpy(np.asarray(ds))


def learned_range_bits_loop(d: float, q_max: float, signed: bool) -> int:
    """Uhlich et al.: ``ceil(log2(round(q_max/d) + 1) + 1)`` (signed) / without ``+1`` (unsigned)."""
    levels = round_exact(q_max / d, "half_even")
    return math.ceil(math.log2(levels + 1) + (1 if signed else 0))


def conv_counts_loop(c_in: int, c_out: int, kernel: Sequence[int], groups: int, out_spatial: Sequence[int],
                     bias: bool) -> Dict[str, int]:
    """Weights, biases and MACs of a conv by enumerating every output element's products."""
    per_group_in = c_in // groups
    weight = c_out * per_group_in * math.prod(kernel)
    macs = 0
    for _co in range(c_out):
        for _pos in range(math.prod(out_spatial)):
            macs += per_group_in * math.prod(kernel)  # one product per weight feeding this output
    return {"weight": weight, "bias": c_out if bias else 0, "macs": macs}


def activation_sizes_by_hooks(model: torch.nn.Module, example: torch.Tensor,
                              module_types: Tuple[type, ...] = (torch.nn.ReLU, torch.nn.ReLU6)) -> List[int]:
    """Per-sample element counts of every output of modules of ``module_types`` in one forward."""
    sizes: List[int] = []
    handles = [m.register_forward_hook(lambda _m, _i, out: sizes.append(out[0].numel()))
               for m in model.modules() if isinstance(m, module_types)]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return sizes


def conv_fc_params(model: torch.nn.Module, exclude: Tuple[str, ...] = ()) -> int:
    """Weights + biases of every Conv/Linear (BN excluded), skipping names containing ``exclude``."""
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)) and not any(e in name for e in exclude):
            n += m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
    return n
