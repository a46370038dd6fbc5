"""``torch.compile`` of the pure core functions (the fast CPU path), one cached graph per op.

Built lazily on first use and cached per process (inductor also caches on disk). Numeric
arguments that carry a bit-width (zero points, integer bounds, PACT levels) are passed as 0-dim
tensors, so a changing bit-width never recompiles (Python floats would be specialised into the
graph). Compiling the reference itself keeps the result bit-identical to eager for the
elementwise quantizers: inductor does not reassociate float ops (CSQ's plane sum is a reduction
and matches to float tolerance only, see ``docs/kernels.md``).
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Dict, Sequence, Union

import torch
import torch._functorch.config as _functorch_config

from mpq_plugin.core.bitplane import bitplane_weight_fused
from mpq_plugin.core.range_quant import pow2_fake_quant_fused
from mpq_plugin.kernels import reference

_LOCK = threading.Lock()
_CACHE: Dict[str, Callable] = {}

#: positions of the numeric (bit-width carrying) arguments turned into 0-dim tensors, per op
TENSOR_ARGS: Dict[str, Sequence[int]] = {
    "fake_quantize": (2, 3, 4),
    "sdq_select": (5, 6, 7, 8),
    "sdq_interpolate": (4, 5, 6, 7),
    "uniform_fake_quant": (),
    "pow2_fake_quant": (),
    "bitplane_weight": (),
    "pact_quantize": (2, 3, 4),
}


#: ops compiled from an equivalent fused form instead of the reference itself (see its docstring)
FUSED_FORMS: Dict[str, Callable] = {"bitplane_weight": bitplane_weight_fused, "pow2_fake_quant": pow2_fake_quant_fused}


def compiled_fn(op: str) -> Callable:
    """The cached ``torch.compile`` of the reference function of ``op`` (or its fused form)."""
    fn = _CACHE.get(op)
    if fn is None:
        with _LOCK:
            fn = _CACHE.get(op)
            if fn is None:
                fn = torch.compile(FUSED_FORMS.get(op) or getattr(reference, op), dynamic=None)
                _CACHE[op] = fn
    return fn


def _as_tensor(v: Union[torch.Tensor, float], x: torch.Tensor) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v
    return torch.tensor(float(v), dtype=x.dtype, device=x.device)


def run(op: str, *args: Any) -> torch.Tensor:
    """Run ``op`` compiled, with its bit-width arguments as 0-dim tensors (same bits as eager).

    Compiled (and recompiled) with ``activation_memory_budget=0``: the partitioner then saves
    only the inputs and recomputes the rest in the backward instead of storing masks, codes and
    transcendental results from the forward (it would otherwise keep several tensors the size of
    ``x``). One read of ``x`` forward and one read of ``x`` and the gradient backward is what
    these bandwidth-bound ops need: measured 2-8x faster fwd+bwd on CPU (``docs/kernels.md``).
    """
    x = args[0]
    pos = TENSOR_ARGS[op]
    # parameters enter as plain views: dynamo keeps a parameter's shape static (one graph per weight
    # shape, and a model with many shapes hits the recompile limit); a view's shape may go dynamic
    args = tuple(_as_tensor(a, x) if i in pos else (a.view_as(a) if isinstance(a, torch.nn.Parameter) else a)
                 for i, a in enumerate(args))
    if not hasattr(_functorch_config, "activation_memory_budget"):  # older torch: default partitioner
        return compiled_fn(op)(*args)
    with _functorch_config.patch(activation_memory_budget=0.0):
        return compiled_fn(op)(*args)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: Union[torch.Tensor, float],
                  qmin: Union[torch.Tensor, float], qmax: Union[torch.Tensor, float],
                  rounding: str = "half_even") -> torch.Tensor:
    """Same contract and same bits as :func:`mpq_plugin.core.affine.fake_quantize`, compiled."""
    return run("fake_quantize", x, scale, zero_point, qmin, qmax, rounding)


def reset() -> None:
    """Drop the cached compiled functions (tests; after ``torch._dynamo.reset()``)."""
    with _LOCK:
        _CACHE.clear()
