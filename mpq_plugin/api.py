"""The native flow every integration reuses: ``quantize_`` -> train -> ``freeze``."""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from mpq_plugin.config import Budget, BitPlan, LayerBits, MPQConfig
from mpq_plugin.nn.costing import cost_tensors, model_cost, quant_sites
from mpq_plugin.nn.fake_quantizer import FakeQuantizer, QuantizerSpec
from mpq_plugin.nn.layers import QUANT_LAYER_TYPES, quant_layers, to_float, wrap_layer
from mpq_plugin.nn.matching import LayerSettings, resolve_layer
from mpq_plugin.registry import get_method

log = logging.getLogger(__name__)


def make_quantizer(config: MPQConfig, role: str, bits: Tuple[int, int], *,
                   signed: Optional[bool] = None, channels: Optional[int] = None,
                   axis: int = 0, shape: Optional[Tuple[int, ...]] = None) -> FakeQuantizer:
    """Build the configured method's quantizer for one tensor (used by every integration)."""
    spec = get_method(config.method)
    qspec = QuantizerSpec(role=role, bits=bits, signed=signed, channels=channels, axis=axis, shape=shape)
    return spec.quantizer_cls(qspec, config.method_options)


def _layer_quantizers(module: nn.Module, settings: LayerSettings, config: MPQConfig):
    weight = module.weight
    per_channel = config.per_channel and get_method(config.method).quantizer_cls.supports_per_channel
    if config.per_channel and not per_channel:
        raise ValueError(f"method {config.method!r} quantizes weights per tensor only; set per_channel=False")
    wq = make_quantizer(config, "weight", settings.weight_bits, signed=True,
                        channels=weight.shape[0] if per_channel else None, axis=0,
                        shape=tuple(weight.shape))
    aq = None
    if settings.act_bits is not None and not isinstance(module, nn.Embedding):
        aq = make_quantizer(config, "act", settings.act_bits, signed=None).to(weight.device)
    return wq.to(weight.device), aq


def check_finite_weights(model: nn.Module) -> None:
    """Raise ``ValueError`` naming the first parameter with NaN/Inf values."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ValueError(f"parameter {name!r} contains NaN or Inf; fix or reload the float model before quantizing")


def quantize_(model: nn.Module, config: MPQConfig, example_inputs: Optional[Tuple[Any, ...]] = None) -> nn.Module:
    """Swap supported layers of ``model`` (in place) for quantized ones.

    Conv1d/Conv2d/Linear (and Embedding with ``quantize_embeddings``) matching the config get
    a weight quantizer and, unless ``act_bits is None``, an input-activation quantizer of the
    configured method. Parameters are shared, so state-dict keys and optimizers stay valid.

    Args:
        model: the float model (modified in place and returned).
        config: an :class:`MPQConfig`.
        example_inputs: optional tuple of inputs; one no-grad forward calibrates activation
            quantizers, records layer shapes and checks that activation/BOPs budgets are feasible.

    Raises:
        TypeError: ``config`` is not an MPQConfig.
        ValueError: no quantizable layer, NaN/Inf weights, or an infeasible budget.

    Example:
        >>> import torch, mpq_plugin
        >>> m = torch.nn.Sequential(torch.nn.Linear(8, 4))
        >>> _ = mpq_plugin.quantize_(m, mpq_plugin.MPQConfig(method="lsq", weight_bits=4))
    """
    if not isinstance(config, MPQConfig):
        raise TypeError(f"config must be an mpq_plugin.MPQConfig, got {type(config).__name__}")
    check_finite_weights(model)
    targets = tuple(t for t in QUANT_LAYER_TYPES if t is not nn.Embedding or config.quantize_embeddings)
    if type(model) in targets:
        raise TypeError("quantize_ replaces submodules: wrap a single layer in nn.Sequential first")
    swapped = 0
    for name, module in list(model.named_modules()):
        if type(module) not in targets:
            continue
        settings = resolve_layer(name, config)
        if settings is None:
            continue
        wq, aq = _layer_quantizers(module, settings, config)
        model.set_submodule(name, wrap_layer(module, wq, aq))
        swapped += 1
    if swapped == 0:
        raise ValueError(
            "no quantizable layer found: mpq_plugin quantizes nn.Conv1d, nn.Conv2d, nn.Linear"
            " (and nn.Embedding with quantize_embeddings=True); check include/exclude patterns"
        )
    model._mpq_config = config  # type: ignore[assignment]
    log.info("quantize_: %d layers use method %r", swapped, config.method)
    if example_inputs is not None:
        calibrate(model, example_inputs)
    if config.budget is not None:
        check_budget_feasible(model, config.budget, shapes_known=example_inputs is not None)
    return model


def calibrate(model: nn.Module, example_inputs: Tuple[Any, ...]) -> None:
    """One no-grad forward in eval mode: initializes activation quantizers and records layer
    shapes without touching BatchNorm running statistics; restores each module's mode."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for m, training in modes.items():
            m.training = training


def check_budget_feasible(model: nn.Module, budget: Budget, shapes_known: bool = True) -> None:
    """Raise ``ValueError`` when even the minimum bits of every layer exceed the budget."""
    needs_shapes = {"act_kb_sum", "act_kb_max", "bops"}
    if not shapes_known and not any(k not in needs_shapes for k, _ in budget.items()):
        return
    try:
        totals = cost_tensors(model, bits="min").totals()
    except RuntimeError:  # conv shapes unknown without a forward pass
        return
    for key, limit in budget.items():
        if key in needs_shapes and not shapes_known:
            continue
        lowest = float(totals[key])
        if lowest > limit * (1 + 1e-6):
            raise ValueError(
                f"budget {key}={limit:g} is below the minimum achievable {lowest:.6g} "
                f"(every layer at its minimum bits); raise the budget or lower the minimum bits"
            )


def freeze(model: nn.Module) -> BitPlan:
    """End the search: fix every quantizer's bit-width and return the :class:`BitPlan`.

    Further training finetunes at these bits. The plan carries the achieved cost and, when the
    config has a budget, the slack per constraint (``slack_<name>`` = limit - achieved).
    """
    layers: Dict[str, LayerBits] = {}
    sites = dict(quant_sites(model))  # own layers and host-placed ones (torch.ao, PT2E)
    for name, layer in sites.items():
        layer.weight_quantizer.fix_bits()
        if layer.input_quantizer is not None:
            layer.input_quantizer.fix_bits()
    cost = model_cost(model)
    for name, info in cost["layers"].items():  # type: ignore[union-attr]
        aq = sites[name].input_quantizer
        layers[name] = LayerBits(int(round(info["weight_bits"])),
                                 int(round(info["act_bits"])) if aq is not None else None,
                                 int(info["weight_params"]))
    config: Optional[MPQConfig] = getattr(model, "_mpq_config", None)
    summary = {k: v for k, v in cost.items() if isinstance(v, (int, float))}
    budget = config.budget if config is not None else None
    if budget is not None:
        for key, limit in budget.items():
            summary[f"slack_{key}"] = limit - float(summary[key])
            if summary[f"slack_{key}"] < -1e-9:
                log.warning("frozen plan exceeds the budget: %s=%.4g > %.4g", key, summary[key], limit)
    return BitPlan(layers, method=config.method if config else "", cost=summary, budget=budget)


def dequantize_(model: nn.Module) -> nn.Module:
    """Undo :func:`quantize_`: every quantized layer back to its float class (in place)."""
    for name, layer in list(quant_layers(model)):
        model.set_submodule(name, to_float(layer))
    if hasattr(model, "_mpq_config"):
        del model._mpq_config
    return model
