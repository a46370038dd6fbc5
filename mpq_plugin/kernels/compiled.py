"""``torch.compile`` of the pure core fake-quant function (the fast CPU path).

Built lazily on first use and cached per process (inductor also caches on disk). ``zero_point``,
``qmin`` and ``qmax`` are passed as 0-dim tensors, so a changing bit-width never recompiles
(Python floats would be specialised into the graph). Compiling the reference itself keeps the
result bit-identical to eager: inductor does not reassociate float ops.
"""
from __future__ import annotations

import threading
from typing import Callable, Dict, Union

import torch

from mpq_plugin.core.affine import fake_quantize as _reference

_LOCK = threading.Lock()
_CACHE: Dict[str, Callable] = {}


def _compiled() -> Callable:
    fn = _CACHE.get("fake_quantize")
    if fn is None:
        with _LOCK:
            fn = _CACHE.get("fake_quantize")
            if fn is None:
                fn = torch.compile(_reference, dynamic=None)
                _CACHE["fake_quantize"] = fn
    return fn


def _as_tensor(v: Union[torch.Tensor, float], x: torch.Tensor) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v
    return torch.tensor(float(v), dtype=x.dtype, device=x.device)


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: Union[torch.Tensor, float],
    qmin: Union[torch.Tensor, float],
    qmax: Union[torch.Tensor, float],
    rounding: str = "half_even",
) -> torch.Tensor:
    """Same contract and same bits as :func:`mpq_plugin.core.affine.fake_quantize`, compiled."""
    return _compiled()(x, scale, _as_tensor(zero_point, x), _as_tensor(qmin, x), _as_tensor(qmax, x), rounding)


def reset() -> None:
    """Drop the cached compiled function (tests; after ``torch._dynamo.reset()``)."""
    with _LOCK:
        _CACHE.clear()
