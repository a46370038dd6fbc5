"""Hugging Face transformers integration: ``quantization_config=MpqConfig(...)`` in ``from_pretrained``.

    from mpq_plugin.hf import MpqConfig           # registers quant_method "mpq" (idempotent)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, quantization_config=MpqConfig(method="sdq", budget=4.0, modules_to_not_convert=["classifier"]))
    ...QAT (Trainer + MPQSearchCallback / MPQTrainer, or an accelerate loop with MPQSearch)...
    model.save_pretrained(out)                    # safetensors (learned quantizer state) + config.json (BitPlan)
    AutoModelForSequenceClassification.from_pretrained(out)   # same layers, identical outputs

How loading works: ``_process_model_before_weight_loading`` swaps the selected layers (rules from
:mod:`mpq_plugin.adapters.hf`) for mpq_plugin's quantized subclasses on the meta skeleton, so the
quantizer parameters get state-dict keys (``<layer>.weight_quantizer.*``). From a float checkpoint
those keys are missing and transformers leaves them uninitialized, so after loading each layer gets
fresh quantizers initialized from its loaded weight. From a saved mpq checkpoint every key must be
present (checked against the safetensors header *before* anything is loaded) and the loaded
quantizers must reproduce the BitPlan stored in config.json.
"""
from __future__ import annotations

import copy
import json
import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.pytorch_utils import Conv1D
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

import mpq_plugin
from mpq_plugin.adapters import hf as hf_rules
from mpq_plugin.api import make_quantizer
from mpq_plugin.config import BitPlan, Budget, LayerBits, MPQConfig
from mpq_plugin.core.cost import LayerGeometry, linear_geometry
from mpq_plugin.nn.fake_quantizer import FakeQuantizer
from mpq_plugin.nn.layers import QUANT_LAYER_TYPES, QuantLayer, quant_layers, wrap_layer
from mpq_plugin.nn.matching import resolve_layer
from mpq_plugin.nn.sharing import share_layer_bits
from mpq_plugin.registry import get_method
from mpq_plugin.search.trainer import optimizer_param_groups

log = logging.getLogger(__name__)

QUANT_METHOD = "mpq"
_REQUIRES = "pip install mpq_plugin, then `import mpq_plugin.hf` before from_pretrained"
_QUANTIZER_KEY_MARKERS = (".weight_quantizer.", ".input_quantizer.")

__all__ = [
    "MPQSearchCallback",
    "MPQTrainer",
    "MpqConfig",
    "MpqHfQuantizer",
    "QuantGPT2Conv1D",
    "calibrate",
    "current_bit_plan",
    "register",
]


# -- GPT-2 Conv1D ------------------------------------------------------------------------------------
class QuantGPT2Conv1D(QuantLayer, Conv1D):
    """GPT-2's ``Conv1D`` (``y = x @ W + b`` with ``W`` of shape ``(in, out)``) with quantizers.

    Per-channel weight scales run along axis 1 (the output features)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xin = self.quantize_input(x)
        size_out = x.size()[:-1] + (self.nf,)
        y = torch.addmm(self.bias, xin.reshape(-1, xin.size(-1)), self.quantized_weight()).view(size_out)
        self._record(x, y)
        return y

    def geometry(self, name: str = "") -> LayerGeometry:
        nx, nf = self.weight.shape
        in_shape = self._in_shape if self._in_shape is not None else (nx,)
        return linear_geometry(name, nx, nf, self.bias is not None, in_shape)


def _quant_cls(module: nn.Module) -> type:
    if type(module) is Conv1D:
        return QuantGPT2Conv1D
    qcls = QUANT_LAYER_TYPES.get(type(module))
    if qcls is None:
        raise TypeError(f"cannot quantize {type(module).__name__}")
    return qcls


# -- the config --------------------------------------------------------------------------------------
def _as_budget_dict(budget: Any) -> Optional[Dict[str, float]]:
    if budget is None:
        return None
    if isinstance(budget, Budget):
        return budget.to_dict()
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        return Budget(avg_weight_bits=float(budget)).to_dict()
    if isinstance(budget, Mapping):
        return Budget.from_dict(dict(budget)).to_dict()  # type: ignore[union-attr]
    raise TypeError(f"budget must be a Budget, a dict or a number (average weight bits), got {budget!r}")


class MpqConfig(QuantizationConfigMixin):
    """transformers quantization config for mpq_plugin (``quant_method="mpq"``).

    Args:
        method: a registered mpq_plugin method (``mpq_plugin.list_methods()``).
        budget: an :class:`mpq_plugin.Budget`, its dict, or a number meaning average weight bits.
        weight_bits: ``(min, max)`` weight bits (an int fixes them; required for ``lsq``).
        act_bits: input-activation bits of quantized layers; ``None`` (default) keeps activations
            float, because transformer activations have outliers that per-tensor scales handle badly.
        per_channel: per-output-channel weight scales; ``None``: where the method supports them.
        quantize_embeddings: also quantize embeddings (and ViT's patch-embedding conv).
        modules_to_not_convert: modules kept float. ``None``: task heads and poolers
            (:data:`mpq_plugin.adapters.hf.DEFAULT_SKIP`) plus what transformers keeps float
            (output embeddings, tied weights). An explicit list replaces those defaults.
        include, exclude, layer_overrides, options: as in :class:`mpq_plugin.MPQConfig`.
        family: model family for the adapter rules (``auto``, ``bert``, ``gpt2``, ``llama``, ``vit``).
        share_qkv_bits: one weight bit-width decision per attention block for its q/k/v projections
            (:func:`mpq_plugin.adapters.hf.qkv_groups`, :mod:`mpq_plugin.nn.sharing`): the
            frozen plan gives q, k and v the same bits. Off by default (each projection learns its
            own); GPT-2's fused ``c_attn`` is one layer either way.
        bit_plan: written by ``save_pretrained`` (the learned plan); checked on reload.

    Raises:
        ValueError: unknown method or bad option, at construction.
    """

    def __init__(self, method: str = "sdq", budget: Any = None, weight_bits: Union[int, Sequence[int]] = (2, 8),
                 act_bits: Union[None, int, Sequence[int]] = None, per_channel: Optional[bool] = None,
                 quantize_embeddings: bool = False, modules_to_not_convert: Optional[List[str]] = None,
                 include: Sequence[str] = (), exclude: Sequence[str] = (),
                 layer_overrides: Optional[Mapping[str, Mapping[str, Any]]] = None,
                 options: Optional[Mapping[str, Any]] = None, family: str = "auto",
                 share_qkv_bits: bool = False, bit_plan: Optional[Mapping[str, Any]] = None,
                 mpq_version: Optional[str] = None,
                 **kwargs: Any) -> None:
        kwargs.pop("quant_method", None)
        kwargs.pop("requires", None)
        if kwargs:
            raise ValueError(f"unknown MpqConfig argument(s) {sorted(kwargs)}")
        self.quant_method = QUANT_METHOD
        self.method = method
        self.budget = _as_budget_dict(budget)
        self.weight_bits = list(weight_bits) if not isinstance(weight_bits, int) else weight_bits
        self.act_bits = list(act_bits) if isinstance(act_bits, (list, tuple)) else act_bits
        self.per_channel = per_channel
        self.quantize_embeddings = bool(quantize_embeddings)
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert is not None else None
        self.include = list(include)
        self.exclude = list(exclude)
        self.layer_overrides = {k: {kk: (list(vv) if isinstance(vv, tuple) else vv) for kk, vv in dict(v).items()}
                                for k, v in dict(layer_overrides or {}).items()}
        self.options = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(options or {}).items()}
        if family != "auto" and family not in hf_rules.FAMILY_RULES:
            raise ValueError(f"family={family!r}; use 'auto' or one of {sorted(hf_rules.FAMILY_RULES)}")
        self.family = family
        if not isinstance(share_qkv_bits, bool):
            raise ValueError(f"share_qkv_bits={share_qkv_bits!r} must be True or False")
        self.share_qkv_bits = share_qkv_bits
        self.bit_plan = dict(bit_plan) if bit_plan is not None else None
        self.mpq_version = mpq_version or mpq_plugin.__version__
        # shown to whoever opens config.json without mpq_plugin (transformers then loads float weights)
        self.requires = _REQUIRES
        self.post_init()

    def post_init(self) -> None:
        """Validate now (method name, bit ranges, options) by building the native config once."""
        self.to_mpq_config()

    def resolved_per_channel(self) -> bool:
        if self.per_channel is not None:
            return bool(self.per_channel)
        return bool(get_method(self.method).quantizer_cls.supports_per_channel)

    def to_mpq_config(self, exclude: Sequence[str] = ()) -> MPQConfig:
        """The native :class:`mpq_plugin.MPQConfig` (``exclude`` adds the resolved skip list)."""
        options = dict(self.options)
        if "candidates" in options and isinstance(options["candidates"], list):
            options["candidates"] = tuple(options["candidates"])
        wb = tuple(self.weight_bits) if isinstance(self.weight_bits, list) else self.weight_bits
        ab = tuple(self.act_bits) if isinstance(self.act_bits, list) else self.act_bits
        return MPQConfig(method=self.method, weight_bits=wb, act_bits=ab,
                         budget=Budget.from_dict(self.budget) if self.budget else None,
                         per_channel=self.resolved_per_channel(),
                         quantize_embeddings=self.quantize_embeddings,
                         include=tuple(self.include), exclude=tuple(self.exclude) + tuple(exclude),
                         layer_overrides=hf_rules.layer_override_map(self.layer_overrides), options=options)

    def to_dict(self) -> Dict[str, Any]:
        return copy.deepcopy(self.__dict__)


# -- the HF quantizer --------------------------------------------------------------------------------
def _skip_list(model: nn.Module, qcfg: MpqConfig) -> List[str]:
    defaults: List[str] = []
    if qcfg.modules_to_not_convert is None:
        try:
            from transformers.quantizers.base import get_keys_to_not_convert
            defaults = [k for k in get_keys_to_not_convert(model) if k]
        except Exception as e:  # noqa: BLE001 - best effort: some models lack output embeddings
            log.debug("get_keys_to_not_convert failed (%s); using mpq defaults only", e)
    return hf_rules.resolve_skip(model, qcfg.modules_to_not_convert, defaults)


def _make_quantizers(module: nn.Module, name: str, mcfg: MPQConfig) -> Tuple[FakeQuantizer, Optional[FakeQuantizer]]:
    settings = resolve_layer(name, mcfg)
    assert settings is not None
    weight = module.weight
    axis = 1 if isinstance(module, Conv1D) else 0
    wq = make_quantizer(mcfg, "weight", settings.weight_bits, signed=True,
                        channels=weight.shape[axis] if mcfg.per_channel else None, axis=axis,
                        shape=tuple(weight.shape))
    aq = None
    if settings.act_bits is not None and not isinstance(module, nn.Embedding):
        aq = make_quantizer(mcfg, "act", settings.act_bits, signed=None)
    return wq, aq


def _swap(model: nn.Module, qcfg: MpqConfig) -> Tuple[MPQConfig, List[str]]:
    """Swap selected layers for quantized subclasses (parameters shared, quantizers uninitialized)."""
    skip = _skip_list(model, qcfg)
    mcfg = qcfg.to_mpq_config()
    targets = hf_rules.quantizable_modules(
        model, skip=skip, quantize_embeddings=qcfg.quantize_embeddings,
        family=None if qcfg.family == "auto" else qcfg.family)
    names = [n for n in targets if resolve_layer(n, mcfg) is not None]
    if not names:
        raise ValueError(f"MpqConfig selects no layer of {type(model).__name__}: check include/exclude/"
                         f"modules_to_not_convert (skipped: {skip})")
    for name in names:
        module = model.get_submodule(name)
        wq, aq = _make_quantizers(module, name, mcfg)
        dev = module.weight.device
        new = wrap_layer(module, wq.to(dev), aq.to(dev) if aq is not None else None, initialize=False,
                         quant_cls=_quant_cls(module))
        model.set_submodule(name, new)
    return mcfg, names


def _share_qkv(model: nn.Module, qcfg: MpqConfig, names: Sequence[str]) -> None:
    """One weight bit-width decision per q/k/v group of quantized layers (``share_qkv_bits``)."""
    if not qcfg.share_qkv_bits:
        return
    quantized = set(names)
    groups = [tuple(n for n in g if n in quantized)
              for g in hf_rules.qkv_groups(model, None if qcfg.family == "auto" else qcfg.family)]
    shared = share_layer_bits(model, [g for g in groups if len(g) > 1])
    log.info("mpq: %d q/k/v groups share one weight bit-width each", len(shared))


def _reset_quantizers(model: nn.Module, mcfg: MPQConfig) -> None:
    """Fresh quantizers on the loaded weights' device, initialized from the float weights."""
    for name, layer in quant_layers(model):
        wq, aq = _make_quantizers(layer, name, mcfg)
        dev = layer.weight.device
        layer.weight_quantizer = wq.to(dev)
        layer.input_quantizer = aq.to(dev) if aq is not None else None
        with torch.no_grad():
            layer.weight_quantizer(layer.weight_to_quantize().float())
        if layer.weight_quantizer.replaces_weight:
            layer.weight.requires_grad_(False)


def _check_all_loaded(model: nn.Module) -> None:
    """Every quantizer tensor was read from the checkpoint (transformers marks loaded tensors with
    ``_is_hf_initialized``; missing ones would hold uninitialized memory)."""
    missing = [k for k, v in model.state_dict(keep_vars=True).items()
               if any(m in k for m in _QUANTIZER_KEY_MARKERS) and not getattr(v, "_is_hf_initialized", False)]
    if missing:
        raise ValueError(
            f"this mpq checkpoint does not match its quantization_config: {len(missing)} quantizer tensor(s) are "
            f"missing from the weights (e.g. {missing[:3]}); no model is returned. Re-save the model with "
            "save_pretrained, or load the float weights with a fresh MpqConfig"
        )


def current_bit_plan(model: nn.Module) -> BitPlan:
    """The plan the quantizers would freeze to now (hard bits; no state is changed)."""
    layers: Dict[str, LayerBits] = {}
    for name, layer in quant_layers(model):
        wb = int(layer.weight_quantizer.hard_bit_width())
        aq = layer.input_quantizer
        ab = int(aq.hard_bit_width()) if aq is not None and bool(aq.initialized) else None
        layers[name] = LayerBits(wb, ab, int(layer.weight.numel()))
    cfg: Optional[MPQConfig] = getattr(model, "_mpq_config", None)
    plan = BitPlan(layers, method=cfg.method if cfg else "", budget=cfg.budget if cfg else None)
    plan.cost = {"avg_weight_bits": plan.avg_weight_bits()}
    return plan


def _check_plan(model: nn.Module, stored: Mapping[str, Any]) -> None:
    plan = BitPlan.from_dict(stored)
    now = current_bit_plan(model)
    if set(plan) != set(now):
        raise ValueError(f"the BitPlan in config.json names layers {sorted(set(plan) ^ set(now))[:5]} that do not "
                         "match the quantized layers of the model; the checkpoint is inconsistent (re-save it)")
    bad = [f"{n}: plan {plan[n].weight_bits} bits, weights give {now[n].weight_bits}"
           for n in plan if plan[n].weight_bits != now[n].weight_bits]
    if bad:
        raise ValueError(f"the BitPlan in config.json does not match the saved quantizer state ({bad[:3]}); "
                         "the checkpoint is inconsistent (re-save it with save_pretrained)")


class MpqHfQuantizer(HfQuantizer):
    """Loads/saves mpq_plugin models through ``from_pretrained``/``save_pretrained`` (QAT-trainable)."""

    requires_calibration = False

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        get_method(self.quantization_config.method)  # clear ValueError for unknown methods

    def update_dtype(self, dtype: Optional[torch.dtype]) -> Optional[torch.dtype]:
        return dtype

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        qcfg: MpqConfig = self.quantization_config
        mcfg, names = _swap(model, qcfg)
        model._mpq_config = mcfg  # type: ignore[assignment]
        _share_qkv(model, qcfg, names)
        if self.pre_quantized:
            if qcfg.bit_plan is not None:
                missing = sorted(set(qcfg.bit_plan.get("layers", {})) ^ set(names))
                if missing:
                    raise ValueError(f"the BitPlan in config.json does not match the layers this config "
                                     f"quantizes (differences: {missing[:5]}); nothing was loaded")
        else:
            ignore = set(getattr(model, "_keys_to_ignore_on_load_missing", None) or ())
            ignore.add(r"\.(weight|input)_quantizer\.")
            model._keys_to_ignore_on_load_missing = ignore  # quantizers are new: not a loading problem
        log.info("mpq: %d layers quantized with %r", len(names), qcfg.method)
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        mcfg: MPQConfig = model._mpq_config  # type: ignore[assignment]
        if not self.pre_quantized:
            _reset_quantizers(model, mcfg)
            _share_qkv(model, self.quantization_config, [n for n, _ in quant_layers(model)])
        else:
            _check_all_loaded(model)
            if self.quantization_config.bit_plan is not None:
                _check_plan(model, self.quantization_config.bit_plan)
            for _, layer in quant_layers(model):
                if layer.weight_quantizer.replaces_weight:  # its own parameters carry the weight (CSQ)
                    layer.weight.requires_grad_(False)
        return model

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        return False  # weights load as float; quantizers are modules around them

    def get_state_dict_and_metadata(self, model: nn.Module) -> Tuple[None, Dict[str, str]]:
        """Called by ``save_pretrained`` before config.json is written: store the BitPlan there."""
        plan = current_bit_plan(model)
        stored = json.loads(plan.to_json())
        stored["frozen"] = all(bool(l.weight_quantizer.bits_fixed) for _, l in quant_layers(model))
        self.quantization_config.bit_plan = stored
        self.quantization_config.mpq_version = mpq_plugin.__version__
        return None, {"mpq_bit_plan": plan.to_json(indent=None)}

    def _dequantize(self, model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
        mpq_plugin.dequantize_(model)
        return model

    def is_serializable(self, safe_serialization: Any = None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True


# -- registration (idempotent) -----------------------------------------------------------------------
def _ours(cls: Optional[type], name: str) -> bool:
    return cls is not None and cls.__module__ == __name__ and cls.__name__ == name


def register() -> None:
    """Register ``quant_method="mpq"`` with transformers; safe to call any number of times.

    Raises:
        ValueError: another package already registered ``"mpq"``.
    """
    for mapping, cls, fn in ((AUTO_QUANTIZATION_CONFIG_MAPPING, MpqConfig, register_quantization_config),
                             (AUTO_QUANTIZER_MAPPING, MpqHfQuantizer, register_quantizer)):
        existing = mapping.get(QUANT_METHOD)
        if existing is cls:
            continue
        if existing is None:
            fn(QUANT_METHOD)(cls)
        elif _ours(existing, cls.__name__):
            mapping[QUANT_METHOD] = cls  # this module was re-imported/reloaded: keep the newest class
        else:
            raise ValueError(f"quant_method {QUANT_METHOD!r} is already registered by "
                             f"{existing.__module__}.{existing.__name__}; mpq_plugin cannot register it")


register()


# -- training helpers --------------------------------------------------------------------------------
def calibrate(model: nn.Module, batch: Mapping[str, Any]) -> None:
    """One no-grad eval-mode forward on ``batch`` (a dict of model inputs) to initialize activation
    quantizers (``act_bits`` set). Call it before building the optimizer and before
    ``Accelerator.prepare`` so every process starts from the same state (DDP broadcasts rank 0's)."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        for m, t in modes.items():
            m.training = t


class MPQSearchCallback(TrainerCallback):
    """Steps an :class:`mpq_plugin.search.MPQSearch` after each optimizer step and (optionally)
    freezes the plan at the end of training.

    The callback adds nothing to the loss (callbacks cannot): use :class:`MPQTrainer`, or add
    ``search.penalty()`` in your own ``compute_loss``.
    """

    def __init__(self, search: Any, freeze_at_end: bool = False) -> None:
        self.search = search
        self.freeze_at_end = freeze_at_end
        self.plan: Optional[BitPlan] = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if not self.search.frozen:
            self.search.step()
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.freeze_at_end and not self.search.frozen:
            self.plan = self.search.freeze()
        return control


class MPQTrainer(Trainer):
    """``Trainer`` whose training loss is ``task loss + search.penalty()``; steps the search.

    The default optimizer gets separate parameter groups, as the native ``fit`` builds them
    (:func:`mpq_plugin.search.optimizer_param_groups`): model weights with ``args.learning_rate``
    and ``args.weight_decay`` (none on biases and norms, as the Trainer does); quantizer parameters
    with ``args.learning_rate * mpq_quantizer_lr_mult`` and no decay; and the quantizers'
    ``bit_parameters()`` (SDQ's betas, CSQ's mask logits) with ``mpq_bit_lr`` and no decay. SDQ's
    betas must travel from 1 to the decay threshold within the search, which a weight learning rate
    such as 5e-5 never does: give them their own (e.g. ``mpq_bit_lr=0.05``). The scheduler scales
    every group alike. An optimizer passed through ``optimizers=`` is used as given.

    Args:
        mpq_search: an :class:`mpq_plugin.search.MPQSearch` over ``model``.
        freeze_at_end: call ``search.freeze()`` when training ends (plan in ``self.mpq_plan``).
        mpq_quantizer_lr_mult: learning-rate multiplier of quantizer parameters.
        mpq_bit_lr: learning rate of the bit parameters (``None``: the quantizer learning rate).
        Other arguments: as :class:`transformers.Trainer`.

    Raises:
        ValueError: a non-positive ``mpq_quantizer_lr_mult`` or ``mpq_bit_lr``.
    """

    def __init__(self, *args: Any, mpq_search: Any, freeze_at_end: bool = False,
                 mpq_quantizer_lr_mult: float = 1.0, mpq_bit_lr: Optional[float] = None, **kwargs: Any) -> None:
        for name, v in (("mpq_quantizer_lr_mult", mpq_quantizer_lr_mult), ("mpq_bit_lr", mpq_bit_lr)):
            if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0):
                raise ValueError(f"{name}={v!r} must be a positive number (e.g. mpq_bit_lr=0.05)")
        super().__init__(*args, **kwargs)
        self.mpq_search = mpq_search
        self.mpq_quantizer_lr_mult = float(mpq_quantizer_lr_mult)
        self.mpq_bit_lr = float(mpq_bit_lr) if mpq_bit_lr is not None else None
        self._mpq_callback = MPQSearchCallback(mpq_search, freeze_at_end)
        self.add_callback(self._mpq_callback)

    def create_optimizer(self, model: Optional[nn.Module] = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer class and settings over mpq_plugin's parameter groups."""
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        no_decay = [n for n, _ in opt_model.named_parameters() if n not in decay]
        groups = optimizer_param_groups(opt_model, lr=self.args.learning_rate, weight_decay=self.args.weight_decay,
                                        quantizer_lr_mult=self.mpq_quantizer_lr_mult, bit_lr=self.mpq_bit_lr,
                                        no_decay=no_decay)
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        optimizer_kwargs = dict(optimizer_kwargs)
        if "params" in optimizer_kwargs or "model" in optimizer_kwargs:
            raise ValueError(f"MPQTrainer builds its own parameter groups and cannot use optim={self.args.optim!r}, "
                             "which builds its own; pass optimizers=(opt, None) instead")
        optimizer_kwargs.pop("lr", None)  # every group sets its own
        self.optimizer = optimizer_cls(groups, lr=self.args.learning_rate, **optimizer_kwargs)
        return self.optimizer

    @property
    def mpq_plan(self) -> Optional[BitPlan]:
        return self._mpq_callback.plan

    def compute_loss(self, model: nn.Module, inputs: Any, return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if not model.training:
            return out
        loss, outputs = out if return_outputs else (out, None)
        penalty = self.mpq_search.penalty()
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) \
                or self.compute_loss_func is not None
        if scaled:  # the Trainer will not divide by the accumulation steps: do it for the penalty
            penalty = penalty / max(int(getattr(self, "current_gradient_accumulation_steps", 1) or 1), 1)
        loss = loss + penalty.to(loss.device, loss.dtype)
        return (loss, outputs) if return_outputs else loss
