"""mpq_plugin's own convert for the torch.ao (eager/FX) and torchao ``quantize_`` flows.

After ``freeze`` (and finetuning), :func:`convert_mpq` returns a model whose layers hold the
learned integer weights and bit-widths and that computes *exactly* (``torch.equal``) what the
frozen fake-quant model computes in eval mode:

* a weight fake-quant becomes a :class:`FrozenWeight` (int codes + scale + zero point + bits);
  plain layers (torchao ``quantize_``'s ``QuantLinear``/``QuantConv2d``, torch.ao's unfused QAT
  ``Linear``/``Conv2d``) become :class:`DeployedLinear`/:class:`DeployedConv2d`, plain float
  layers whose ``weight`` is the dequantized integer weight and which keep ``weight_int``;
  torch.ao's fused Conv-BN(-ReLU) QAT modules keep their structure (folding BatchNorm would change
  the float rounding) with a :class:`FrozenWeight` in the ``weight_fake_quant`` slot;
* an activation fake-quant becomes a :class:`FrozenActivation`: a fixed fake-quant at the learned
  range (``bits``, ``scale``, ``zero_point``, ``quant_min``/``quant_max``).

:func:`torchao_inference_configs` then maps each deployed layer to a torchao weight-only config
(``FqnToConfig``) where torchao 0.18 has a kernel for its bits, with a per-layer table of the
kernel used or why it falls back. torch.ao's own ``convert``/``convert_fx`` lose sub-8-bit ranges
(int8 kernels) and warn (``MPQFakeQuantize.calculate_qparams``); PT2E has ``convert_mpq_pt2e``.
"""
from __future__ import annotations

import copy
import logging
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from mpq_plugin.core.state import QuantState
from mpq_plugin.integrations.torch_ao import MPQFakeQuantize, weight_seen_by_fake_quant
from mpq_plugin.nn.fake_quantizer import FakeQuantizer
from mpq_plugin.nn.layers import QuantLayer, _clone_module_as

log = logging.getLogger(__name__)

__all__ = ["DeployedConv1d", "DeployedConv2d", "DeployedEmbedding", "DeployedLinear", "FrozenActivation",
           "FrozenWeight", "apply_torchao_weights", "convert_mpq", "kernel_table_markdown",
           "torchao_inference_configs"]


class FrozenWeight(nn.Module):
    """A learned weight as integers: ``codes`` (int8 up to 8 bits, else int32), ``scale``,
    ``zero_point``, ``bits`` (storage width of a code) and ``learned_bits`` (the bit-width the
    search chose and costed; below ``bits`` for CSQ when its kept bit planes are not contiguous).
    ``forward`` ignores its input and returns the dequantized weight (``QuantState.dequantize``,
    bit for bit the fake-quant's output)."""

    def __init__(self, state: QuantState, learned_bits: Optional[int] = None) -> None:
        super().__init__()
        self.learned_bits = int(state.bits if learned_bits is None else learned_bits)
        self.input_bits: Optional[int] = None  # torch.ao: bits of the separate input fake-quant, when known
        if state.codes is None:
            raise ValueError("FrozenWeight needs a weight state with codes")
        self.bits, self.signed, self.axis, self.method = int(state.bits), bool(state.signed), state.axis, state.method
        self.register_buffer("codes", state.codes.to(torch.int8 if state.bits <= 8 else torch.int32))
        self.register_buffer("scale", state.scale.detach().to(torch.float32).clone())
        self.register_buffer("zero_point", state.zero_point.detach().clone())

    def state(self) -> QuantState:
        return QuantState(self.bits, self.signed, self.scale, self.zero_point, self.codes.to(torch.int64),
                          self.axis, method=self.method)

    def dequantize(self) -> torch.Tensor:
        return self.state().dequantize()

    def forward(self, x: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.dequantize()

    def extra_repr(self) -> str:
        return (f"method={self.method}, bits={self.bits}, learned_bits={self.learned_bits}, "
                f"shape={tuple(self.codes.shape)}, per_channel={self.axis is not None}")


class FrozenActivation(nn.Module):
    """A fixed activation fake-quant at the learned range: the method's frozen quantizer (always in
    eval mode, no trainable parameters), with ``bits``, ``scale``, ``zero_point``,
    ``quant_min``/``quant_max`` (tighter than ``bits`` when the method clips tighter)."""

    def __init__(self, quantizer: FakeQuantizer, enabled: bool = True) -> None:
        super().__init__()
        self.quantizer = copy.deepcopy(quantizer).eval().requires_grad_(False)
        st = self.quantizer.freeze(None)
        self.bits, self.signed, self.method, self.enabled = int(st.bits), bool(st.signed), st.method, bool(enabled)
        self.quant_min = int(st.extra.get("code_min", st.qmin))
        self.quant_max = int(st.extra.get("code_max", st.qmax))
        self.register_buffer("scale", st.scale.detach().to(torch.float32).clone())
        self.register_buffer("zero_point", st.zero_point.detach().clone())

    def train(self, mode: bool = True) -> "FrozenActivation":
        super().train(mode)
        self.quantizer.eval()  # frozen: never the training behaviour (initialization, statistics)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantizer(x) if self.enabled else x

    def extra_repr(self) -> str:
        return f"method={self.method}, bits={self.bits}, range={self.quant_min}..{self.quant_max}"


class _Deployed:
    """A plain float layer holding the dequantized learned weight (``weight``), its integer form
    (``weight_int``) and its fixed input fake-quant (``input_quant``, ``nn.Identity`` if none)."""

    weight_int: FrozenWeight
    input_quant: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.input_quant(x))  # type: ignore[misc]

    @property
    def weight_bits(self) -> int:
        return self.weight_int.learned_bits

    @property
    def act_bits(self) -> Optional[int]:
        return self.input_quant.bits if isinstance(self.input_quant, FrozenActivation) else None


class DeployedLinear(_Deployed, nn.Linear):
    pass


class DeployedConv1d(_Deployed, nn.Conv1d):
    pass


class DeployedConv2d(_Deployed, nn.Conv2d):
    pass


class DeployedEmbedding(_Deployed, nn.Embedding):
    pass


_DEPLOYED = {nn.Linear: DeployedLinear, nn.Conv1d: DeployedConv1d, nn.Conv2d: DeployedConv2d,
             nn.Embedding: DeployedEmbedding}
_FLOAT_OF_AO_QAT: Dict[type, type] = {}
try:
    import torch.ao.nn.qat as _aoqat

    _FLOAT_OF_AO_QAT = {_aoqat.Linear: nn.Linear, _aoqat.Conv1d: nn.Conv1d, _aoqat.Conv2d: nn.Conv2d,
                        _aoqat.Embedding: nn.Embedding}
except ImportError:  # pragma: no cover
    pass


def _exact_state(name: str, quantizer: FakeQuantizer, fq_out: torch.Tensor, w: torch.Tensor) -> QuantState:
    st = quantizer.freeze(w)
    if st.codes is None or not torch.equal(st.dequantize().reshape(fq_out.shape), fq_out):
        raise ValueError(f"{name}: the frozen integer weight does not reproduce the fake-quant output; call "
                         "mpq_plugin.freeze(model) (or MPQSearch.freeze()) before convert_mpq")
    return st


def _deployed(layer: nn.Module, float_cls: type, weight: torch.Tensor, wfrozen: FrozenWeight,
              input_quant: nn.Module) -> nn.Module:
    # a Deployed* instance sharing the layer's hyper-parameters, hooks (torch.ao eager's output
    # observer hook) and children (its activation_post_process), minus the training quantizers
    new = _clone_module_as(layer, _DEPLOYED[float_cls])
    for attr in ("weight_fake_quant", "weight_quantizer", "input_quantizer"):
        new._modules.pop(attr, None)
    for attr in ("_float_cls", "_in_shape", "_out_shape", "qconfig"):
        new.__dict__.pop(attr, None)
    new._parameters = type(new._parameters)()
    new.weight = nn.Parameter(weight.detach().clone().reshape(layer.weight.shape), requires_grad=False)
    if float_cls is not nn.Embedding:
        bias = layer.bias
        new.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
    new.weight_int = wfrozen
    new.input_quant = input_quant
    return new


def _check_ready(model: nn.Module) -> None:
    unfixed, untrained = [], []
    for name, m in model.named_modules():
        # a quantizer with a bit range must be frozen (an output fake-quant at fixed bits need not)
        if isinstance(m, FakeQuantizer) and m.spec.bits[0] != m.spec.bits[1] and not bool(m.bits_fixed):
            unfixed.append(name)
        if isinstance(m, MPQFakeQuantize) and m.role == "weight" and getattr(m, "_mpq_train_steps", 0) == 0:
            untrained.append(name)
        if isinstance(m, QuantLayer) and m.__dict__.get("_mpq_train_steps", None) == 0:
            untrained.append(name)
    if unfixed:
        raise ValueError(f"convert_mpq: bit-widths are not fixed for {unfixed[:4]}{'...' if len(unfixed) > 4 else ''}; "
                         "call mpq_plugin.freeze(model) or MPQSearch.freeze() (then finetune) first")
    if untrained:
        warnings.warn(f"convert_mpq: {len(untrained)} quantized layer(s) (e.g. {untrained[0]}) never ran a training "
                      "step, so their bit-widths and ranges are the initial ones, not learned; train (search, "
                      "freeze, finetune) before converting", UserWarning, stacklevel=3)


def convert_mpq(model: nn.Module, inplace: bool = False) -> nn.Module:
    """A deployable copy of a frozen torch.ao (eager/FX) or torchao ``quantize_`` model, numerically
    identical to it in eval mode (see the module docstring). The result is in eval mode.

    Raises:
        ValueError: bit-widths not fixed (call ``freeze`` first), a PT2E graph (use
            ``mpq_plugin.pt2e.convert_mpq_pt2e``), or no mpq_plugin quantizer found.
    """
    if any(isinstance(m, MPQFakeQuantize) and m.role == "weight" for m in model.modules()) and not any(
            isinstance(m._modules.get("weight_fake_quant"), MPQFakeQuantize) for m in model.modules()):
        raise ValueError("convert_mpq: this looks like a PT2E graph (weight fake-quants are graph nodes); use "
                         "mpq_plugin.pt2e.convert_mpq_pt2e")
    _check_ready(model)
    m = model if inplace else copy.deepcopy(model)
    m.eval()
    found = 0
    with torch.no_grad():
        for name, mod in list(m.named_modules()):
            if isinstance(mod, QuantLayer):  # torchao quantize_ / native layers
                w = mod.weight_to_quantize()
                fq_out = mod.weight_quantizer(w)
                st = _exact_state(name, mod.weight_quantizer, fq_out, w)
                aq = mod.input_quantizer
                act = FrozenActivation(aq) if aq is not None else nn.Identity()
                wi = FrozenWeight(st, int(mod.weight_quantizer.hard_bit_width()))
                _replace(m, name, _deployed(mod, mod._float_cls, fq_out, wi, act))
                found += 1
            elif isinstance(mod._modules.get("weight_fake_quant"), MPQFakeQuantize):  # torch.ao eager / FX
                wfq = mod.weight_fake_quant
                if int(wfq.fake_quant_enabled[0]) == 0:
                    raise ValueError(f"{name}: its weight fake-quant is disabled, so the model computes with float "
                                     "weights; enable it (model.apply(torch.ao.quantization.enable_fake_quant)) first")
                w = weight_seen_by_fake_quant(mod)
                fq_out = wfq(w)
                frozen = FrozenWeight(_exact_state(name, wfq.quantizer, fq_out, w), int(wfq.quantizer.hard_bit_width()))
                ref = mod.__dict__.get("_mpq_input_fq")  # the activation fake-quant feeding it (costing hook)
                afq = ref() if ref is not None else None
                if afq is not None and afq.quantizer is not None:
                    frozen.input_bits = int(afq.quantizer.hard_bit_width())
                float_cls = _FLOAT_OF_AO_QAT.get(type(mod))
                if float_cls is not None:
                    _replace(m, name, _deployed(mod, float_cls, fq_out, frozen, nn.Identity()))
                else:  # fused Conv-BN(-ReLU), LinearReLU ...: keep the host's arithmetic
                    mod.weight_fake_quant = frozen
                found += 1
        done: Dict[int, FrozenActivation] = {}  # FX shares a fake-quant between names: keep it shared
        for name, mod in list(m.named_modules(remove_duplicate=False)):
            if isinstance(mod, MPQFakeQuantize) and mod.role == "act":
                if id(mod) not in done:
                    done[id(mod)] = FrozenActivation(mod.quantizer, bool(mod.fake_quant_enabled[0])).eval()
                _replace(m, name, done[id(mod)])
    if not found:
        raise ValueError("convert_mpq: no mpq_plugin quantized layer found (prepare the model with "
                         "mpq_plugin.ao qconfigs or mpq_plugin.torchao.MPQQATConfig first)")
    if isinstance(m, torch.fx.GraphModule):
        m.recompile()
    return m.eval().requires_grad_(False)  # an inference model (fused Conv-BN keeps float BN parameters)


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


# -- torchao inference configs ------------------------------------------------------------------
def _layer_info(model: nn.Module) -> List[Tuple[str, nn.Module, FrozenWeight, Optional[int]]]:
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, _Deployed):
            out.append((name, mod, mod.weight_int, mod.act_bits or mod.weight_int.input_bits))
        elif isinstance(mod._modules.get("weight_fake_quant"), FrozenWeight):
            out.append((name, mod, mod.weight_fake_quant, mod.weight_fake_quant.input_bits))
    return out


def torchao_inference_configs(model: nn.Module) -> Tuple[Any, List[Dict[str, Any]]]:
    """``(FqnToConfig, table)`` for a :func:`convert_mpq` model: each ``DeployedLinear`` gets torchao's
    weight-only config for its learned bits (8: ``Int8WeightOnlyConfig``; 1-7:
    ``IntxWeightOnlyConfig(weight_dtype=torch.int<b>, granularity=PerAxis(0))``); every other layer
    falls back to the deployed float module. ``table`` has one dict per layer: ``layer``, ``type``,
    ``weight_bits``, ``act_bits``, ``config``, ``kernel``, ``fallback`` (the reason, or ``None``).

    Apply with ``quantize_(model, fqn_config, filter_fn=None)``. torchao recomputes per-row scales
    from the (on-grid) deployed weight, so results are close to, not identical with, the
    ``convert_mpq`` model; the input activations stay fixed fake-quants (torchao has no static
    sub-8-bit activation kernel).
    """
    from torchao.quantization import FqnToConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis

    configs: Dict[str, Any] = {}
    table: List[Dict[str, Any]] = []
    for name, mod, wi, act in _layer_info(model):
        row: Dict[str, Any] = {"layer": name, "type": type(mod).__name__, "weight_bits": wi.learned_bits,
                               "storage_bits": wi.bits, "act_bits": act,
                               "config": None, "kernel": "float (dequantized weight)", "fallback": None}
        if not isinstance(mod, _Deployed):
            row["fallback"] = (f"torch.ao fused {type(mod).__name__} kept as is (the host's arithmetic, bit-exact; "
                               "no torchao kernel)")
        elif not isinstance(mod, nn.Linear):
            row["fallback"] = f"torchao 0.18 has no weight-only kernel for {type(mod).__bases__[-1].__name__}"
        elif wi.bits == 8:
            configs[name] = Int8WeightOnlyConfig()
            row.update(config="Int8WeightOnlyConfig()", kernel="torchao Int8Tensor (int8 weight-only, per row)")
        elif 1 <= wi.bits <= 7:
            configs[name] = IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{wi.bits}"), granularity=PerAxis(0))
            row.update(config=f"IntxWeightOnlyConfig(weight_dtype=torch.int{wi.bits}, granularity=PerAxis(0))",
                       kernel=f"torchao IntxUnpackedToInt8Tensor (int{wi.bits} weight-only, per row)")
        else:
            row["fallback"] = f"no torchao weight-only kernel for {wi.bits} bits"
        table.append(row)
    return FqnToConfig(configs), table


def apply_torchao_weights(model: nn.Module) -> List[str]:
    """Give each ``DeployedLinear`` of a :func:`convert_mpq` model (codes up to 8 bits) a torchao
    ``IntxUnpackedToInt8Tensor`` weight built from its *learned* codes and scale (not re-chosen as
    ``quantize_(model, torchao_inference_configs(model)[0])`` does): the model stays bit-identical
    (tested) and stores int codes. Returns the names of the layers changed (in place)."""
    from torchao.quantization import IntxUnpackedToInt8Tensor

    done = []
    for name, mod, wi, _ in _layer_info(model):
        if not (isinstance(mod, _Deployed) and isinstance(mod, nn.Linear) and 1 <= wi.bits <= 8):
            continue
        rows = mod.weight.shape[0]
        scale = wi.scale.reshape(-1, 1).expand(rows, 1).clone()
        zp = wi.zero_point.reshape(-1, 1).expand(rows, 1).to(torch.int8).clone()
        t = IntxUnpackedToInt8Tensor.from_hp(mod.weight.detach(), (1, mod.weight.shape[1]),
                                             getattr(torch, f"int{wi.bits}"),
                                             intx_choose_qparams_algorithm=None, custom_scale=scale,
                                             custom_zero_point=zp)
        codes = wi.codes.to(torch.int64).reshape(mod.weight.shape)
        if not torch.equal(t.qdata.to(torch.int64), codes) or not torch.equal(t.dequantize(), mod.weight):
            log.warning("%s: torchao's codes differ from the learned ones; left as a float layer", name)
            continue
        mod.weight = nn.Parameter(t, requires_grad=False)
        done.append(name)
    return done


def kernel_table_markdown(table: List[Dict[str, Any]]) -> str:
    """The table of :func:`torchao_inference_configs` as markdown."""
    lines = ["| layer | type | weight bits (storage) | act bits | kernel | fallback |", "|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['layer']} | {r['type']} | {r['weight_bits']} ({r['storage_bits']}) "
                     f"| {r['act_bits'] if r['act_bits'] else '-'} "
                     f"| {r['kernel']} | {r['fallback'] or '-'} |")
    return "\n".join(lines)
