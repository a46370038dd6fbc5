"""torchao ``quantize_`` integration: :class:`MPQQATConfig`, an ``AOBaseConfig`` registered with
``register_quantize_module_handler``.

``quantize_(model, MPQQATConfig(method="csq", weight_bits=(2, 8)))`` swaps layers for mpq_plugin's
own ``QuantLinear`` / ``QuantConv2d`` (``mpq_plugin.nn.layers.wrap_layer``: parameters are shared,
state-dict keys stay the same), so the rest of mpq_plugin (``MPQSearch``, ``freeze``,
``model_cost``) works unchanged.

Traps (see ``docs/integrations-torch.md``):

* ``quantize_``'s default ``filter_fn`` is torchao's ``_is_linear`` (also when ``filter_fn=None``
  is passed with a plain config): convolutions need ``filter_fn=is_quantizable``;
* ``FqnToConfig`` requires ``filter_fn=None`` (``ValueError: Custom filter_fn and FqnToConfig
  were both specified``) and applies ``"_default"`` to ``nn.Linear`` only; name convolutions
  explicitly (or with ``"re:"`` patterns);
* torchao's ``QATConfig(weight_config=...)`` rejects third-party fake-quant configs
  (``ValueError: Unknown config type``), hence a config of our own.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn
from torchao.core.config import AOBaseConfig
from torchao.quantization.transform_module import register_quantize_module_handler

from mpq_plugin import methods as _methods  # noqa: F401  (registers the built-in methods)
from mpq_plugin.api import _layer_quantizers, check_finite_weights
from mpq_plugin.config import MPQConfig
from mpq_plugin.nn.layers import QUANT_LAYER_TYPES, QuantLayer, wrap_layer
from mpq_plugin.nn.matching import LayerSettings
from mpq_plugin.registry import get_method

log = logging.getLogger(__name__)

__all__ = ["MPQQATConfig", "is_quantizable"]

BitsArg = Union[int, Tuple[int, int]]


@dataclass
class MPQQATConfig(AOBaseConfig):
    """Learned mixed-precision QAT for ``torchao.quantization.quantize_``.

    Args:
        method: a registered method (``sdq``, ``learned_range``, ``csq``, ``lsq``, ...).
        weight_bits: ``(min, max)`` weight bits (an int fixes them); default ``(2, 8)`` for
            searching methods, 4 for fixed-bit baselines.
        act_bits: input-activation bits (``None``: weight-only).
        per_channel: per-output-channel weight scales (methods that support them).
        quantize_embeddings: also quantize ``nn.Embedding`` weights.
        options: the method's own options (``mpq_plugin.MPQConfig.options``).

    Example:
        >>> quantize_(model, MPQQATConfig(method="sdq"), filter_fn=is_quantizable)      # doctest: +SKIP
        >>> quantize_(model, FqnToConfig({"fc": MPQQATConfig(weight_bits=4),            # doctest: +SKIP
        ...                               "re:features\\..*": MPQQATConfig(weight_bits=(2, 6))}), filter_fn=None)
    """

    method: str = "sdq"
    weight_bits: Optional[BitsArg] = None
    act_bits: Optional[BitsArg] = 8
    per_channel: bool = False
    quantize_embeddings: bool = False
    options: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.mpq_config()  # validate at construction: a bad value fails where it was written

    def mpq_config(self) -> MPQConfig:
        """The equivalent native :class:`mpq_plugin.MPQConfig`."""
        wb = self.weight_bits
        if wb is None:
            wb = (2, 8) if get_method(self.method).quantizer_cls.searches_bits else 4
        return MPQConfig(method=self.method, weight_bits=wb, act_bits=self.act_bits, per_channel=self.per_channel,
                         quantize_embeddings=self.quantize_embeddings, options=dict(self.options))


def is_quantizable(module: nn.Module, fqn: str = "") -> bool:
    """``filter_fn`` for ``quantize_``: the layer types mpq_plugin quantizes (Conv1d, Conv2d,
    Linear; Embedding is decided by the config), exact type match, not yet quantized."""
    return type(module) in QUANT_LAYER_TYPES and not isinstance(module, QuantLayer)


@register_quantize_module_handler(MPQQATConfig)
def _mpq_qat_transform(module: nn.Module, config: MPQQATConfig, *, parameter_name: Optional[str] = None) -> nn.Module:
    """Swap one float layer for its mpq_plugin quantized version; anything else (containers
    matched by a ``re:`` pattern, already quantized layers, a bias named by ``FqnToConfig``) is
    returned unchanged."""
    if parameter_name is not None and parameter_name != "weight":
        log.info("MPQQATConfig quantizes weights; ignoring parameter %r", parameter_name)
        return module
    if not is_quantizable(module):
        return module
    cfg = config.mpq_config()
    if isinstance(module, nn.Embedding) and not cfg.quantize_embeddings:
        return module
    check_finite_weights(module)
    act = None if isinstance(module, nn.Embedding) else cfg.act_bits
    wq, aq = _layer_quantizers(module, LayerSettings(cfg.weight_bits, act), cfg)  # type: ignore[arg-type]
    layer = wrap_layer(module, wq, aq)
    layer._mpq_train_steps = 0  # training forwards (convert_mpq warns when frozen untrained)
    layer.register_forward_pre_hook(_count_training_forward)
    return layer


def _count_training_forward(module: nn.Module, args: Any) -> None:
    if module.training and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        module._mpq_train_steps = module.__dict__.get("_mpq_train_steps", 0) + 1
