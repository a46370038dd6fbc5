"""Learned step size and dynamic range (Uhlich et al., ICLR 2020, "Mixed Precision DNNs").

Each tensor gets a uniform quantizer with a power-of-two step ``d`` and a dynamic range
``q_max``; the bit-width is not a parameter but *inferred* from them,
``b = ceil(log2(round(q_max/d) + 1) + 1)`` (no ``+1`` for unsigned activations), so a size
penalty on ``b`` reaches ``d`` and ``q_max`` through straight-through ``ceil``/``round``.
Six parametrizations of the paper are selectable: uniform U1=(b, d), U2=(b, q_max),
U3=(d, q_max) (default, the paper's recommendation) and power-of-two P1=(b, q_max),
P2=(b, q_min), P3=(q_min, q_max). The forward pass follows the official nnabla code
(``sony/ai-research-code/mixed-precision-dnns/parametric_quantization.py``); the choices where
paper and code disagree are listed in ``docs/_methods_learned_range.md``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from mpq_plugin.config import MAX_BITS, MIN_BITS, MethodOptions
from mpq_plugin.core.affine import pow2_exponent, pow2_round_ste
from mpq_plugin.core.bitwidth import learned_range_bits, learned_range_pow2_bits
from mpq_plugin.core.range_quant import _clip_round, _UniformFakeQuant  # noqa: F401  (moved to core)
from mpq_plugin.kernels import pow2_fake_quant, uniform_fake_quant  # dispatched: triton / compiled / eager
from mpq_plugin.core.state import QuantState
from mpq_plugin.core.ste import ROUNDING_MODES, ceil_ste, floor_ste, round_nograd, round_ste
from mpq_plugin.nn.fake_quantizer import FakeQuantizer, QuantizerSpec
from mpq_plugin.registry import register_method

log = logging.getLogger(__name__)

#: learnable parameters of each parametrization (names of the ``nn.Parameter`` attributes)
PARAMETRIZATIONS: Dict[str, Tuple[str, str]] = {
    "U1": ("b", "d"),
    "U2": ("b", "q_max"),
    "U3": ("d", "q_max"),
    "P1": ("b", "q_max"),
    "P2": ("b", "q_min"),
    "P3": ("q_min", "q_max"),
}
GRAD_VARIANTS = ("paper", "code")
ACT_INITS = ("data", "paper")
_RANGE_FIELDS = ("weight_step_range", "weight_qmax_range", "weight_qmin_range",
                 "act_step_range", "act_qmax_range", "act_qmin_range")
_PROJECT_EPS = 1e-5  # the official code keeps parameters 1e-5 inside their clamp ranges
#: largest log2(q_max/q_min) of a pow2 quantizer: its codes on the q_min grid stay exact in float32
POW2_MAX_SPAN = 23


@dataclass(frozen=True)
class LearnedRangeOptions(MethodOptions):
    """Options of the learned step size / dynamic range method.

    Attributes:
        parametrization: ``U3`` (default), ``U1``, ``U2``, ``P1``, ``P2`` or ``P3``.
        pow2_step: uniform step rounded to a power of two (``2^round(log2 d)``, STE), as the
            paper's "uniform" quantizer; ``False`` learns a float step (not the paper).
        rounding: ``half_away`` (paper Eq. 1 / nnabla) or ``half_even`` (``torch.round``).
        grad_variant: ``paper``: clipped elements give ``dQ/dd = 0`` (Eq. 3); ``code``: they
            give ``round(q_max/d) - q_max/d`` as autograd of the official graph does.
        init_bits: bit-width to start from (clamped into the layer's bit range).
        act_init: ``data``: step chosen from the first batch's max like weights (find_delta);
            ``paper``: ``d = act_init_step``, ``q_max = d (2^b - 1)`` as the official code.
        act_init_step: the fixed initial activation step of ``act_init="paper"``.
        weight_step_range, weight_qmax_range, weight_qmin_range, act_step_range,
        act_qmax_range, act_qmin_range: clamp ranges of ``d``, ``q_max``, ``q_min``
            (official cfg defaults), applied in the forward pass.
        sony_code_extras: after each optimizer step (lazily, before the parameters are next
            used) project ``d < q_max`` and the clamp ranges onto the stored parameters as the
            official training script does. Gradient clipping is left to the trainer
            (:meth:`LearnedRangeQuantizer.clip_grads_`).
    """

    parametrization: str = "U3"
    pow2_step: bool = True
    rounding: str = "half_away"
    grad_variant: str = "paper"
    init_bits: int = 4
    act_init: str = "data"
    act_init_step: float = 2.0**-3
    weight_step_range: Tuple[float, float] = (2.0**-8, 1.0)
    weight_qmax_range: Tuple[float, float] = (2.0**-8, 127.0)
    weight_qmin_range: Tuple[float, float] = (2.0**-16, 127.0)
    act_step_range: Tuple[float, float] = (2.0**-8, 1.0)
    act_qmax_range: Tuple[float, float] = (2.0**-8, 255.0)
    act_qmin_range: Tuple[float, float] = (2.0**-14, 255.0)
    sony_code_extras: bool = False

    def __post_init__(self) -> None:
        if self.parametrization not in PARAMETRIZATIONS:
            raise ValueError(
                f"parametrization={self.parametrization!r}; supported: {', '.join(PARAMETRIZATIONS)}"
                " (U3 is the paper's recommended one)"
            )
        if self.rounding not in ROUNDING_MODES:
            raise ValueError(f"rounding={self.rounding!r}; use one of {ROUNDING_MODES}")
        if self.grad_variant not in GRAD_VARIANTS:
            raise ValueError(f"grad_variant={self.grad_variant!r}; use one of {GRAD_VARIANTS}")
        if self.act_init not in ACT_INITS:
            raise ValueError(f"act_init={self.act_init!r}; use one of {ACT_INITS}")
        if isinstance(self.init_bits, bool) or not isinstance(self.init_bits, int) \
                or not MIN_BITS <= self.init_bits <= MAX_BITS:
            raise ValueError(f"init_bits={self.init_bits!r} must be an integer in {MIN_BITS}..{MAX_BITS}")
        if not self.act_init_step > 0:
            raise ValueError(f"act_init_step={self.act_init_step!r} must be positive, e.g. 0.125")
        for name in _RANGE_FIELDS:
            value = getattr(self, name)
            try:
                lo, hi = (float(v) for v in value)
            except (TypeError, ValueError):
                raise ValueError(f"{name}={value!r} must be a (min, max) pair of numbers") from None
            if not 0 < lo < hi < math.inf:
                raise ValueError(f"{name}={value!r} needs 0 < min < max < inf")
            object.__setattr__(self, name, (lo, hi))  # JSON lists -> tuples


# -- pure functions -------------------------------------------------------------------------
class _Cap(torch.autograd.Function):
    """``clamp(x, lo, hi)`` whose gradient never leaves ``x`` stuck outside ``[lo, hi]``.

    Inside (bounds included) ``x`` gets the gradient. Outside, a gradient whose descent step
    moves ``x`` back inside still goes to ``x``; one that pushes further out goes to the bound
    ``x`` is pinned to (to nobody when the bound is a constant). Used for the clamp ranges of
    the parameters (in place of the official per-step projection) and for the bit range of the
    inferred bit-width's gradient path.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, lo, hi)
        return torch.minimum(torch.maximum(x, lo), hi)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        x, lo, hi = ctx.saved_tensors
        above, below = x > hi, x < lo
        to_x = ~(above | below) | (above & (g > 0)) | (below & (g < 0))
        zero = torch.zeros_like(g)
        gx = torch.where(to_x, g, zero).sum_to_size(x.shape)
        glo = torch.where(below & ~to_x, g, zero).sum_to_size(lo.shape) if ctx.needs_input_grad[1] else None
        ghi = torch.where(above & ~to_x, g, zero).sum_to_size(hi.shape) if ctx.needs_input_grad[2] else None
        return gx, glo, ghi


def cap(x: torch.Tensor, lo: Any, hi: Any) -> torch.Tensor:
    """:class:`_Cap` with float or tensor bounds."""
    lo_t = torch.as_tensor(lo, dtype=x.dtype, device=x.device)
    hi_t = torch.as_tensor(hi, dtype=x.dtype, device=x.device)
    return _Cap.apply(x, lo_t, hi_t)


class _ValueFrom(torch.autograd.Function):
    """Forward: ``value`` exactly; backward: the gradient goes to ``surrogate`` (same shape)."""

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
        return value.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        return None, g


def _pow2_ceil_ste(v: torch.Tensor) -> torch.Tensor:
    """``2^ceil(log2 v)`` with a straight-through exponent (backward ``2^ceil(log2 v) / v``)."""
    return torch.pow(2.0, ceil_ste(torch.log2(v)))


def _pow2_floor_ste(v: torch.Tensor) -> torch.Tensor:
    """``2^floor(log2 v)`` with a straight-through exponent."""
    return torch.pow(2.0, floor_ste(torch.log2(v)))


def level_bounds(lo: torch.Tensor, hi: torch.Tensor, signed: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Smallest/largest positive level count ``L = round(q_max/d)`` whose inferred bits lie in ``[lo, hi]``.

    Signed: ``b(L) = ceil(log2(L+1) + 1)`` is ``b`` for ``L in [2^(b-2), 2^(b-1)-1]`` (at least
    one level: a signed uniform quantizer has 2 bits or more); unsigned: ``b(L) = ceil(log2(L+1))``
    is ``b`` for ``L in [2^(b-1), 2^b-1]``.
    """
    if signed:
        return 2.0 ** torch.clamp(lo - 2, min=0.0), 2.0 ** (hi - 1) - 1
    return 2.0 ** (lo - 1), 2.0**hi - 1


def pow2_ratio_bounds(lo: torch.Tensor, hi: torch.Tensor, extra: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Smallest/largest ``log2(q_max/q_min)`` whose pow2 bits ``ceil(log2(E)) + extra`` lie in ``[lo, hi]``.

    ``E = log2(q_max/q_min) + 1`` magnitudes; ``extra`` counts the sign bit and the zero flag.
    The largest span is also capped at ``2^POW2_MAX_SPAN`` so frozen codes stay exact in float32.
    """
    k = lo - extra
    e_min = torch.where(k >= 1, 2.0 ** (k - 1) + 1, torch.ones_like(lo))
    e_max = 2.0 ** torch.clamp(hi - extra, max=6.0)
    return e_min - 1, torch.clamp(e_max - 1, max=float(POW2_MAX_SPAN))


def find_delta(max_abs: float, bits: int, levels: float, pow2: bool = True) -> float:
    """Initial step of the official ``find_delta``: ``2^floor(log2(max|x| / L))`` (``ceil`` if ``b > 4``).

    ``L`` is the positive level count at ``b`` bits (``2^(b-1) - 1`` signed, ``2^b - 1``
    unsigned); ``ceil`` above 4 bits means no clipping at init. ``pow2=False``: ``max|x| / L``.
    """
    ratio = (max_abs + float(torch.finfo(torch.float32).eps)) / max(levels, 1.0)
    if not pow2:
        return ratio
    exponent = math.ceil(math.log2(ratio)) if bits > 4 else math.floor(math.log2(ratio))
    return 2.0**exponent


@dataclass
class LearnedRangeState(QuantState):
    """A :class:`QuantState` whose ``quantize`` reproduces this method's forward exactly.

    The plain ``QuantState.quantize`` clips at the ``bits`` range and rounds half to even; here
    codes clip at the learned level ``extra["code_min"/"code_max"]`` (``±L``, tighter than
    ``bits`` when ``L < 2^(b-1) - 1``) with the method's rounding (``extra["rounding"]``), and
    pow2 states (``extra["format"] == "pow2"``) round magnitudes to powers of two.
    """

    def quantize(self, x: torch.Tensor, rounding: Optional[str] = None) -> torch.Tensor:
        with torch.no_grad():
            if self.extra.get("format") == "pow2":
                qmin = torch.tensor(2.0 ** self.extra["exp_min"], dtype=torch.float32, device=x.device)
                qmax = torch.tensor(2.0 ** self.extra["exp_max"], dtype=torch.float32, device=x.device)
                y = pow2_fake_quant(x, qmin, qmax, self.signed, self.extra["with_zero"])
                return torch.round(y / qmin).to(torch.int64)
            d = self.scale.to(x.device)
            q = d * float(self.extra["code_max"])
            return _clip_round(x, d, q, self.signed, rounding or self.extra["rounding"])[1].to(torch.int64)


# -- the quantizer ---------------------------------------------------------------------------
@register_method("learned_range", LearnedRangeOptions)
class LearnedRangeQuantizer(FakeQuantizer):
    """Learned step size and dynamic range (Uhlich et al., ICLR 2020): bits inferred from (d, q_max).

    Args:
        spec: role, bit range ``(lo, hi)`` and signedness of the quantized tensor.
        options: :class:`LearnedRangeOptions`.

    Example:
        >>> q = LearnedRangeQuantizer(QuantizerSpec("weight", (2, 8), signed=True))
        >>> y = q(torch.randn(16, 8))
        >>> int(q.bit_width())
        4
    """

    supports_per_channel = False
    budget_penalty = "hinge_sq"
    bit_state = ("b", "bit_lo", "bit_hi")  # learned b (U1/U2/P1/P2) and the allowed bit range

    def __init__(self, spec: QuantizerSpec, options: Optional[LearnedRangeOptions] = None) -> None:
        super().__init__(spec, options)
        o: LearnedRangeOptions = self.options
        lo, hi = spec.bits
        self.parametrization = o.parametrization
        self.pow2_family = o.parametrization.startswith("P")
        self.init_bits = min(max(o.init_bits, lo), hi)
        self.register_buffer("bit_lo", torch.tensor(float(lo)))
        self.register_buffer("bit_hi", torch.tensor(float(hi)))
        act = spec.role == "act"
        self.step_range = o.act_step_range if act else o.weight_step_range
        self.qmax_range = o.act_qmax_range if act else o.weight_qmax_range
        self.qmin_range = o.act_qmin_range if act else o.weight_qmin_range
        placeholder = {"b": float(self.init_bits), "d": 2.0**-3, "q_max": 1.0, "q_min": 2.0**-7}
        for name in PARAMETRIZATIONS[o.parametrization]:  # real values come from initialize()
            self.register_parameter(name, nn.Parameter(torch.tensor(placeholder[name])))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, parametrization={self.parametrization}"

    # -- parameters -> quantizer ----------------------------------------------------------
    @property
    def _with_zero(self) -> bool:
        return self.role == "act"  # pow2 activations reserve a code for zero, weights never are 0

    def _pow2_extra_bits(self) -> int:
        return int(self.signed) + int(self._with_zero)

    def _step(self, d: torch.Tensor) -> torch.Tensor:
        return pow2_round_ste(d) if self.options.pow2_step else d

    def _int_bits(self) -> torch.Tensor:
        """U1/U2/P1/P2: ``round(clip(b, lo, hi))`` with STE (official ``n``)."""
        return round_ste(cap(self.b, self.bit_lo, self.bit_hi), self.options.rounding)

    def _uniform_raw(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Step and range from the parameters, as the official graph computes them."""
        p = self.parametrization
        if p == "U2":
            n = self._int_bits() - (1.0 if self.signed else 0.0)
            q = cap(self.q_max, *self.qmax_range)
            return self._step(q / (2.0**n - 1).clamp_min(1.0)), q  # the official U2 does not clip d
        d = self._step(cap(self.d, *self.step_range))
        if p == "U1":
            n = self._int_bits() - (1.0 if self.signed else 0.0)
            return d, d * (2.0**n - 1)
        return d, cap(self.q_max, *self.qmax_range)

    def uniform_params(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(d, q_max)`` the forward pass uses (differentiable); ``round(q_max/d)`` fits the bit range.

        Where the learned step would give more than ``hi`` bits, the step becomes the smallest
        (power of two) one that holds ``q_max`` in ``hi`` bits, ``2^ceil(log2(q_max/L_max))``;
        where it would give fewer than ``lo`` bits, ``2^floor(log2(q_max/L_min))``. At a bit-range
        end the quantizer is thus TQT-like (range learned, step derived, U2's bounded gradients)
        instead of U1-like (step learned with ``L``-times larger gradients).
        """
        d, q = self._uniform_raw()
        lmin, lmax = level_bounds(self.bit_lo, self.bit_hi, self.signed)
        if self.options.pow2_step:
            finest, coarsest = _pow2_ceil_ste(q / lmax), _pow2_floor_ste(q / lmin)
        else:
            finest, coarsest = q / lmax, q / lmin
        d = torch.where(d > coarsest, coarsest, d)  # too few levels
        d = torch.where(d < finest, finest, d)  # too many levels (wins: never above hi bits)
        return d, q

    def pow2_params(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(q_min, q_max)``, powers of two, the forward pass uses (differentiable).

        As for the step of U-quantizers, ``q_min`` follows ``q_max`` where their ratio would
        leave the bit range.
        """
        qmin, qmax = self._pow2_raw()
        rmin, rmax = pow2_ratio_bounds(self.bit_lo, self.bit_hi, self._pow2_extra_bits())
        smallest, largest = qmax * 2.0 ** (-rmax), qmax * 2.0 ** (-rmin)
        qmin = torch.where(qmin > largest, largest, qmin)
        qmin = torch.where(qmin < smallest, smallest, qmin)
        return qmin, qmax

    def _pow2_raw(self) -> Tuple[torch.Tensor, torch.Tensor]:
        p = self.parametrization
        if p == "P3":
            qmin = pow2_round_ste(cap(self.q_min, *self.qmin_range))
            qmax = pow2_round_ste(cap(self.q_max, *self.qmax_range))
            return qmin, qmax
        # q_max / q_min = 2^(E - 1) with E = 2^n magnitudes; the derived end is clamped too
        n = self._int_bits() - float(self._pow2_extra_bits())
        span = torch.clamp(2.0**n - 1, max=float(POW2_MAX_SPAN))
        if p == "P1":
            qmax = pow2_round_ste(cap(self.q_max, *self.qmax_range))
            return pow2_round_ste(cap(qmax * 2.0 ** (-span), *self.qmin_range)), qmax
        qmin = pow2_round_ste(cap(self.q_min, *self.qmin_range))
        return qmin, pow2_round_ste(cap(qmin * 2.0**span, *self.qmax_range))

    # -- FakeQuantizer interface ------------------------------------------------------------
    def initialize(self, x: torch.Tensor) -> None:
        o: LearnedRangeOptions = self.options
        signed, b = self.signed, self.init_bits
        if self.pow2_family:
            self._check_pow2_bits()
        elif signed and self.spec.bits[1] < 2:
            raise ValueError(
                f"a signed uniform {self.role} quantizer needs at least 2 bits (sign + one level), "
                f"got the bit range {self.spec.bits}; raise max bits to 2 or more"
            )
        levels = float(2 ** (b - 1) - 1 if signed else 2**b - 1)
        if self.role == "act" and o.act_init == "paper":
            d0 = o.act_init_step
        else:
            max_abs = float(x.abs().max() if signed else x.clamp_min(0).max()) if x.numel() else 0.0
            d0 = find_delta(max_abs, b, levels, o.pow2_step)
        d = min(max(d0, self.step_range[0]), self.step_range[1])
        if d != d0:
            log.info("learned_range %s: initial step %.3g clamped to %.3g (step range %s)",
                     self.role, d0, d, self.step_range)
        q = min(max(d * max(levels, 1.0), self.qmax_range[0]), self.qmax_range[1])
        values = {"b": float(b), "d": d, "q_max": q}
        if self.pow2_family:  # official: xmax = pow2(d L), xmin = xmax / 2^(E-1), E = 2^(b-extra)
            qmax = 2.0 ** round(math.log2(q))
            span = min(2 ** max(b - self._pow2_extra_bits(), 0) - 1, POW2_MAX_SPAN)
            values["q_max"] = min(max(qmax, self.qmax_range[0]), self.qmax_range[1])
            values["q_min"] = min(max(math.ldexp(qmax, -span), self.qmin_range[0]), self.qmin_range[1])
        for name in PARAMETRIZATIONS[self.parametrization]:
            getattr(self, name).fill_(values[name])

    def _check_pow2_bits(self) -> None:
        extra, lo, hi = self._pow2_extra_bits(), *self.spec.bits
        top = math.ceil(math.log2(POW2_MAX_SPAN + 1)) + extra
        if hi < extra or lo > top:
            raise ValueError(
                f"a power-of-two {'signed ' if self.signed else ''}{self.role} quantizer has "
                f"{extra} + ceil(log2(#exponents)) bits, between {extra} and {top} here, but the bit "
                f"range is {self.spec.bits}; choose a range that meets {extra}..{top} or a U parametrization"
            )

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        self._maybe_project()
        if self.pow2_family:
            qmin, qmax = self.pow2_params()
            return pow2_fake_quant(x, qmin, qmax, self.signed, self._with_zero).to(x.dtype)
        d, q = self.uniform_params()
        return uniform_fake_quant(x, d, q, self.signed, self.options.rounding, self.options.grad_variant)

    def bit_width(self) -> torch.Tensor:
        """Inferred bits, differentiable (STE ``ceil``/``round``) in ``d``, ``q_max`` (or ``b``).

        Uniform: ``ceil(log2(L + 1) + 1)`` (no ``+1`` unsigned), ``L = round(q_max/d)`` with the
        forward's rounding and step, so frozen codes always fit. Pow2: ``ceil(log2(log2(q_max/q_min)
        + 1))`` plus the sign bit and the zero flag. The value is that of the quantizer the forward
        uses; the gradient is that of the same formula on the raw parameters, clamped to the bit
        range so that it still flows where it moves the bits back inside (a penalty can lower
        bits pinned at ``hi``). Before the first forward: the initial bits.
        """
        if not self.host("initialized"):
            return torch.tensor(float(self.init_bits), device=self.bit_lo.device)
        self._maybe_project()
        if self.pow2_family:
            extra = float(self._pow2_extra_bits() - 1)
            value = learned_range_pow2_bits(*self.pow2_params()) + extra
            surrogate = learned_range_pow2_bits(*self._pow2_raw()) + extra
        else:
            value = self._uniform_bits(*self.uniform_params())
            surrogate = self._uniform_bits(*self._uniform_raw())
        value = torch.clamp(value, self.bit_lo, self.bit_hi)  # a no-op by construction
        return _ValueFrom.apply(value, cap(surrogate, self.bit_lo, self.bit_hi))

    def _uniform_bits(self, d: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return learned_range_bits(d, d * round_ste(q / d, self.options.rounding), self.signed)

    def fix_bits(self) -> None:
        """Lock the bit-width: the cap on ``q_max`` (``b`` for U1/U2/P1/P2) pins it from now on."""
        with torch.no_grad():
            b = float(self.hard_bit_width())
        super().fix_bits()
        self.bit_lo.fill_(b)
        self.bit_hi.fill_(b)

    def force_bits(self, bits: int) -> None:
        """Search repair hook: the bit-width becomes ``bits`` (within ``spec.bits``).

        The learned range is kept and the step follows (``2^ceil(log2(q_max/L_max))`` or
        ``2^floor(log2(q_max/L_min))``), as at a bit-range end; a later ``fix_bits()`` fixes it.
        """
        lo, hi = self.spec.bits
        if isinstance(bits, bool) or int(bits) != bits or not lo <= bits <= hi:
            raise ValueError(f"force_bits({bits!r}): bits must be an integer in this quantizer's "
                             f"range {self.spec.bits}")
        self.bit_lo.fill_(float(bits))
        self.bit_hi.fill_(float(bits))

    def freeze(self, x: Optional[torch.Tensor] = None) -> QuantState:
        """Integer form; ``freeze(w).dequantize() == forward(w)`` bit for bit.

        Uniform: codes ``round(clip(x)/d)`` in ``[-L, L]`` (``[0, L]`` unsigned), scale ``d``
        (``pow2_exponent`` set when ``pow2_step``), ``bits`` = inferred bits; ``extra["code_max"]
        = L`` is the learned clip level, tighter than the ``bits`` range. Pow2 (P1-P3): codes on
        the uniform grid of step ``q_min`` (every level is ``±2^k q_min``), ``bits`` = the width of
        that grid; ``extra["pow2_bits"]`` is the sign+exponent storage width (= ``bit_width()``).
        """
        if not self.host("initialized"):
            if x is None:
                raise ValueError("freeze(): this quantizer has not seen a tensor yet; run a forward pass first")
            self._initialize_from(x)
        self._maybe_project()
        with torch.no_grad():
            bits = int(self.hard_bit_width())
            if self.pow2_family:
                return self._freeze_pow2(x, bits)
            d, q = self.uniform_params()
            levels = int(round_nograd(q / d, self.options.rounding))
            codes = _clip_round(x, d, q, self.signed, self.options.rounding)[1].to(torch.int64) \
                if x is not None else None
            scale = d.detach().to(torch.float32).reshape(()).clone()
            return LearnedRangeState(
                bits=bits, signed=self.signed, scale=scale, zero_point=torch.zeros((), dtype=torch.int64),
                codes=codes, axis=None, pow2_exponent=pow2_exponent(scale) if self.options.pow2_step else None,
                method=self.method,
                extra={"parametrization": self.parametrization, "rounding": self.options.rounding,
                       "code_max": levels, "code_min": -levels if self.signed else 0, "q_max": float(q)},
            )

    def _freeze_pow2(self, x: Optional[torch.Tensor], pow2_bits: int) -> QuantState:
        qmin, qmax = self.pow2_params()
        span = int(torch.round(torch.log2(qmax / qmin)))  # largest code is 2^span
        codes = None
        if x is not None:
            y = pow2_fake_quant(x, qmin, qmax, self.signed, self._with_zero)
            codes = torch.round(y.to(torch.float32) / qmin.to(torch.float32)).to(torch.int64)
        scale = qmin.detach().to(torch.float32).reshape(()).clone()
        return LearnedRangeState(
            bits=span + (2 if self.signed else 1), signed=self.signed, scale=scale,
            zero_point=torch.zeros((), dtype=torch.int64), codes=codes, axis=None,
            pow2_exponent=pow2_exponent(scale), method=self.method,
            extra={"parametrization": self.parametrization, "format": "pow2", "pow2_bits": pow2_bits,
                   "exp_min": int(pow2_exponent(qmin)), "exp_max": int(pow2_exponent(qmax)),
                   "with_zero": self._with_zero},
        )

    # -- official training-script extras --------------------------------------------------
    def set_progress(self, progress: float) -> None:
        """No schedule; the search calls this after every optimizer step, where the official
        script projects the parameters (``sony_code_extras``)."""
        self._maybe_project()

    def _maybe_project(self) -> None:
        if self.options.sony_code_extras and self.host("initialized"):
            self.project_()

    @torch.no_grad()
    def project_(self) -> None:
        """Official ``clip_quant_vals``: enforce ``d < q_max`` (P3: ``q_min < q_max``), then clamp
        every parameter 1e-5 inside its range (``b`` inside the bit range).

        Writes only parameters whose value changes, so calling it while a graph holds them is
        safe as long as nothing needed changing.
        """
        eps = _PROJECT_EPS
        names = PARAMETRIZATIONS[self.parametrization]
        new: Dict[str, torch.Tensor] = {n: getattr(self, n).detach().clone() for n in names}
        pair = {"U3": ("d", "q_max"), "P3": ("q_min", "q_max")}.get(self.parametrization)
        if pair is not None:
            small, big = new[pair[0]], new[pair[1]]
            new[pair[0]], new[pair[1]] = torch.minimum(small, big - eps), torch.maximum(small + eps, big)
        ranges = {"d": self.step_range, "q_max": self.qmax_range, "q_min": self.qmin_range}
        for name, v in new.items():
            if name == "b":
                lo, hi = float(self.bit_lo), float(self.bit_hi)
                new[name] = torch.clamp(v, lo + eps, hi - eps) if hi > lo else torch.full_like(v, lo)
            else:
                new[name] = torch.clamp(v, ranges[name][0] + eps, ranges[name][1] - eps)
        for name, v in new.items():
            p = getattr(self, name)
            if not torch.equal(p, v):
                p.copy_(v)

    @torch.no_grad()
    def clip_grads_(self) -> None:
        """Official ``clip_quant_grads`` (used when a size constraint is active): clip the
        gradients of ``(d, q_max)`` to ``±d`` (P3: of ``(q_min, q_max)`` to ``±q_min``).

        A trainer concern: call it after ``backward()`` and before ``optimizer.step()``.
        Other parametrizations are left unchanged, as in the official script.
        """
        ref_name = {"U3": "d", "P3": "q_min"}.get(self.parametrization)
        if ref_name is None:
            return
        ref = getattr(self, ref_name).detach().abs()
        for name in PARAMETRIZATIONS[self.parametrization]:
            p = getattr(self, name)
            if p.grad is not None:
                p.grad.copy_(torch.clamp(p.grad, -ref, ref))
