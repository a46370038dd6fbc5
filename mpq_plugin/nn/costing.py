"""Cost of a quantized model from its layers' geometry and their quantizers' bit-widths.

``cost_tensors`` keeps the autograd graph from ``bit_width()`` so search penalties can
back-propagate into learned bit-widths; ``model_cost`` is its plain-number report.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import nn

from mpq_plugin.core import cost as C
from mpq_plugin.core.cost import LayerGeometry
from mpq_plugin.nn.fake_quantizer import FakeQuantizer
from mpq_plugin.nn.layers import QuantEmbedding, quant_layers

FLOAT_BITS = 32.0


@dataclass
class QuantSite:
    """A quantized layer that is not an mpq_plugin ``QuantLayer`` (e.g. a torch.ao QAT module
    holding our fake-quant), as a cost provider reports it. It has what costing and the search
    read from a quantized layer: ``weight_quantizer``, ``input_quantizer`` and ``geometry(name)``
    (lazy: shapes may only be known after a forward pass, so it may raise ``RuntimeError``)."""

    weight_quantizer: FakeQuantizer
    input_quantizer: Optional[FakeQuantizer]
    geometry_fn: Callable[[str], LayerGeometry]
    is_embedding: bool = False

    def geometry(self, name: str = "") -> LayerGeometry:
        return self.geometry_fn(name)


CostProvider = Callable[[nn.Module], Iterable[Tuple[str, QuantSite]]]
_COST_PROVIDERS: List[CostProvider] = []


def register_cost_provider(fn: CostProvider) -> CostProvider:
    """Let costing and the search see quantized layers that a host framework placed:
    ``fn(model)`` yields ``(name, QuantSite)`` pairs. Idempotent; usable as a decorator."""
    if fn not in _COST_PROVIDERS:
        _COST_PROVIDERS.append(fn)
    return fn


def quant_sites(model: nn.Module) -> Iterator[Tuple[str, object]]:
    """``(name, layer)`` for every quantized layer: mpq_plugin's own ``QuantLayer`` modules, then
    the sites of each registered cost provider (a weight quantizer is reported once)."""
    seen = set()
    for name, layer in quant_layers(model):
        seen.add(id(layer.weight_quantizer))
        yield name, layer
    for fn in _COST_PROVIDERS:
        for name, site in fn(model):
            if id(site.weight_quantizer) not in seen:
                seen.add(id(site.weight_quantizer))
                yield name, site


@dataclass
class CostTensors:
    """Per-layer geometry and bit-widths (tensors, differentiable) of a quantized model."""

    names: List[str]
    geometry: List[LayerGeometry]
    weight_bits: torch.Tensor  # (L,)
    act_bits: torch.Tensor  # (L,), 32 for float inputs
    act_layers: List[int]  # indices of layers with an input activation (not embeddings)

    def totals(self) -> Dict[str, torch.Tensor]:
        g, wb, ab = self.geometry, self.weight_bits, self.act_bits
        idx = self.act_layers
        act_numel = [g[i].act_numel for i in idx]
        act_b = ab[idx] if idx else ab[:0]
        return {
            "avg_weight_bits": C.avg_weight_bits(g, wb),
            "weight_kb": C.weight_kb(g, wb),
            "act_kb_sum": C.activation_kb(act_numel, act_b, "sum"),
            "act_kb_max": C.activation_kb(act_numel, act_b, "max"),
            "bops": C.bops(g, wb, ab),
        }


def cost_tensors(model: nn.Module, bits: str = "current") -> CostTensors:
    """Collect geometry and bit-widths of every quantized layer.

    Args:
        bits: ``current`` (the quantizers' ``bit_width()``), ``min`` or ``max`` (the bit ranges'
            ends, for feasibility checks).
    """
    names, geoms, wbits, abits, act_layers = [], [], [], [], []
    for i, (name, layer) in enumerate(quant_sites(model)):
        names.append(name)
        geoms.append(layer.geometry(name))
        wbits.append(_bits(layer.weight_quantizer, bits))
        aq = layer.input_quantizer
        abits.append(_bits(aq, bits) if aq is not None else torch.tensor(FLOAT_BITS))
        if not (isinstance(layer, QuantEmbedding) or getattr(layer, "is_embedding", False)):
            act_layers.append(i)
    if not names:
        raise ValueError("the model has no quantized layer; call mpq_plugin.quantize_(model, config) first")
    dev = wbits[0].device
    return CostTensors(names, geoms, torch.stack([w.to(dev).float() for w in wbits]),
                       torch.stack([a.to(dev).float() for a in abits]), act_layers)


def _bits(q: nn.Module, which: str) -> torch.Tensor:
    if which == "current":
        return q.bit_width()
    lo, hi = q.spec.bits
    return torch.tensor(float(lo if which == "min" else hi))


def model_cost(model: nn.Module, example_inputs: Optional[tuple] = None, bits: str = "current") -> Dict[str, object]:
    """Cost report of a quantized model as plain numbers.

    Returns a dict with ``avg_weight_bits``, ``weight_kb``, ``float_weight_kb``, ``act_kb_sum``,
    ``act_kb_max``, ``bops`` and ``layers`` (per-layer bits, parameters, MACs).
    ``example_inputs`` runs one no-grad forward first when layers have not seen data yet.
    """
    if example_inputs is not None:
        with torch.no_grad():
            model(*example_inputs)
    with torch.no_grad():
        ct = cost_tensors(model, bits)
        out: Dict[str, object] = {k: float(v) for k, v in ct.totals().items()}
        out["float_weight_kb"] = float(C.weight_kb(ct.geometry, [FLOAT_BITS] * len(ct.geometry)))
        out["weight_params"] = C.weight_params(ct.geometry, count_bias=False)
        out["layers"] = {
            n: {"weight_bits": float(ct.weight_bits[i]), "act_bits": float(ct.act_bits[i]),
                "weight_params": g.weight_numel, "bias_params": g.bias_numel, "macs": g.macs,
                "act_numel": g.act_numel}
            for i, (n, g) in enumerate(zip(ct.names, ct.geometry))
        }
    return out
