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

Host state: buffers whose value steers the forward's Python control flow (``initialized``,
``signed_flag``, ``bits_fixed``, a method's level or kept planes; ``host_state``) are read with
:meth:`FakeQuantizer.host` and written with :meth:`FakeQuantizer.set_host`. Each has a plain Python
mirror, so ``torch.compile`` reads a constant it guards on instead of breaking the graph on
``.item()``, and recompiles only when such a value changes (an SDQ decay, ``fix_bits``). Values
that change every step (temperatures, SDQ samples) stay in tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Optional, Tuple, Union

import torch
from torch import nn

from mpq_plugin.core.state import QuantState


HostValue = Union[bool, int, Tuple[Any, ...]]


def host_attr(name: str) -> str:
    """Attribute holding the Python mirror of the host-state buffer ``name``."""
    return "_host_" + name


def _host_value(buf: torch.Tensor) -> HostValue:
    return buf.item() if buf.dim() == 0 else tuple(buf.tolist())


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
    #: buffers whose host value steers ``forward`` (see the module docstring); subclasses extend it
    host_state: ClassVar[Tuple[str, ...]] = ("initialized", "bits_fixed", "signed_flag")

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

    # -- host state: buffers mirrored as Python values -------------------------------------
    def host(self, name: str) -> HostValue:
        """Host value of the ``host_state`` buffer ``name`` (bool/int; tuple for a vector buffer).

        Eagerly it is read from the buffer, so any in-place write to the buffer counts, and the
        mirror follows. While ``torch.compile`` traces, the mirror is returned: dynamo guards on it
        instead of breaking the graph. Besides eager reads, the mirror follows :meth:`set_host`,
        assignment of the buffer (``register_buffer``) and ``load_state_dict``.
        """
        attr = host_attr(name)
        if torch.compiler.is_compiling() and hasattr(self, attr):  # no mirror (an old pickle): read the buffer
            return getattr(self, attr)
        value = _host_value(getattr(self, name))
        if getattr(self, attr, None) != value:
            setattr(self, attr, value)
        return value

    def set_host(self, name: str, value: Any) -> None:
        """Write the ``host_state`` buffer ``name`` (a number, or a tensor to copy) and its mirror."""
        buf = getattr(self, name)
        if isinstance(value, torch.Tensor):
            buf.copy_(value)
        else:
            buf.fill_(value)
        self._mirror(name, buf)

    def _mirror(self, name: str, buf: Optional[torch.Tensor]) -> None:
        if buf is not None and not buf.is_meta:  # a meta skeleton is mirrored when its values load
            setattr(self, host_attr(name), _host_value(buf))

    def register_buffer(self, name: str, tensor: Optional[torch.Tensor], persistent: bool = True) -> None:
        # also reached by ``module.<buffer> = tensor`` (how transformers' loader assigns checkpoint tensors)
        super().register_buffer(name, tensor, persistent)
        if name in self.host_state:
            self._mirror(name, tensor)

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        for name in self.host_state:  # the buffers this module owns (not those a bit-sharing leader holds)
            self._mirror(name, self._buffers.get(name))

    # -- shared helpers -------------------------------------------------------------------
    @property
    def role(self) -> str:
        return self.spec.role

    @property
    def signed(self) -> bool:
        flag = self.host("signed_flag")
        if flag < 0:
            raise RuntimeError("signedness is decided by the first tensor: run a forward pass first")
        return bool(flag)

    @property
    def per_channel(self) -> bool:
        return self.spec.channels is not None

    def extra_repr(self) -> str:
        return f"role={self.spec.role}, bits={self.spec.bits}, per_channel={self.per_channel}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.host("initialized"):
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
            if self.host("signed_flag") < 0:
                self.set_host("signed_flag", int(bool((x < 0).any())))
            self.initialize(x)
        self.set_host("initialized", True)

    def fix_bits(self) -> None:
        """Fix the bit-width at its current (rounded) value; subclasses lock their state."""
        self.set_host("bits_fixed", True)

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
