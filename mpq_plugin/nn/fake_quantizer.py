"""FakeQuantizer: the base module every method's quantizer derives from.

A quantizer owns its parameters and calls pure functions from ``mpq_plugin.core``. The rest of
the library (search, export, integrations) sees it only through this interface:

* ``forward(x)``: the fake-quantized tensor (initializes itself from the first tensor it sees);
* ``bit_width()``: the current bit-width as a float tensor (differentiable where the method
  has a gradient path to it);
* ``penalty_terms()``: the method's own regularizers, a dict of scalar tensors;
* ``set_progress(p)``: schedules (temperature, candidate decay) driven by training progress;
* ``fix_bits()``: end of search, the bit-width is fixed from now on (finetune phase);
* ``freeze(x) -> QuantState``: integer codes, scale, zero point and bits, such that
  ``freeze(x).dequantize() == forward(x)`` bit for bit once bits are fixed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Optional, Tuple

import torch
from torch import nn

from mpq_plugin.core.state import QuantState


@dataclass(frozen=True)
class QuantizerSpec:
    """Where a quantizer sits and what it may do.

    Attributes:
        role: ``"weight"`` or ``"act"``.
        bits: ``(min_bits, max_bits)``; equal values mean a fixed bit-width.
        signed: ``True``/``False``, or ``None`` to decide from the first tensor seen
            (activations: signed iff that tensor has negative values).
        channels: number of channels for per-channel scales (``None``: per tensor).
        axis: channel axis of the quantized tensor.
        shape: shape of the weight (weights only; some methods need it at construction).
    """

    role: str
    bits: Tuple[int, int]
    signed: Optional[bool] = None
    channels: Optional[int] = None
    axis: int = 0
    shape: Optional[Tuple[int, ...]] = None

    def __post_init__(self) -> None:
        if self.role not in ("weight", "act"):
            raise ValueError(f"role={self.role!r}; use 'weight' or 'act'")

    @property
    def fixed(self) -> bool:
        return self.bits[0] == self.bits[1]


class FakeQuantizer(nn.Module):
    """Base class; subclasses register with ``@register_method(name, Options)``."""

    method: ClassVar[str] = ""
    options_cls: ClassVar[Any] = None
    supports_per_channel: ClassVar[bool] = False
    #: the quantizer synthesizes the weight from its own parameters (CSQ's bit planes)
    replaces_weight: ClassVar[bool] = False
    #: the method's own budget formulation, used by ``mpq_plugin.search`` by default:
    #: ``hinge_sq`` (learned range: lambda * relu(cost - target)^2), ``signed`` (CSQ:
    #: lambda * (hard_cost - target) * soft_cost, which lets bits regrow), ``hinge``
    #: (SDQ: lambda * relu(expected_cost - target)), ``none`` (fixed-bit baselines)
    budget_penalty: ClassVar[str] = "hinge_sq"
    #: ``False`` for fixed-bit baselines (they need ``weight_bits`` as one integer)
    searches_bits: ClassVar[bool] = True
    #: names of the parameters/buffers that decide the bit-width (what ``nn.sharing`` ties across
    #: a group, e.g. q/k/v); ``None``: undeclared, so the bits of this method cannot be shared
    bit_state: ClassVar[Optional[Tuple[str, ...]]] = None

    def __init__(self, spec: QuantizerSpec, options: Any = None) -> None:
        super().__init__()
        if spec.channels is not None and not self.supports_per_channel:
            raise ValueError(
                f"method {self.method!r} quantizes per tensor only; set per_channel=False "
                f"or use a method that supports per-channel scales"
            )
        self.spec = spec
        self.options = options if options is not None else self.options_cls()
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("bits_fixed", torch.tensor(False))
        self.register_buffer("signed_flag", torch.tensor(-1 if spec.signed is None else int(spec.signed)))

    # -- shared helpers -------------------------------------------------------------------
    @property
    def role(self) -> str:
        return self.spec.role

    @property
    def signed(self) -> bool:
        if int(self.signed_flag) < 0:
            raise RuntimeError("signedness is decided by the first tensor: run a forward pass first")
        return bool(int(self.signed_flag))

    @property
    def per_channel(self) -> bool:
        return self.spec.channels is not None

    def extra_repr(self) -> str:
        return f"role={self.spec.role}, bits={self.spec.bits}, per_channel={self.per_channel}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            self._initialize_from(x)
        return self.quantize(x)

    def _initialize_from(self, x: torch.Tensor) -> None:
        with torch.no_grad():
            x = x.detach()
            if not torch.isfinite(x).all():
                raise ValueError(
                    f"{self.method} {self.role} quantizer got NaN/Inf values at initialization; "
                    "check the float model and its inputs before quantizing"
                )
            if int(self.signed_flag) < 0:
                self.signed_flag.fill_(int(bool((x < 0).any())))
            self.initialize(x)
        self.initialized.fill_(True)

    def fix_bits(self) -> None:
        """Fix the bit-width at its current (rounded) value; subclasses lock their state."""
        self.bits_fixed.fill_(True)

    def set_progress(self, progress: float) -> None:
        """Training progress in [0, 1] for schedules; the default has none."""

    def penalty_terms(self) -> Dict[str, torch.Tensor]:
        """The method's own regularizers (the budget penalty lives in ``mpq_plugin.search``)."""
        return {}

    # -- to implement -----------------------------------------------------------------------
    def initialize(self, x: torch.Tensor) -> None:
        """Set parameters from the first tensor (a weight, or a calibration batch)."""
        raise NotImplementedError

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """The fake-quantized tensor."""
        raise NotImplementedError

    def bit_width(self) -> torch.Tensor:
        """Current bit-width (float tensor, sign bit included for signed tensors)."""
        raise NotImplementedError

    def hard_bit_width(self) -> torch.Tensor:
        """The integer bit-width this quantizer would have if frozen now (no gradient)."""
        with torch.no_grad():
            return torch.round(self.bit_width().detach())

    def freeze(self, x: Optional[torch.Tensor] = None) -> QuantState:
        """Integer form: codes of ``x`` (weights) plus scale, zero point and bits."""
        raise NotImplementedError

    # for replaces_weight quantizers: the float weight they currently represent
    def float_weight(self) -> torch.Tensor:
        raise NotImplementedError
