"""``MPQObserver``: an observer for torch.ao and torchao PT2E slots that keeps a bounded sample of
what it saw, gives MSE-optimal qparams, suggests a starting bit-width, and initializes mpq
quantizers (our fake-quants use it on their first batches)."""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.ao.quantization.observer import ObserverBase as _TQObserverBase
from torch.ao.quantization.observer import _with_args as _tq_with_args

try:  # torchao's PT2E base: PT2E prepare accepts subclasses of its ObserverBase
    from torchao.quantization.pt2e import ObserverBase as _AOObserverBase

    _BASES: Tuple[type, ...] = (_AOObserverBase, _TQObserverBase)
except ImportError:  # pragma: no cover - torchao is optional
    _BASES = (_TQObserverBase,)

__all__ = ["MPQObserver", "mse_optimal_qparams"]

_SIGNED = (torch.qint8, torch.int8, torch.qint32, torch.int32, torch.int16)


def _grid_mse(x: torch.Tensor, qmin: int, qmax: int, signed: bool, steps: int = 100):
    """Best ``(mse, scale, zero_point)`` over clip fractions ``k/steps`` of max|x| (signed:
    symmetric; unsigned: affine over ``[min(x,0)*f, max(x,0)*f]``)."""
    x = x.detach().float().reshape(-1)
    lo, hi = float(min(x.min(), 0.0)), float(max(x.max(), 0.0))
    fr = torch.arange(1, steps + 1, dtype=torch.float32) / steps
    best = (math.inf, 1.0, 0)
    for f in fr.tolist():
        if signed:
            m = max(abs(lo), abs(hi)) * f
            scale = max(m / ((qmax - qmin) / 2), 1e-12)
            zp = 0
        else:
            scale = max((hi - lo) * f / (qmax - qmin), 1e-12)
            zp = int(min(max(qmin - round(lo * f / scale), qmin), qmax))
        q = torch.clamp(torch.round(x / scale) + zp, qmin, qmax)
        mse = float(((q - zp) * scale - x).pow(2).mean())
        if mse < best[0]:
            best = (mse, scale, zp)
    return best


def mse_optimal_qparams(x: torch.Tensor, quant_min: int, quant_max: int, signed: bool):
    """``(scale, zero_point, mse)`` minimizing the fake-quant MSE of ``x`` (grid search)."""
    mse, scale, zp = _grid_mse(x, quant_min, quant_max, signed)
    return scale, zp, mse


class MPQObserver(*_BASES):  # type: ignore[misc]
    """Records running min/max and a seeded random subsample (at most ``max_samples`` values);
    ``calculate_qparams`` is MSE-optimal for ``[quant_min, quant_max]``.

    Accepts what the hosts pass (``dtype, qscheme, quant_min, quant_max, is_dynamic, eps,
    ch_axis, ...``); per-tensor only (``ch_axis`` is recorded, qparams are per tensor).
    """

    def __init__(self, dtype: torch.dtype = torch.quint8, qscheme: Optional[torch.qscheme] = None,
                 quant_min: Optional[int] = None, quant_max: Optional[int] = None, is_dynamic: bool = False,
                 eps: float = torch.finfo(torch.float32).eps, ch_axis: Optional[int] = None,
                 max_samples: int = 65536, seed: int = 0, **kwargs: Any) -> None:
        nn.Module.__init__(self)  # the two bases' __init__ chains do not cooperate
        if is_dynamic:
            raise ValueError("MPQObserver computes static qparams; is_dynamic=True is not supported")
        self.dtype = dtype
        self.is_dynamic = False
        self.signed = dtype in _SIGNED
        if quant_min is None or quant_max is None:
            quant_min, quant_max = (-128, 127) if self.signed else (0, 255)
        self.quant_min, self.quant_max = int(quant_min), int(quant_max)
        self.qscheme = qscheme or (torch.per_tensor_symmetric if self.signed else torch.per_tensor_affine)
        self.eps = float(eps)
        self.ch_axis = ch_axis
        self.max_samples = int(max_samples)
        self._gen = torch.Generator().manual_seed(int(seed))
        self._seen = 0
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self.register_buffer("sample", torch.empty(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return x
        v = x.detach().float().reshape(-1).cpu()
        self.min_val = torch.minimum(self.min_val, v.min())
        self.max_val = torch.maximum(self.max_val, v.max())
        # reservoir-style: keep each value with probability max_samples / values seen so far
        self._seen += v.numel()
        keep = min(1.0, self.max_samples / self._seen)
        if keep < 1.0:
            v = v[torch.rand(v.numel(), generator=self._gen) < keep]
        s = torch.cat([self.sample, v])
        if s.numel() > self.max_samples:
            s = s[torch.randperm(s.numel(), generator=self._gen)[: self.max_samples]]
        self.sample = s
        return x

    def _need_sample(self) -> torch.Tensor:
        if self.sample.numel() == 0:
            raise RuntimeError("MPQObserver has not seen data yet: run calibration batches first")
        return self.sample

    @torch.jit.export
    def calculate_qparams(self) -> Tuple[torch.Tensor, torch.Tensor]:
        scale, zp, _ = mse_optimal_qparams(self._need_sample(), self.quant_min, self.quant_max, self.signed)
        return torch.tensor([max(scale, self.eps)], dtype=torch.float32), torch.tensor([zp], dtype=torch.int32)

    def sqnr_db(self, bits: int) -> float:
        """SQNR (dB) of the sample at its MSE-optimal ``bits``-bit quantization."""
        x = self._need_sample()
        qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if self.signed else (0, 2**bits - 1)
        _, _, mse = mse_optimal_qparams(x, qmin, qmax, self.signed)
        return 10 * math.log10(float(x.pow(2).mean()) / max(mse, 1e-30))

    def suggest_bits(self, bits: Sequence[int] = (2, 8), sqnr_db: float = 30.0) -> int:
        """Smallest bit-width in ``bits=(lo, hi)`` whose MSE-optimal SQNR reaches ``sqnr_db`` (else hi)."""
        lo, hi = int(bits[0]), int(bits[1])
        for b in range(lo, hi + 1):
            if self.sqnr_db(b) >= sqnr_db:
                return b
        return hi

    def initialize(self, quantizer: nn.Module, sqnr_db: float = 30.0) -> nn.Module:
        """Initialize an mpq quantizer from the sample; a bit-searching one with ``force_bits``
        starts at :meth:`suggest_bits` (clipped to its range)."""
        x = self._need_sample()
        with torch.no_grad():
            quantizer._initialize_from(x.to(next(iter(quantizer.buffers()), x).device))
            if getattr(quantizer, "searches_bits", False) and hasattr(quantizer, "force_bits"):
                spec = getattr(quantizer, "spec", None)
                rng = tuple(getattr(spec, "bits", (2, 8))) if spec is not None else (2, 8)
                quantizer.force_bits(self.suggest_bits(rng, sqnr_db))
        return quantizer

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}, quant_min={self.quant_min}, quant_max={self.quant_max}, samples={self.sample.numel()}"

    tq_with_args = classmethod(_tq_with_args)
