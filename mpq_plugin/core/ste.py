"""Straight-through estimators: step functions in the forward pass, identity in the backward.

They are ``autograd.Function``s rather than the ``x + (round(x) - x).detach()`` idiom because
that idiom is not exact in floating point (``a + (r - a)`` can differ from ``r`` in the last
bit), and the library promises that fake-quant outputs equal the frozen integer model bit for
bit.

Two rounding modes are offered because the methods disagree: PyTorch's ``torch.round`` rounds
half to even, while the learned-range paper (Uhlich et al., Eq. 1) and its nnabla code round half
away from zero (``sign(x) * floor(|x| + 1/2)``). A bit-exact port must use the paper's mode.
"""
from __future__ import annotations

from typing import Any

import torch

ROUNDING_MODES = ("half_even", "half_away")


def round_nograd(x: torch.Tensor, mode: str = "half_even") -> torch.Tensor:
    """Round ``x`` with the given tie rule (no gradient semantics)."""
    if mode == "half_even":
        return torch.round(x)
    if mode == "half_away":
        return _round_half_away(x)
    raise ValueError(f"unknown rounding mode {mode!r}; use one of {ROUNDING_MODES}")


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    # trunc + correction is exact in float32; sign(x)*floor(|x|+0.5) is not (0.49999997 -> 1,
    # odd integers >= 2^23 -> +1) because |x|+0.5 itself rounds
    t = torch.trunc(x)
    return t + torch.sign(x) * (torch.abs(x - t) >= 0.5).to(x.dtype)


class _RoundHalfEven(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return g


class _RoundHalfAway(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return _round_half_away(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return g


class _Floor(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return torch.floor(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return g


class _Ceil(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return torch.ceil(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return g


def round_ste(x: torch.Tensor, mode: str = "half_even") -> torch.Tensor:
    """Round in the forward pass, pass the gradient through unchanged in the backward pass."""
    if mode == "half_even":
        return _RoundHalfEven.apply(x)
    if mode == "half_away":
        return _RoundHalfAway.apply(x)
    raise ValueError(f"unknown rounding mode {mode!r}; use one of {ROUNDING_MODES}")


def floor_ste(x: torch.Tensor) -> torch.Tensor:
    """``floor`` with an identity backward."""
    return _Floor.apply(x)


def ceil_ste(x: torch.Tensor) -> torch.Tensor:
    """``ceil`` with an identity backward (as nnabla's ``Ceil``, used by the learned-range code)."""
    return _Ceil.apply(x)


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, g: float) -> torch.Tensor:
        ctx.g = g
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        return grad * ctx.g, None


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """Identity in the forward pass (exactly), gradient multiplied by ``g`` in the backward (LSQ)."""
    return _GradScale.apply(x, g)
