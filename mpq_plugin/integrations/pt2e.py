"""torchao PT2E (``torch.export`` + ``prepare_qat_pt2e`` / ``convert_pt2e``) with mpq_plugin's
fake-quants.

The one line for a PT2E QAT script::

    quantizer = X86InductorQuantizer().set_global(get_mpq_quantization_config(method="sdq", is_qat=True))

:class:`MPQQuantizer` is our own quantizer with the same setters (``set_global``,
``set_module_name``, ``set_module_type``) for conv/linear layers.

Traps (see ``docs/integrations-torch.md``):

* the fake-quant class must derive from torchao's ``FakeQuantizeBase`` and be given as torchao's
  ``with_args`` partial (``MPQFakeQuantize`` derives from both torchao's and torch.ao's bases);
* ``convert_pt2e`` quantizes the *float* weight with ``calculate_qparams()``: a weight-replacing
  method (CSQ) or a rounding mode other than half-to-even would be lost. :func:`convert_mpq_pt2e`
  first writes the fake-quantized weight (exactly on the integer grid) into the graph's weight
  attribute, then calls ``convert_pt2e``; quant_min/quant_max follow the frozen bit-widths, so
  sub-8-bit ranges are kept in the ``quantized_decomposed`` ops.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple, Union

import torch
from torch import fx, nn
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e
from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, QuantizationSpec, Quantizer
from torchao.quantization.pt2e.quantizer.utils import QuantizationConfig

from mpq_plugin.config import MethodOptions
from mpq_plugin.core.cost import LayerGeometry, conv_geometry, linear_geometry
from mpq_plugin.integrations.torch_ao import (
    BitsArg,
    MPQFakeQuantize,
    _norm_bits,
    _norm_options,
    fake_quant_kwargs,
    fake_quantize_class,
    quiet_materialize,
)
from mpq_plugin.nn.costing import QuantSite, register_cost_provider

log = logging.getLogger(__name__)

__all__ = ["MPQQuantizer", "convert_mpq_pt2e", "get_mpq_quantization_config", "init_mpq_pt2e"]

_aten = torch.ops.aten
_CONV = {_aten.conv1d.default: 1, _aten.conv2d.default: 2}
_LINEAR = {_aten.linear.default}


@functools.lru_cache(maxsize=None)
def _quantization_config(method: str, wb: Optional[Tuple[int, int]], ab: Optional[Tuple[int, int]],
                         options: MethodOptions, per_channel: bool, is_qat: bool) -> QuantizationConfig:
    w, a = fake_quant_kwargs(method, wb, ab, options, per_channel)
    cls = fake_quantize_class(method)
    hi = w["bits"][1]
    weight = QuantizationSpec(
        dtype=torch.int8, quant_min=-(2 ** (hi - 1)), quant_max=2 ** (hi - 1) - 1,
        qscheme=torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric,
        ch_axis=0 if per_channel else None, is_dynamic=False,
        observer_or_fake_quant_ctr=cls.with_args(**w))  # torchao's partial (MRO: torchao base first)
    act = None
    if a is not None:
        ahi = a["bits"][1]
        act = QuantizationSpec(dtype=torch.uint8, quant_min=0, quant_max=2**ahi - 1, qscheme=torch.per_tensor_affine,
                               is_dynamic=False, observer_or_fake_quant_ctr=cls.with_args(**a))
    return QuantizationConfig(act, act, weight, None, is_qat)


def get_mpq_quantization_config(method: str = "sdq", weight_bits: Optional[BitsArg] = None,
                                act_bits: Optional[BitsArg] = 8,
                                options: Union[None, MethodOptions, Mapping[str, Any]] = None,
                                per_channel: bool = False, is_qat: bool = True) -> QuantizationConfig:
    """A PT2E ``QuantizationConfig`` whose fake-quants are ``method``'s quantizers, for
    ``X86InductorQuantizer().set_global(...)`` / ``set_module_name_qconfig`` or :class:`MPQQuantizer`.
    Cached: equal arguments return the same object. Only QAT is supported (``is_qat=True``)."""
    if not is_qat:
        raise ValueError("mpq_plugin learns ranges and bit-widths by training: use is_qat=True with "
                         "prepare_qat_pt2e (post-training calibration alone would leave bit-widths at their init)")
    return _quantization_config(method, _norm_bits(weight_bits, "weight_bits"), _norm_bits(act_bits, "act_bits"),
                                _norm_options(method, options), bool(per_channel), True)


# -- our own quantizer ---------------------------------------------------------------------------------
def _module_fqn(node: fx.Node) -> Tuple[str, Optional[type]]:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", None
    fqn, typ = list(stack.values())[-1]
    if isinstance(typ, str):
        typ = None
    return fqn, typ


class MPQQuantizer(Quantizer):
    """PT2E quantizer annotating conv1d/conv2d/linear: input activation and weight with the
    layer's config (module name > module type > global; ``None`` leaves a layer float)."""

    def __init__(self) -> None:
        super().__init__()
        self.global_config: Optional[QuantizationConfig] = None
        self.module_name_config: Dict[str, Optional[QuantizationConfig]] = {}
        self.module_type_config: Dict[type, Optional[QuantizationConfig]] = {}

    def set_global(self, config: Optional[QuantizationConfig]) -> "MPQQuantizer":
        self.global_config = config
        return self

    def set_module_name(self, name: str, config: Optional[QuantizationConfig]) -> "MPQQuantizer":
        self.module_name_config[name] = config
        return self

    def set_module_type(self, typ: type, config: Optional[QuantizationConfig]) -> "MPQQuantizer":
        self.module_type_config[typ] = config
        return self

    def _config_for(self, node: fx.Node) -> Optional[QuantizationConfig]:
        fqn, typ = _module_fqn(node)
        # the module FQN from nn_module_stack may carry a "L['self']." style prefix on old exports
        for name, cfg in self.module_name_config.items():
            if fqn == name or fqn.endswith("." + name):
                return cfg
        if typ is not None and typ in self.module_type_config:
            return self.module_type_config[typ]
        return self.global_config

    def annotate(self, model: fx.GraphModule) -> fx.GraphModule:
        for n in model.graph.nodes:
            if n.op != "call_function" or (n.target not in _CONV and n.target not in _LINEAR):
                continue
            cfg = self._config_for(n)
            if cfg is None or cfg.weight is None:
                continue
            qmap = {n.args[1]: cfg.weight}
            if cfg.input_activation is not None:
                qmap[n.args[0]] = cfg.input_activation
            n.meta["quantization_annotation"] = QuantizationAnnotation(input_qspec_map=qmap, _annotated=True)
        return model

    def validate(self, model: fx.GraphModule) -> None:
        pass


# -- initialization, costing and convert ----------------------------------------------------------------
def _fq_of(model: fx.GraphModule, node: Any) -> Optional[MPQFakeQuantize]:
    if isinstance(node, fx.Node) and node.op == "call_module":
        m = model.get_submodule(str(node.target))
        if isinstance(m, MPQFakeQuantize):
            return m
    return None


def _val_shape(node: Any) -> Optional[Tuple[int, ...]]:
    while isinstance(node, fx.Node):
        v = node.meta.get("val")
        if isinstance(v, torch.Tensor):
            return tuple(v.shape)
        if node.op != "call_module" or not node.args:
            return None
        node = node.args[0]  # through an inserted fake-quant to the tensor it quantizes
    return None


def _pt2e_layers(model: nn.Module) -> Iterator[Tuple[str, fx.Node, MPQFakeQuantize, Optional[MPQFakeQuantize]]]:
    if not isinstance(model, fx.GraphModule):
        return
    seen: Dict[str, int] = {}
    for n in model.graph.nodes:
        if n.op != "call_function" or (n.target not in _CONV and n.target not in _LINEAR):
            continue
        wfq = _fq_of(model, n.args[1])
        if wfq is None:
            continue
        fqn = _module_fqn(n)[0] or n.name
        k = seen.get(fqn, 0)
        seen[fqn] = k + 1
        yield (fqn if k == 0 else f"{fqn}#{k}"), n, wfq, _fq_of(model, n.args[0])


def _pt2e_geometry(node: fx.Node, name: str) -> LayerGeometry:
    ins, outs, ws = _val_shape(node.args[0]), _val_shape(node), _val_shape(node.args[1])
    if ins is None or outs is None or ws is None:
        raise RuntimeError(f"no shape metadata on the exported graph for {name}; export with torch.export.export")
    has_bias = len(node.args) > 2 and node.args[2] is not None
    if node.target in _LINEAR:
        return linear_geometry(name, ws[1], ws[0], has_bias, ins[1:])
    groups = int(node.args[6]) if len(node.args) > 6 else 1
    return conv_geometry(name, ws, has_bias, groups, ins[1:], outs[1:])


def _pt2e_sites(model: nn.Module) -> Iterator[Tuple[str, QuantSite]]:
    """Cost provider: PT2E graphs, conv/linear nodes whose weight goes through an MPQFakeQuantize."""
    for name, node, wfq, afq in _pt2e_layers(model):
        if wfq.quantizer is None:
            continue  # built at the first forward (init_mpq_pt2e)
        yield name, QuantSite(wfq.quantizer, afq.quantizer if afq is not None else None,
                              functools.partial(_pt2e_geometry, node))


register_cost_provider(_pt2e_sites)


def init_mpq_pt2e(model: fx.GraphModule, example_inputs: Tuple[Any, ...]) -> fx.GraphModule:
    """One no-grad forward of a ``prepare_qat_pt2e`` model: builds shape-dependent quantizers
    (CSQ, per-channel) and initializes every fake-quant, so all parameters exist before the
    optimizer is built. BatchNorm statistics are not updated (eval mode, restored after)."""
    from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train

    training = any(m.training for m in model.modules())
    move_exported_model_to_eval(model)
    try:
        with torch.no_grad(), quiet_materialize():
            model(*example_inputs)
    finally:
        if training:
            move_exported_model_to_train(model)
    return model


def _weight_attr(model: fx.GraphModule, node: Any) -> Optional[str]:
    # the float weight feeding a weight fake-quant (possibly through BN-folding arithmetic)
    while isinstance(node, fx.Node):
        if node.op == "get_attr":
            return str(node.target)
        if node.op == "call_function" and node.args:
            node = node.args[0]
        else:
            return None
    return None


def convert_mpq_pt2e(model: fx.GraphModule, **kwargs: Any) -> fx.GraphModule:
    """``convert_pt2e`` that keeps mpq_plugin's numerics: each weight feeding an MPQFakeQuantize
    directly is replaced by its fake-quantized value (on the integer grid, so the host's
    quantize/dequantize reproduces it exactly, whatever the method's rounding; CSQ's synthesized
    weight included). Call ``mpq_plugin.freeze`` (or ``MPQSearch.freeze``) first so bit-widths are
    fixed; quant_min/quant_max then carry the learned sub-8-bit ranges into the converted graph.

    Raises:
        ValueError: a weight reaches its fake-quant through other ops (PT2E's Conv-BN QAT
            folding): convert would fold BN first and quantize a different tensor.
    """
    for name, fq in model.named_modules():
        st = fq._state() if isinstance(fq, MPQFakeQuantize) else None
        if st is not None and st.extra.get("format", "uniform") != "uniform":
            raise ValueError(f"{name}: {fq.method} uses the {st.extra['format']!r} format, which quantize_per_tensor "
                             "cannot express; use a uniform quantizer (learned_range: a U* parametrization such as 'U3')")
    with torch.no_grad():
        for name, node, wfq, _ in _pt2e_layers(model):
            src = node.args[1].args[0]
            attr = _weight_attr(model, src)
            if attr is None:
                continue
            if not (isinstance(src, fx.Node) and src.op == "get_attr"):
                if type(wfq.quantizer).replaces_weight:
                    raise ValueError(f"{name}: {wfq.method} synthesizes the weight, but PT2E folds BatchNorm into it "
                                     "at convert; fold BatchNorm before export (torch.ao.quantization.fuse_modules "
                                     "in eval mode) or use the torch.ao / quantize_ flows for Conv-BN models")
                continue
            w = model.get_parameter(attr) if attr in dict(model.named_parameters()) else getattr(model, attr)
            w.copy_(wfq(w.detach()))
    return convert_pt2e(model, **kwargs)
