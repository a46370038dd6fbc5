"""Baselines in the same harness, so every report compares learned MPQ with the incumbents at
equal budget.

* Uniform LSQ QAT at fixed bits (:func:`uniform_config`), at the largest uniform width a budget
  allows (:func:`uniform_bits_for_budget`).
* Round-to-nearest post-training quantization (:func:`rtn_ptq_`): LSQ quantizers with
  ``init="minmax"`` (``s = max|x| / Q_P``), activation ranges calibrated on a few batches of the
  float model, no training.
* HAWQ-V3-style allocation (:func:`hawq_allocate`): per-layer Hessian traces by Hutchinson's
  estimator (:func:`hutchinson_trace`), sensitivity ``Omega_l(b) = Tr(H_l)/n_l * ||Q_b(W_l) - W_l||^2``
  with ``Q_b`` symmetric round-to-nearest, and an integer linear program (:func:`solve_bit_ilp`,
  pulp + CBC) minimizing ``sum_l Omega_l(b_l)`` under the budget; :func:`hawq_config` turns the
  allocation into a uniform-LSQ-QAT config with per-layer bits.

Costs use the same geometry functions as :func:`mpq_plugin.model_cost`, so a plan's cost here
equals the cost ``freeze`` reports after ``quantize_`` with the matching config.
"""
from __future__ import annotations

import logging
import math
import re
import warnings
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from mpq_plugin.config import BitPlan, BitRange, Budget, LayerBits, MPQConfig
from mpq_plugin.core import cost as C
from mpq_plugin.core.affine import int_range, quantize_codes
from mpq_plugin.core.cost import LayerGeometry, conv_geometry, linear_geometry
from mpq_plugin.core.state import QuantState
from mpq_plugin.nn.costing import FLOAT_BITS
from mpq_plugin.nn.layers import quant_layers
from mpq_plugin.nn.matching import resolve_layer

log = logging.getLogger(__name__)

#: float layer types the baselines allocate bits to (exact type match, as ``quantize_``)
BASELINE_LAYER_TYPES: Tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Linear)
#: budget keys that need per-sample activation shapes (one forward pass)
SHAPE_KEYS = ("act_kb_sum", "act_kb_max", "bops")
#: relative tolerance when comparing a cost with a budget limit (as ``check_budget_feasible``)
BUDGET_RTOL = 1e-6
_PULP_HINT = "pip install mpq_plugin[search]"

LossFn = Callable[..., torch.Tensor]


# ---------------------------------------------------------------------------------------------
# layer geometry and cost of a bit assignment
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Layer:
    """One quantizable layer as the baselines see it."""

    name: str
    module: nn.Module
    geometry: LayerGeometry
    weight_bits: BitRange
    act_bits: Optional[int]


def _fixed_act_bits(name: str, act: Optional[BitRange]) -> Optional[int]:
    if act is None:
        return None
    if act[0] != act[1]:
        raise ValueError(f"layer {name!r}: baselines use fixed activation bits, got the range {act}; "
                         f"set act_bits (or the layer's override) to one integer")
    return act[0]


def _batch_input(batch: Any) -> Any:
    """The model input of a batch: ``x`` of an ``(x, y)`` pair, else the batch itself."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _run(model: nn.Module, x: Any) -> Any:
    return model(*x) if isinstance(x, tuple) else model(x)


def _layers(model: nn.Module, config: MPQConfig, example_input: Any = None) -> Tuple[List[_Layer], bool]:
    """Conv1d/Conv2d/Linear layers of a float model that ``quantize_(model, config)`` would
    swap, with their geometry. Shapes come from one no-grad eval forward of ``example_input``;
    without it, MACs and activation sizes are 0 and the second return value is ``False``."""
    found: List[Tuple[str, nn.Module, BitRange, Optional[int]]] = []
    for name, module in model.named_modules():
        if type(module) not in BASELINE_LAYER_TYPES:
            continue
        settings = resolve_layer(name, config)
        if settings is None:
            continue
        found.append((name, module, settings.weight_bits, _fixed_act_bits(name, settings.act_bits)))
    if not found:
        raise ValueError("no quantizable layer found: the baselines allocate bits to nn.Conv1d, nn.Conv2d "
                         "and nn.Linear layers; check the model and the include/exclude patterns")
    shapes: Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]] = {}
    if example_input is not None:
        def hook(name: str) -> Callable[..., None]:
            def record(_m: nn.Module, inp: Tuple[Any, ...], out: torch.Tensor) -> None:
                shapes[name] = (tuple(inp[0].shape[1:]), tuple(out.shape[1:]))  # per sample
            return record

        handles = [m.register_forward_hook(hook(n)) for n, m, _, _ in found]
        was_training = model.training
        try:
            model.eval()
            with torch.no_grad():
                _run(model, example_input)
        finally:
            model.train(was_training)
            for h in handles:
                h.remove()
    layers = []
    for name, module, wbits, abits in found:
        layers.append(_Layer(name, module, _geometry(name, module, shapes.get(name)), wbits, abits))
    shapes_known = example_input is not None and all(l.name in shapes for l in layers)
    if example_input is not None and not shapes_known:
        missing = [l.name for l in layers if l.name not in shapes]
        log.warning("layers %s did not run on the example input: their MACs/activation sizes count as 0", missing)
    return layers, shapes_known


def _geometry(name: str, m: nn.Module, shapes: Optional[Tuple[Tuple[int, ...], Tuple[int, ...]]]) -> LayerGeometry:
    has_bias = getattr(m, "bias", None) is not None
    if isinstance(m, nn.Linear):
        in_shape = shapes[0] if shapes is not None else (m.in_features,)
        return linear_geometry(name, m.in_features, m.out_features, has_bias, in_shape)
    w_shape = tuple(m.weight.shape)  # type: ignore[union-attr, arg-type]
    if shapes is None:  # weight-only geometry: MACs and activation size unknown
        kind = "conv1d" if len(w_shape) == 3 else "conv2d"
        return LayerGeometry(name, kind, math.prod(w_shape), w_shape[0] if has_bias else 0, 0, 0)
    return conv_geometry(name, w_shape, has_bias, int(m.groups), shapes[0], shapes[1])  # type: ignore[arg-type]


def plan_cost(geometry: Sequence[LayerGeometry], weight_bits: Sequence[float],
              act_bits: Sequence[Optional[int]], shapes_known: bool = True) -> Dict[str, float]:
    """Cost of a per-layer bit assignment, computed exactly as :func:`mpq_plugin.model_cost`
    does (``act_bits`` ``None`` means float inputs, counted at 32 bits).

    Without known shapes only ``avg_weight_bits`` and ``weight_kb`` are reported.
    """
    wb = [float(b) for b in weight_bits]
    ab = [FLOAT_BITS if a is None else float(a) for a in act_bits]
    out = {"avg_weight_bits": float(C.avg_weight_bits(geometry, wb)),
           "weight_kb": float(C.weight_kb(geometry, wb))}
    if shapes_known:
        numel = [g.act_numel for g in geometry]
        out["act_kb_sum"] = float(C.activation_kb(numel, ab, "sum"))
        out["act_kb_max"] = float(C.activation_kb(numel, ab, "max"))
        out["bops"] = float(C.bops(geometry, wb, ab))
    return out


def _check_shape_keys(budget: Budget, shapes_known: bool, how: str) -> None:
    needs = [k for k, _ in budget.items() if k in SHAPE_KEYS]
    if needs and not shapes_known:
        raise ValueError(f"budget {needs} needs activation shapes and MACs: {how}")


def _within(value: float, limit: float) -> bool:
    return value <= limit * (1 + BUDGET_RTOL)


# ---------------------------------------------------------------------------------------------
# uniform LSQ
# ---------------------------------------------------------------------------------------------
def uniform_config(bits: int, act_bits: Optional[int] = 8, **kw: Any) -> MPQConfig:
    """Uniform LSQ QAT config: every matched layer at ``bits`` weight bits.

    Args:
        bits: weight bit-width of every layer.
        act_bits: activation bit-width (``None``: float activations).
        **kw: other :class:`MPQConfig` fields (``per_channel``, ``exclude``, ``budget``, ``options``...).

    Example:
        >>> uniform_config(4).weight_bits
        (4, 4)
    """
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"bits must be one integer for a uniform baseline, got {bits!r}")
    if act_bits is not None and (isinstance(act_bits, bool) or not isinstance(act_bits, int)):
        raise TypeError(f"act_bits must be one integer or None for a uniform baseline, got {act_bits!r}")
    return MPQConfig(method="lsq", weight_bits=bits, act_bits=act_bits, **kw)


def uniform_bits_for_budget(model_or_layers: Union[nn.Module, Sequence[LayerGeometry]], budget: Budget, *,
                            act_bits: Optional[int] = 8, example_inputs: Optional[Tuple[Any, ...]] = None,
                            config: Optional[MPQConfig] = None, min_bits: int = 2, max_bits: int = 8) -> int:
    """Largest uniform weight bit-width in ``[min_bits, max_bits]`` that meets ``budget``.

    ``avg_weight_bits=3.0`` gives 3, ``2.5`` gives 2; ``weight_kb`` and ``bops`` count the
    layers' parameters (biases at the weight's bits) and MACs as :func:`mpq_plugin.model_cost`.

    Args:
        model_or_layers: a float model (its Conv1d/Conv2d/Linear layers, filtered by ``config``),
            a quantized model (its quantized layers), or a list of :class:`LayerGeometry`.
        budget: the constraints to meet.
        act_bits: activation bits of every layer, for ``bops`` and activation memory.
        example_inputs: inputs for one forward pass when the budget needs shapes (``bops``,
            ``act_kb_*``) and the model has conv layers.
        config: selects layers of a float model (include/exclude/skip), as ``quantize_`` would.
        min_bits, max_bits: the bit-widths considered (uniform baselines above 8 bits are
            float-equivalent, hence the default cap).

    Raises:
        ValueError: no bit-width in range meets the budget (the message names the minimum
            achievable cost), or the budget needs shapes that are unknown.

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> uniform_bits_for_budget(m, Budget(avg_weight_bits=2.5))
        2
    """
    if not 1 <= min_bits <= max_bits:
        raise ValueError(f"need 1 <= min_bits <= max_bits, got {min_bits}, {max_bits}")
    geometry, shapes_known = _geometry_for_budget(model_or_layers, act_bits, example_inputs, config)
    _check_shape_keys(budget, shapes_known, "pass example_inputs (one batch is enough)")
    acts: List[Optional[int]] = [None if g.kind == "embedding" else act_bits for g in geometry]
    for bits in range(max_bits, min_bits - 1, -1):
        cost = plan_cost(geometry, [bits] * len(geometry), acts, shapes_known)
        if all(_within(cost[k], limit) for k, limit in budget.items()):
            return bits
    lowest = plan_cost(geometry, [min_bits] * len(geometry), acts, shapes_known)
    failed = {k: lowest[k] for k, limit in budget.items() if not _within(lowest[k], limit)}
    raise ValueError(f"no uniform bit-width in {min_bits}..{max_bits} meets the budget {budget.to_dict()}: "
                     f"the minimum achievable (every layer at {min_bits} bits) is "
                     f"{ {k: round(v, 6) for k, v in failed.items()} }; raise the budget or lower min_bits")


def _geometry_for_budget(obj: Union[nn.Module, Sequence[LayerGeometry]], act_bits: Optional[int],
                         example_inputs: Optional[Tuple[Any, ...]],
                         config: Optional[MPQConfig]) -> Tuple[List[LayerGeometry], bool]:
    if not isinstance(obj, nn.Module):
        geometry = list(obj)
        if not geometry or not all(isinstance(g, LayerGeometry) for g in geometry):
            raise TypeError("model_or_layers must be an nn.Module or a non-empty list of LayerGeometry")
        return geometry, True
    qlayers = list(quant_layers(obj))
    if qlayers:
        if example_inputs is not None:
            with torch.no_grad():
                obj(*example_inputs)
        try:
            return [layer.geometry(name) for name, layer in qlayers], True
        except RuntimeError:  # conv layers that have not run: weight-only geometry
            return [_geometry(name, layer, None) if layer._in_shape is None  # type: ignore[arg-type]
                    else layer.geometry(name) for name, layer in qlayers], False
    match = config if config is not None else MPQConfig(method="lsq", weight_bits=(1, 16), act_bits=act_bits)
    example = example_inputs if example_inputs is None or len(example_inputs) != 1 else example_inputs[0]
    layers, shapes_known = _layers(obj, match, example)
    return [l.geometry for l in layers], shapes_known


# ---------------------------------------------------------------------------------------------
# round-to-nearest PTQ
# ---------------------------------------------------------------------------------------------
def rtn_quantize(w: torch.Tensor, bits: int, per_channel: bool = True, axis: int = 0) -> QuantState:
    """Symmetric round-to-nearest quantization of a weight: ``s = max|w| / Q_P`` (per output
    channel, or per tensor), codes ``clamp(round(w / s), -2^(b-1), 2^(b-1) - 1)``.

    It is what ``rtn_ptq_`` produces (LSQ with ``init="minmax"``) and the ``Q_b`` of the HAWQ
    sensitivity. ``.dequantize()`` gives ``Q_b(w)``.
    """
    if bits < 2:
        raise ValueError(f"bits={bits}: symmetric round-to-nearest needs at least 2 bits (1 bit has Q_P = 0)")
    with torch.no_grad():
        qmin, qmax = int_range(bits, True)
        w = w.detach()
        a = w.abs().transpose(0, axis).reshape(w.shape[axis], -1) if per_channel else w.abs().reshape(1, -1)
        scale = (a.amax(dim=1) / float(qmax)).clamp_min(1e-8)  # (C,) or (1,)
        if per_channel:
            shape = [1] * w.dim()
            shape[axis] = -1
            codes = quantize_codes(w, scale.reshape(shape), 0.0, qmin, qmax)
            return QuantState(bits, True, scale, torch.zeros_like(scale, dtype=torch.int64), codes, axis, method="rtn")
        s = scale.reshape(())
        codes = quantize_codes(w, s, 0.0, qmin, qmax)
        return QuantState(bits, True, s, torch.zeros((), dtype=torch.int64), codes, None, method="rtn")


def rtn_ptq_(model: nn.Module, bits: Union[int, Mapping[str, Any]], act_bits: Optional[int] = 8,
             per_channel: bool = True, calibration_batches: Optional[Iterable[Any]] = None,
             **config_kw: Any) -> Tuple[nn.Module, BitPlan]:
    """Round-to-nearest post-training quantization (in place): no training, the PTQ baseline.

    Weights: ``s = max|w| / Q_P`` (per channel by default), ``round(w / s)``. Activations: the
    range ``max|x|`` over all calibration batches, observed on the float model in eval mode
    with no grad (as torch.ao observers do), then ``s = max|x| / Q_P``. Bits are frozen.

    Args:
        model: the float model (modified in place).
        bits: weight bits of every layer, or a per-layer plan ``{name: bits}`` (a
            :class:`BitPlan`, whose ``act_bits`` are used too, is accepted): only those layers
            are quantized.
        act_bits: activation bits (``None``: float activations).
        per_channel: per-output-channel weight scales.
        calibration_batches: iterable of input tensors or ``(x, y)`` tuples. Without it,
            activation quantizers initialize from the first batch they see later, and conv
            models need it for the plan's cost (their shapes are unknown otherwise).
        **config_kw: other :class:`MPQConfig` fields (``exclude``, ``budget``...).

    Returns:
        ``(model, plan)``.

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Linear(8, 4))
        >>> _, plan = rtn_ptq_(m, 4, calibration_batches=[torch.randn(2, 8)])
        >>> plan["0"].weight_bits
        4
    """
    from mpq_plugin.api import freeze, quantize_  # api sits beside search in the dependency rule

    config = _rtn_config(model, bits, act_bits, per_channel, config_kw)
    batches = iter(calibration_batches) if calibration_batches is not None else iter(())
    was_training = model.training
    model.eval()
    try:
        first, ranges = _observe_input_ranges(model, batches)
        quantize_(model, config)
        for name, layer in quant_layers(model):
            aq = layer.input_quantizer
            if aq is None:
                continue
            if name in ranges:
                with torch.no_grad():
                    aq(torch.stack(ranges[name]))  # first tensor seen: initializes from the extremes
            elif first is not None:
                log.warning("rtn_ptq_: layer %r did not run on the calibration batches; its activation "
                            "quantizer initializes from the first tensor it sees", name)
        if first is not None:
            with torch.no_grad():
                _run(model, first)  # records per-sample shapes for the plan's cost
        try:
            plan = freeze(model)
        except RuntimeError as e:
            raise ValueError(f"rtn_ptq_ cannot cost the plan: {e}; pass calibration_batches") from None
    finally:
        model.train(was_training)
    plan.method = "rtn"
    return model, plan


def _rtn_config(model: nn.Module, bits: Union[int, Mapping[str, Any]], act_bits: Optional[int],
                per_channel: bool, config_kw: Dict[str, Any]) -> MPQConfig:
    if "method" in config_kw or "options" in config_kw:
        raise ValueError("rtn_ptq_ fixes method='lsq' with options={'init': 'minmax'}; do not pass them")
    common: Dict[str, Any] = dict(method="lsq", act_bits=act_bits, per_channel=per_channel,
                                  options={"init": "minmax"})
    if not isinstance(bits, Mapping):
        return MPQConfig(weight_bits=bits, **common, **config_kw)
    if not bits:
        raise ValueError("rtn_ptq_: the per-layer plan is empty")
    clash = sorted({"include", "layer_overrides", "weight_bits"} & set(config_kw))
    if clash:
        raise ValueError(f"rtn_ptq_ with a per-layer plan sets {clash} itself; do not pass them")
    modules = dict(model.named_modules())
    unknown = sorted(n for n in bits if type(modules.get(n)) not in BASELINE_LAYER_TYPES)
    if unknown:
        raise ValueError(f"per-layer plan names {unknown}, which are not Conv1d/Conv2d/Linear modules of the model")
    overrides: Dict[str, Dict[str, Any]] = {}
    for name, v in bits.items():
        if isinstance(v, LayerBits):
            overrides[name] = {"weight_bits": v.weight_bits, "act_bits": v.act_bits}
        else:
            overrides[name] = {"weight_bits": int(v)}
    low = min(int(ov["weight_bits"]) for ov in overrides.values())
    return MPQConfig(weight_bits=low, include=tuple(re.escape(n) for n in overrides),
                     layer_overrides=overrides, **common, **config_kw)


def _observe_input_ranges(model: nn.Module, batches: Iterable[Any]) -> Tuple[Any, Dict[str, List[torch.Tensor]]]:
    """Min and max of every Conv/Linear input over all batches (float model, eval, no grad)."""
    ranges: Dict[str, List[torch.Tensor]] = {}

    def hook(name: str) -> Callable[..., None]:
        def observe(_m: nn.Module, inp: Tuple[Any, ...]) -> None:
            x = inp[0].detach()
            lo, hi = x.min(), x.max()
            if name in ranges:
                lo, hi = torch.minimum(lo, ranges[name][0]), torch.maximum(hi, ranges[name][1])
            ranges[name] = [lo, hi]
        return observe

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules()
               if type(m) in BASELINE_LAYER_TYPES]
    first = None
    try:
        with torch.no_grad():
            for batch in batches:
                x = _batch_input(batch)
                first = x if first is None else first
                _run(model, x)
    finally:
        for h in handles:
            h.remove()
    return first, ranges


# ---------------------------------------------------------------------------------------------
# HAWQ-V3: Hutchinson traces, sensitivities, ILP
# ---------------------------------------------------------------------------------------------
def _loss(model: nn.Module, loss_fn: LossFn, batch: Any) -> torch.Tensor:
    """``loss_fn(model(x), y)`` for an ``(x, y)`` batch, ``loss_fn(model(x))`` for a bare input."""
    if isinstance(batch, (tuple, list)):
        if len(batch) != 2:
            raise ValueError(f"a batch must be an input tensor or an (x, y) pair, got a sequence of {len(batch)}")
        return loss_fn(_run(model, batch[0]), batch[1])
    return loss_fn(_run(model, batch))


def hutchinson_trace(model: nn.Module, loss_fn: LossFn, batches: Iterable[Any],
                     params: Mapping[str, torch.Tensor], n_samples: int = 50, seed: int = 0) -> Dict[str, float]:
    """Hessian trace of the loss per parameter block, by Hutchinson's estimator.

    ``Tr(H_l) ~ mean over batches and samples of z_l^T (H z)_l`` with Rademacher ``z`` over all
    ``params`` at once and ``H z`` by double back-propagation (one Hessian-vector product per
    sample, as PyHessian/HAWQ do; cross-block terms have zero mean). Eval mode (BatchNorm uses
    running statistics); the training flag and ``requires_grad`` are restored afterwards.

    Args:
        model: the float model.
        loss_fn: ``loss_fn(output, target)`` for ``(x, y)`` batches, ``loss_fn(output)`` for bare inputs.
        batches: iterable of batches; the estimate averages over all of them.
        params: ``{name: parameter}`` blocks whose traces are wanted (e.g. layer weights).
        n_samples: Rademacher vectors per batch.
        seed: seeds the Rademacher vectors (a private generator; global RNG untouched).

    Returns:
        ``{name: trace estimate}`` (the block's trace, not divided by its size).
    """
    if n_samples < 1:
        raise ValueError(f"n_samples={n_samples} must be >= 1")
    if not params:
        raise ValueError("params is empty: pass {name: parameter} blocks to estimate traces for")
    names = list(params)
    tensors = [params[n] for n in names]
    gen = torch.Generator().manual_seed(seed)
    sums = {n: 0.0 for n in names}
    was_training, saved_flags = model.training, [p.requires_grad for p in tensors]
    n_batches = 0
    model.eval()
    try:
        for p in tensors:
            p.requires_grad_(True)
        with torch.enable_grad():
            for batch in batches:
                n_batches += 1
                loss = _loss(model, loss_fn, batch)
                if loss.dim() != 0:
                    raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
                grads = torch.autograd.grad(loss, tensors, create_graph=True, allow_unused=True)
                # blocks whose gradient does not depend on any parameter have a zero Hessian row
                live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
                for _ in range(n_samples):
                    zs = [torch.randint(0, 2, tuple(t.shape), generator=gen).to(t) * 2 - 1 for t in tensors]
                    if not live:
                        continue
                    hz = torch.autograd.grad([grads[i] for i in live], tensors,
                                             grad_outputs=[zs[i] for i in live],
                                             retain_graph=True, allow_unused=True)
                    for i in live:
                        if hz[i] is not None:
                            sums[names[i]] += float((zs[i] * hz[i]).sum())
                del grads, loss
    finally:
        model.train(was_training)
        for p, flag in zip(tensors, saved_flags):
            p.requires_grad_(flag)
    if n_batches == 0:
        raise ValueError("batches is empty: pass at least one batch")
    return {n: s / (n_batches * n_samples) for n, s in sums.items()}


@dataclass
class HAWQResult:
    """A HAWQ-V3-style allocation.

    Attributes:
        bits: per-layer weight bits chosen by the ILP.
        traces: per-layer Hessian trace estimates ``Tr(H_l)``.
        sensitivities: ``{layer: {bits: Omega_l(bits)}}`` over the layer's candidates.
        cost: achieved cost (``avg_weight_bits``, ``weight_kb``; with shapes also
            ``act_kb_sum``, ``act_kb_max``, ``bops``), as ``model_cost`` computes it.
        status: the solver status (``"Optimal"``).
        objective: ``sum_l Omega_l(b_l)`` of the allocation.
        budget: the budget it meets.
        weight_params: weights per layer ``n_l``.
        act_bits: the default activation bits of the allocation.
        layer_act_bits: per-layer activation bits (overrides of the config included).
        per_channel: granularity of ``Q_b`` in the sensitivity (and of the QAT config).
    """

    bits: Dict[str, int]
    traces: Dict[str, float]
    sensitivities: Dict[str, Dict[int, float]]
    cost: Dict[str, float]
    status: str
    objective: float
    budget: Budget
    weight_params: Dict[str, int] = field(default_factory=dict)
    act_bits: Optional[int] = 8
    layer_act_bits: Dict[str, Optional[int]] = field(default_factory=dict)
    per_channel: bool = True

    def layer_overrides(self) -> Dict[str, Dict[str, Any]]:
        """``MPQConfig.layer_overrides`` fixing each layer's weight bits (and any per-layer
        activation bits that differ from the default)."""
        out: Dict[str, Dict[str, Any]] = {}
        for name, b in self.bits.items():
            ov: Dict[str, Any] = {"weight_bits": b}
            a = self.layer_act_bits.get(name, self.act_bits)
            if a != self.act_bits:
                ov["act_bits"] = a
            out[name] = ov
        return out

    def to_bitplan(self) -> BitPlan:
        """The allocation as a :class:`BitPlan` (method ``"hawq"``)."""
        layers = {n: LayerBits(b, self.layer_act_bits.get(n, self.act_bits), self.weight_params.get(n, 0))
                  for n, b in self.bits.items()}
        return BitPlan(layers, method="hawq", cost=dict(self.cost), budget=self.budget)


def _check_candidates(candidates: Sequence[int]) -> Tuple[int, ...]:
    cands = tuple(sorted(set(int(b) for b in candidates)))
    if not cands or cands[0] < 2 or cands[-1] > 16:
        raise ValueError(f"candidates={tuple(candidates)} must be non-empty bit-widths in 2..16 "
                         "(symmetric round-to-nearest has no level at 1 bit)")
    return cands


def hawq_allocate(model: nn.Module, loss_fn: LossFn, data: Iterable[Any], budget: Budget,
                  candidates: Sequence[int] = (2, 3, 4, 8), n_samples: int = 50, seed: int = 0, *,
                  config: Optional[MPQConfig] = None, act_bits: Optional[int] = 8, per_channel: bool = True,
                  max_batches: Optional[int] = None) -> HAWQResult:
    """HAWQ-V3-style bit allocation for a float model (before ``quantize_``).

    Per layer ``l``: ``Tr(H_l)`` by :func:`hutchinson_trace` on the layer's weight, sensitivity
    ``Omega_l(b) = Tr(H_l)/n_l * ||Q_b(W_l) - W_l||^2`` (``Q_b`` :func:`rtn_quantize`), then the
    ILP ``min sum_l Omega_l(b_l)`` subject to the budget (:func:`solve_bit_ilp`). Negative trace
    estimates (non-convex points) count as 0. Follow with :func:`hawq_config` for QAT.

    Args:
        model: the float model (not modified).
        loss_fn: ``loss_fn(output, target)`` for ``(x, y)`` batches, ``loss_fn(output)`` for bare inputs.
        data: batches (a DataLoader, a list...); the first one also gives the layer shapes
            (MACs for ``bops``, activation sizes). Use a few batches, or set ``max_batches``.
        budget: ``avg_weight_bits``, ``weight_kb``, ``bops``, ``act_kb_sum``/``act_kb_max``
            (the last two do not depend on weight bits: they are only checked).
        candidates: weight bit-widths a layer may take.
        n_samples: Rademacher vectors per batch.
        seed: seed of the estimator.
        config: selects layers (include/exclude/skip) as ``quantize_`` would; a layer's
            ``weight_bits`` range (or override) restricts its candidates, e.g.
            ``layer_overrides={"fc": {"weight_bits": 8}}`` fixes ``fc`` at 8 bits.
            Per-layer ``act_bits`` overrides are kept; the global one is ``act_bits``.
        act_bits: default activation bits (``None``: float), for ``bops``.
        per_channel: per-output-channel ``Q_b`` (HAWQ-V3) or per tensor.
        max_batches: use at most this many batches of ``data``.

    Raises:
        ValueError: the budget is infeasible even at the lowest candidates (the message names
            the minimum achievable cost), or a layer has no candidate in its allowed range.
        ImportError: pulp is missing (``pip install mpq_plugin[search]``).
    """
    cands = _check_candidates(candidates)
    match = (config if config is not None
             else MPQConfig(method="lsq", weight_bits=(cands[0], cands[-1]), act_bits=act_bits))
    if config is not None:
        if config.quantize_embeddings:
            raise ValueError("hawq_allocate covers Conv1d/Conv2d/Linear only; set quantize_embeddings=False")
        match = config.replace(act_bits=act_bits)
    batches: Iterable[Any] = data
    if max_batches is not None:
        batches = list(islice(iter(data), max_batches))
    elif isinstance(data, Iterator):  # one-shot: keep it for the shape pass and the traces
        batches = list(data)
    first = next(iter(batches), None)
    if first is None:
        raise ValueError("data is empty: pass at least one batch")
    layers, shapes_known = _layers(model, match, _batch_input(first))  # one forward: MACs, shapes

    allowed: Dict[str, Tuple[int, ...]] = {}
    for l in layers:
        lo, hi = l.weight_bits
        allowed[l.name] = tuple(b for b in cands if lo <= b <= hi)
        if not allowed[l.name]:
            raise ValueError(f"layer {l.name!r} allows {lo}..{hi} weight bits but none of the candidates "
                             f"{cands}; add a candidate in that range or change its override")
    geometry = [l.geometry for l in layers]
    acts = [l.act_bits for l in layers]
    # fails fast, before the (costly) traces, when even the lowest bits exceed the budget
    _check_feasible(geometry, acts, [allowed[l.name][0] for l in layers], budget, shapes_known)

    traces = hutchinson_trace(model, loss_fn, batches,
                              {l.name: l.module.weight for l in layers},  # type: ignore[misc]
                              n_samples=n_samples, seed=seed)
    sens: Dict[str, Dict[int, float]] = {}
    for l in layers:
        w = l.module.weight.detach()  # type: ignore[union-attr, operator]
        tr = traces[l.name]
        if tr < 0:
            log.warning("hawq: layer %r has a negative Hessian trace estimate %.3g; counted as 0", l.name, tr)
        per_weight = max(tr, 0.0) / w.numel()
        sens[l.name] = {b: per_weight * float((rtn_quantize(w, b, per_channel).dequantize().to(w) - w)
                                               .double().square().sum())
                        for b in allowed[l.name]}
    bits, status = solve_bit_ilp(sens, geometry, budget, acts, shapes_known)
    chosen = [bits[l.name] for l in layers]
    result = HAWQResult(
        bits=bits, traces=traces, sensitivities=sens,
        cost=plan_cost(geometry, chosen, acts, shapes_known), status=status,
        objective=sum(sens[n][b] for n, b in bits.items()), budget=budget,
        weight_params={l.name: l.geometry.weight_numel for l in layers},
        act_bits=act_bits, layer_act_bits={l.name: l.act_bits for l in layers}, per_channel=per_channel,
    )
    log.info("hawq: allocated %s (cost %s)", bits, {k: round(v, 4) for k, v in result.cost.items()})
    return result


def _check_feasible(geometry: Sequence[LayerGeometry], acts: Sequence[Optional[int]], lowest: Sequence[int],
                    budget: Budget, shapes_known: bool) -> None:
    if not any(True for _ in budget.items()):
        raise ValueError("the budget sets no constraint; set avg_weight_bits, weight_kb or bops")
    _check_shape_keys(budget, shapes_known, "run one batch through the model (hawq_allocate does, "
                                            "from data) or pass the layers' geometry with MACs")
    low = plan_cost(geometry, lowest, acts, shapes_known)
    for key, limit in budget.items():
        if not _within(low[key], limit):
            raise ValueError(f"budget {key}={limit:g} is infeasible: the minimum achievable is {low[key]:.6g} "
                             f"(every layer at its lowest candidate bits); raise the budget or add lower candidates")


def solve_bit_ilp(sensitivities: Mapping[str, Mapping[int, float]], geometry: Sequence[LayerGeometry],
                  budget: Budget, act_bits: Optional[Sequence[Optional[int]]] = None,
                  shapes_known: bool = True) -> Tuple[Dict[str, int], str]:
    """HAWQ-V3's integer linear program: one bit-width per layer minimizing the summed sensitivity.

    ``min sum_l Omega_l(b_l)`` s.t. ``avg_weight_bits`` (``sum n_l b_l <= B * sum n_l``),
    ``weight_kb`` (``sum (n_l + bias_l) b_l / 8192 <= kb``) and ``bops``
    (``sum MACs_l b_l a_l <= bops``); activation budgets do not depend on weight bits and are
    only checked. Binary one-hot variables per (layer, candidate); solved by CBC through pulp.

    Args:
        sensitivities: ``{layer: {bits: Omega}}``; the keys of each inner dict are the layer's
            candidates. Layers follow ``geometry``'s order and names.
        geometry: per-layer :class:`LayerGeometry` (MACs needed for ``bops``).
        budget: the constraints.
        act_bits: per-layer activation bits (``None``: float, 32); default 8 everywhere.
        shapes_known: whether ``geometry`` has MACs and activation sizes.

    Returns:
        ``({layer: bits}, solver status)``.

    Raises:
        ValueError: infeasible budget (names the minimum achievable cost).
    """
    try:
        import pulp  # type: ignore[import-untyped]
    except ImportError as e:
        raise ImportError(f"the HAWQ ILP needs pulp: {_PULP_HINT}") from e
    names = [g.name for g in geometry]
    if sorted(names) != sorted(sensitivities):
        raise ValueError(f"sensitivities cover {sorted(sensitivities)} but geometry covers {sorted(names)}")
    acts: List[Optional[int]] = list(act_bits) if act_bits is not None else [8] * len(geometry)
    options = {n: sorted(int(b) for b in sensitivities[n]) for n in names}
    if any(not o for o in options.values()):
        raise ValueError("every layer needs at least one candidate bit-width")
    _check_feasible(geometry, acts, [options[n][0] for n in names], budget, shapes_known)

    # objective: subtract each layer's best value and normalize (same argmin, better conditioned)
    base = {n: min(sensitivities[n].values()) for n in names}
    span = max((float(v) - base[n] for n in names for v in sensitivities[n].values()), default=0.0)
    scale = 1.0 / span if span > 0 else 1.0
    prob = pulp.LpProblem("hawq_bit_allocation", pulp.LpMinimize)
    new_var = getattr(prob, "add_variable", None)  # pulp >= 3.3; LpVariable(...) is deprecated there
    x = {(i, b): (new_var(f"x_{i}_{b}", cat=pulp.LpBinary) if new_var is not None
                  else pulp.LpVariable(f"x_{i}_{b}", cat=pulp.LpBinary))
         for i, n in enumerate(names) for b in options[n]}
    prob += pulp.lpSum(scale * (float(sensitivities[n][b]) - base[n]) * x[i, b]
                       for i, n in enumerate(names) for b in options[n])
    for i, n in enumerate(names):
        prob += pulp.lpSum(x[i, b] for b in options[n]) == 1, f"one_choice_{i}"
    # integer coefficients: the budget's bit count, floored (a tiny slack keeps exact-fit budgets)
    for key, limit in budget.items():
        if key == "avg_weight_bits":
            coef = [g.weight_numel for g in geometry]
            rhs = limit * sum(coef)
            row = [[c * b for b in options[n]] for c, n in zip(coef, names)]
        elif key == "weight_kb":
            coef = [g.weight_numel + g.bias_numel for g in geometry]
            rhs = limit * 8 * 1024
            row = [[c * b for b in options[n]] for c, n in zip(coef, names)]
        elif key == "bops":
            coef = [int(g.macs * (FLOAT_BITS if a is None else a)) for g, a in zip(geometry, acts)]
            rhs = limit
            row = [[c * b for b in options[n]] for c, n in zip(coef, names)]
        else:  # act_kb_*: independent of weight bits, checked above
            continue
        prob += pulp.lpSum(row[i][j] * x[i, b] for i, n in enumerate(names)
                           for j, b in enumerate(options[n])) <= math.floor(rhs * (1 + 1e-9)), key
    code = prob.solve(_cbc_solver(pulp))
    status = str(pulp.LpStatus[code])
    if status != "Optimal":
        raise RuntimeError(f"the bit-allocation ILP ended with status {status!r} although the lowest "
                           f"candidates meet the budget; please report this with the budget {budget.to_dict()}")
    bits = {n: max(options[n], key=lambda b: float(x[i, b].value() or 0.0)) for i, n in enumerate(names)}
    achieved = plan_cost(geometry, [bits[n] for n in names], acts, shapes_known)
    over = {k: achieved[k] for k, limit in budget.items() if not _within(achieved[k], limit)}
    if over:
        raise RuntimeError(f"the ILP solution exceeds the budget {budget.to_dict()}: {over}")
    return bits, status


def _cbc_solver(pulp: Any) -> Any:
    """CBC: the binary pulp ships (``PULP_CBC_CMD``, works offline), else a CBC on PATH."""
    with warnings.catch_warnings():  # pulp 3.3 deprecates PULP_CBC_CMD in favour of pulp[cbc] + COIN_CMD
        warnings.simplefilter("ignore", DeprecationWarning)
        bundled = getattr(pulp, "PULP_CBC_CMD", None)
        if bundled is not None and bundled(msg=False).available():
            return bundled(msg=False)
    solver = pulp.COIN_CMD(msg=False)
    if not solver.available():
        raise ImportError(f"no CBC solver found for the HAWQ ILP: {_PULP_HINT} (or pip install 'pulp[cbc]')")
    return solver


def hawq_config(result: HAWQResult, act_bits: Optional[int] = 8, **kw: Any) -> MPQConfig:
    """Uniform-LSQ-QAT config at the allocated bits: method ``lsq`` with a per-layer
    ``weight_bits`` override for each allocated layer (and only those layers quantized).

    Args:
        result: a :func:`hawq_allocate` result.
        act_bits: activation bits (must equal the allocation's when the budget involves
            activations or BOPs).
        **kw: other :class:`MPQConfig` fields (``options``...); ``per_channel`` defaults to the
            allocation's granularity, ``budget`` to its budget (``freeze`` then reports slack).
    """
    if not result.bits:
        raise ValueError("the HAWQ result allocates no layer")
    if act_bits != result.act_bits and any(k in SHAPE_KEYS for k, _ in result.budget.items()):
        raise ValueError(f"act_bits={act_bits} differs from the allocation's act_bits={result.act_bits}, "
                         "and the budget depends on activation bits; use the same act_bits")
    clash = sorted({"method", "weight_bits", "include", "layer_overrides"} & set(kw))
    if clash:
        raise ValueError(f"hawq_config sets {clash} itself; do not pass them")
    kw.setdefault("per_channel", result.per_channel)
    kw.setdefault("budget", result.budget)
    values = list(result.bits.values())
    return MPQConfig(method="lsq", weight_bits=(min(values), max(values)), act_bits=act_bits,
                     include=tuple(re.escape(n) for n in result.bits),
                     layer_overrides=result.layer_overrides(), **kw)


__all__ = [
    "HAWQResult",
    "hawq_allocate",
    "hawq_config",
    "hutchinson_trace",
    "plan_cost",
    "rtn_ptq_",
    "rtn_quantize",
    "solve_bit_ilp",
    "uniform_bits_for_budget",
    "uniform_config",
]
