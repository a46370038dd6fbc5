"""Tracing entry points for the graph flows that say what to do when a model cannot be traced.

FX (``prepare_qat_fx``) and ``torch.export`` (PT2E) need a traceable ``forward``: data-dependent
Python control flow (``if x.sum() > 0``), unsupported Python calls and the like fail deep inside
the tracer. These wrappers call the host API unchanged and, on a tracing failure, raise a
``ValueError`` naming the layer-level flows that need no tracing: torch.ao eager ``prepare_qat``
with ``get_mpq_qat_qconfig`` or torchao ``quantize_`` with ``MPQQATConfig``.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

__all__ = ["export_for_mpq_qat", "prepare_mpq_qat_fx"]

_EAGER_HINT = ("use a flow that needs no tracing: torch.ao eager mode (model.qconfig = "
               "mpq_plugin.ao.get_mpq_qat_qconfig(method=...); torch.ao.quantization.prepare_qat(model)) or torchao "
               "(quantize_(model, mpq_plugin.torchao.MPQQATConfig(method=...), filter_fn=is_quantizable)); "
               "or make forward traceable (no Python control flow on tensor values)")


def prepare_mpq_qat_fx(model: nn.Module, qconfig_mapping: Any, example_inputs: Tuple[Any, ...],
                       **kwargs: Any) -> nn.Module:
    """``torch.ao.quantization.quantize_fx.prepare_qat_fx``; a model FX cannot trace raises a
    ``ValueError`` pointing to the eager path (the tracer's error is chained)."""
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    try:
        return prepare_qat_fx(model, qconfig_mapping, example_inputs, **kwargs)
    except (torch.fx.proxy.TraceError, TypeError, NotImplementedError, RuntimeError) as e:
        raise ValueError(f"torch.fx cannot trace {type(model).__name__} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); {_EAGER_HINT}") from e


def export_for_mpq_qat(model: nn.Module, example_inputs: Tuple[Any, ...], dynamic_batch: bool = True,
                       dynamic_shapes: Optional[Dict[str, Any]] = None, **kwargs: Any) -> nn.Module:
    """``torch.export.export(model, example_inputs, ...).module()`` for ``prepare_qat_pt2e``, with a
    dynamic batch dimension on every tensor input by default (export would otherwise specialize the
    batch size). A model torch.export cannot trace raises a ``ValueError`` pointing to the eager
    path (the exporter's error is chained)."""
    if dynamic_shapes is None and dynamic_batch:
        batch = torch.export.Dim("batch")
        dynamic_shapes = tuple({0: batch} if isinstance(a, torch.Tensor) else None for a in example_inputs)
    try:
        return torch.export.export(model, tuple(example_inputs), dynamic_shapes=dynamic_shapes, **kwargs).module()
    except Exception as e:  # torch.export raises many types (UserError, Unsupported, GuardOnDataDependent...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"torch.export cannot trace {type(model).__name__} ({type(e).__name__}: {first}); "
                         f"{_EAGER_HINT}") from e
