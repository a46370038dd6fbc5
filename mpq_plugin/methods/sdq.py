"""SDQ (Huang et al., ICML 2022): stochastic quantization between adjacent bit-widths.

Reimplementation: SDQ has no public code. What is verified (abstract, Fig. 1a): candidate
bit-widths ``b_1 < ... < b_K``; one Differentiable Bitwidth Parameter (DBP) ``beta`` per layer and
candidate; the weight is ``Q_{b_i}(w)`` with probability ``beta`` and ``Q_{b_{i-1}}(w)`` with
probability ``1 - beta``; candidates decay toward lower bits. Everything else here is a
reconstruction [U] (see ``docs/_methods_sdq.md``):

* ``Q_b``: LSQ symmetric uniform quantizer, one learned step per candidate
  (``s * clamp(round(w/s), -2^(b-1), 2^(b-1)-1)``); 1 bit is binary ``s * sign(w)``, ``sign(0)=+1``.
* DBP gradient (``estimator="ste"``): forward uses the Bernoulli sample ``z``, backward treats
  the sample as its expectation: ``d w_q / d beta = Q_{b_i}(w) - Q_{b_{i-1}}(w)``.
* Progressive decay: when ``beta < decay_threshold`` the layer moves down one candidate and the
  new pair's ``beta`` restarts at ``beta_init``.
* Activations: fixed-bit LSQ at the top of their bit range.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple, Union

import torch
from torch import nn

from mpq_plugin.config import MAX_BITS, MIN_BITS, MethodOptions
from mpq_plugin.core.affine import fake_quantize, float_range, int_range, quantize_codes, reshape_for_axis
from mpq_plugin.core.bitwidth import interpolated_bits
from mpq_plugin.core.mixture import _StochasticSelect, interpolate, stochastic_select  # noqa: F401  (moved to core)
from mpq_plugin.core.state import QuantState
from mpq_plugin.kernels import fake_quantize as kernel_fake_quantize  # dispatched: triton / compiled / eager
from mpq_plugin.kernels import sdq_interpolate, sdq_select
from mpq_plugin.core.ste import ROUNDING_MODES, grad_scale
from mpq_plugin.nn.fake_quantizer import FakeQuantizer, QuantizerSpec
from mpq_plugin.registry import register_method

log = logging.getLogger(__name__)

ESTIMATORS = ("ste", "gumbel")
BETA_PARAMS = ("clamp", "sigmoid")
INITS = ("lsq", "mse")
#: sigmoid parametrization: largest |logit| used for ``beta_init`` (sigmoid(9) ~ 0.99988)
SIGMOID_LOGIT_MAX = 9.0
#: Gumbel relaxation keeps beta and the uniform sample this far from 0 and 1 (finite logits)
GUMBEL_EPS = 1e-6


@dataclass(frozen=True)
class SDQOptions(MethodOptions):
    """Options of SDQ (every default is a reconstruction [U]; the paper's values are unknown).

    Attributes:
        candidates: weight bit-width candidates (sorted, unique, inside the layer's
            ``weight_bits`` range); ``None``: every integer of that range. Include 1 for binary layers.
        estimator: DBP gradient: ``ste`` (Bernoulli sample forward, expectation backward) or
            ``gumbel`` (binary Gumbel-softmax / concrete relaxation with temperature ``gumbel_tau``).
        gumbel_tau: Gumbel temperature at progress 0.
        gumbel_tau_final: temperature at progress 1 (geometric anneal); ``None``: constant.
        gumbel_hard: Gumbel forward uses the hard sample (a real quantized weight) with the
            relaxed gradient; ``False``: the soft mix ``z Q_hi + (1 - z) Q_lo``.
        beta_param: ``clamp`` (``beta`` used as ``clamp(beta, 0, 1)`` with identity backward and
            projected into [0, 1] by ``set_progress``/``project_``: projected gradient descent) or
            ``sigmoid`` (``beta = sigmoid(beta_logit)``; ``beta_init=1`` becomes ``sigmoid(9)``).
        beta_init: ``beta`` of the top pair at the start and of each new pair after a decay.
        decay_threshold: a layer decays one candidate when its ``beta`` falls below this (0: never).
        init: step initialization per candidate: ``lsq`` (``2<|w|>/sqrt(Q_P)``; binary:
            ``<|w|>``) or ``mse`` (grid search minimizing ``||Q_b(w) - w||^2``).
        scale_grad: LSQ gradient scale ``1/sqrt(N*Q_P)`` on the steps.
        rounding: ``half_even`` (torch) or ``half_away``.
    """

    candidates: Optional[Tuple[int, ...]] = None
    estimator: str = "ste"
    gumbel_tau: float = 1.0
    gumbel_tau_final: Optional[float] = None
    gumbel_hard: bool = True
    beta_param: str = "clamp"
    beta_init: float = 1.0
    decay_threshold: float = 0.1
    init: str = "lsq"
    scale_grad: bool = True
    rounding: str = "half_even"

    def __post_init__(self) -> None:
        if self.candidates is not None:
            c = self.candidates
            if isinstance(c, (int, str)) or not all(isinstance(b, int) and not isinstance(b, bool) for b in c):
                raise ValueError(f"candidates={c!r} must be a tuple of integer bit-widths, e.g. (1, 2, 4, 8)")
            if len(c) == 0 or len(set(c)) != len(c):
                raise ValueError(f"candidates={c!r} must be non-empty and without duplicates")
            if min(c) < MIN_BITS or max(c) > MAX_BITS:
                raise ValueError(f"candidates={c!r} must lie in {MIN_BITS}..{MAX_BITS} bits")
            object.__setattr__(self, "candidates", tuple(sorted(c)))
        for name, value, allowed in (("estimator", self.estimator, ESTIMATORS),
                                     ("beta_param", self.beta_param, BETA_PARAMS),
                                     ("init", self.init, INITS), ("rounding", self.rounding, ROUNDING_MODES)):
            if value not in allowed:
                raise ValueError(f"{name}={value!r}; use one of {allowed}")
        if not 0.0 < self.beta_init <= 1.0:
            raise ValueError(f"beta_init={self.beta_init} must be in (0, 1]; 1.0 starts at the top candidate")
        if not 0.0 <= self.decay_threshold < 1.0:
            raise ValueError(f"decay_threshold={self.decay_threshold} must be in [0, 1); 0 disables decay")
        if self.beta_init <= self.decay_threshold:
            raise ValueError(f"beta_init={self.beta_init} <= decay_threshold={self.decay_threshold} would decay "
                             "every layer at once; raise beta_init or lower decay_threshold")
        for name in ("gumbel_tau", "gumbel_tau_final"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"{name}={v} must be > 0")


# -- autograd pieces ------------------------------------------------------------------------------
class _ClampSTE(torch.autograd.Function):
    """``clamp(x, lo, hi)`` forward (exact), identity backward (projected gradient descent)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        return x.clamp(lo, hi)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        return g, None, None


class _SignSTE(torch.autograd.Function):
    """``+1`` for ``v >= 0`` else ``-1``; backward ``g * 1[|v| <= 1]`` (LSQ clip region, Q_N=Q_P=1)."""

    @staticmethod
    def forward(ctx: Any, v: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(v)
        one = torch.ones_like(v)
        return torch.where(v >= 0, one, -one)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (v,) = ctx.saved_tensors
        return g * (v.abs() <= 1).to(g.dtype)


def gumbel_relaxed(logit: torch.Tensor, u: torch.Tensor, tau: Union[float, torch.Tensor]) -> torch.Tensor:
    """Binary concrete sample ``sigmoid((logit + log(1-u) - log u) / tau)`` for ``u ~ U(0,1)``.

    ``log(1-u) - log(u)`` is logistic noise (a difference of two Gumbels); the relaxed sample is
    ``>= 0.5`` exactly when ``u <= sigmoid(logit)``, the same event as the hard Bernoulli sample.
    """
    u = u.clamp(GUMBEL_EPS, 1.0 - GUMBEL_EPS)
    return torch.sigmoid((logit + torch.log1p(-u) - torch.log(u)) / tau)



# -- per-candidate quantizer ----------------------------------------------------------------------
def quantize_b(x: torch.Tensor, scale: torch.Tensor, bits: int, signed: bool,
               rounding: str = "half_even") -> torch.Tensor:
    """``Q_b``: LSQ uniform quantizer; signed 1 bit is binary ``scale * sign(x)`` (``sign(0)=+1``).

    ``scale`` must broadcast against ``x`` (see :func:`reshape_for_axis`).
    """
    if signed and bits == 1:
        return _SignSTE.apply(x / scale) * scale
    qmin, qmax = float_range(bits, signed)
    return fake_quantize(x, scale, 0.0, qmin, qmax, rounding)


def _rows(x: torch.Tensor, axis: Optional[int], channels: Optional[int]) -> torch.Tensor:
    """``x`` as ``(C, -1)`` rows (one per scale)."""
    return x.reshape(1, -1) if channels is None else x.transpose(0, axis or 0).reshape(channels, -1)


def _qmax_for_init(bits: int, signed: bool) -> float:
    return max(float_range(bits, signed)[1], 1.0)


def lsq_init_step(x: torch.Tensor, bits: int, signed: bool, axis: Optional[int],
                  channels: Optional[int]) -> torch.Tensor:
    """LSQ's ``2<|x|>/sqrt(Q_P)`` per row; binary (signed 1 bit): ``<|x|>`` (its L2-optimal scale)."""
    mean_abs = _rows(x, axis, channels).abs().mean(dim=1)
    if signed and bits == 1:
        return mean_abs
    return 2 * mean_abs / math.sqrt(_qmax_for_init(bits, signed))


def mse_init_step(x: torch.Tensor, bits: int, signed: bool, axis: Optional[int], channels: Optional[int],
                  rounding: str = "half_even", grid: int = 64) -> torch.Tensor:
    """Per-row step minimizing ``||Q_b(x) - x||^2`` over ``s = r max|x| / Q_P``, ``r`` in (0, 1]."""
    rows = _rows(x, axis, channels)  # (C, n)
    if signed and bits == 1:
        return rows.abs().mean(dim=1)  # closed form for sign quantization
    base = rows.abs().amax(dim=1).clamp_min(1e-8) / _qmax_for_init(bits, signed)  # (C,)
    best_s, best_err = base.clone(), torch.full_like(base, float("inf"))
    for r in torch.linspace(1.0 / grid, 1.0, grid).tolist():
        s = base * r
        err = (quantize_b(rows, s[:, None], bits, signed, rounding) - rows).pow(2).sum(dim=1)
        better = err < best_err
        best_s, best_err = torch.where(better, s, best_s), torch.where(better, err, best_err)
    return best_s


# -- the quantizer --------------------------------------------------------------------------------
@register_method("sdq", SDQOptions)
class SDQQuantizer(FakeQuantizer):
    """SDQ: stochastic choice between adjacent bit-widths, learned probabilities (reimplementation)."""

    supports_per_channel = True
    budget_penalty = "hinge"
    searches_bits = True
    bit_state = ("beta", "beta_logit", "level")  # candidate probabilities and the decay level
    host_state = FakeQuantizer.host_state + ("level",)

    def __init__(self, spec: QuantizerSpec, options: Optional[SDQOptions] = None) -> None:
        super().__init__(spec, options)
        self.candidates: Tuple[int, ...] = self._candidates(spec, self.options)
        k = len(self.candidates)
        self.steps = nn.Parameter(torch.ones(k, spec.channels or 1))  # (K, C): s_{l,b} per candidate
        self.register_buffer("level", torch.tensor(k - 1, dtype=torch.int64))  # index of b_i (upper)
        self.beta: Optional[nn.Parameter] = None
        self.beta_logit: Optional[nn.Parameter] = None
        if self.searching:
            if self.options.beta_param == "clamp":
                self.beta = nn.Parameter(torch.tensor(float(self.options.beta_init)))
            else:
                self.beta_logit = nn.Parameter(torch.tensor(self._init_logit()))
            if self.options.estimator == "gumbel":
                self.register_buffer("tau", torch.tensor(float(self.options.gumbel_tau)))

    @staticmethod
    def _candidates(spec: QuantizerSpec, options: SDQOptions) -> Tuple[int, ...]:
        lo, hi = spec.bits
        if spec.role == "act":
            if lo != hi:
                log.info("sdq keeps activations at fixed bits: using %d of act_bits=(%d, %d)", hi, lo, hi)
            return (hi,)
        if spec.fixed:
            return (hi,)
        if options.candidates is None:
            return tuple(range(lo, hi + 1))
        outside = [b for b in options.candidates if not lo <= b <= hi]
        if outside:
            raise ValueError(
                f"sdq candidates {options.candidates} include {outside}, outside this layer's weight_bits "
                f"({lo}, {hi}); widen weight_bits (e.g. ({min(lo, *options.candidates)}, "
                f"{max(hi, *options.candidates)})) or drop those candidates"
            )
        return options.candidates

    def _init_logit(self) -> float:
        p = min(max(self.options.beta_init, 1e-12), 1.0)
        logit = math.log(p) - math.log1p(-p) if p < 1.0 else SIGMOID_LOGIT_MAX
        return max(-SIGMOID_LOGIT_MAX, min(SIGMOID_LOGIT_MAX, logit))

    # -- state -------------------------------------------------------------------------------
    @property
    def searching(self) -> bool:
        """Whether this quantizer has a DBP at all (weights with two or more candidates)."""
        return self.role == "weight" and len(self.candidates) > 1

    def _has_pair(self) -> bool:
        return self.searching and not self.host("bits_fixed") and self.host("level") > 0

    def beta_value(self) -> torch.Tensor:
        """``beta`` of the current pair in [0, 1] (differentiable; 1.0 when there is no pair)."""
        if self.beta is not None:
            return _ClampSTE.apply(self.beta, 0.0, 1.0)
        if self.beta_logit is not None:
            return torch.sigmoid(self.beta_logit)
        return torch.ones((), device=self.steps.device)

    def bit_parameters(self) -> List[nn.Parameter]:
        """The DBPs (for their own optimizer group: own learning rate, no weight decay)."""
        return [p for p in (self.beta, self.beta_logit) if p is not None]

    def _hard_index(self) -> int:
        level = self.host("level")
        if not self._has_pair():
            return level
        return level if float(self.beta_value().detach()) >= 0.5 else level - 1

    @torch.no_grad()
    def project_(self) -> None:
        """Clamp ``beta`` into [0, 1] (clamp parametrization; call after each optimizer step)."""
        if self.beta is not None:
            self.beta.clamp_(0.0, 1.0)

    @torch.no_grad()
    def _reset_beta(self) -> None:
        if self.beta is not None:
            self.beta.fill_(float(self.options.beta_init))
        if self.beta_logit is not None:
            self.beta_logit.fill_(self._init_logit())

    def decay_step(self) -> bool:
        """Move down one candidate if ``beta < decay_threshold``; the new pair restarts at ``beta_init``.

        Returns whether the layer decayed. Never goes below the lowest candidate, never after
        ``fix_bits()``.
        """
        if not self._has_pair():
            return False
        beta = float(self.beta_value().detach())
        if beta >= self.options.decay_threshold:
            return False
        old = self.host("level")
        self.set_host("level", old - 1)
        self._reset_beta()
        log.info("sdq: weight %s decays %d -> %d bits (beta=%.4f < %g)", tuple(self.spec.shape or ()),
                 self.candidates[old], self.candidates[old - 1], beta, self.options.decay_threshold)
        return True

    def set_progress(self, progress: float) -> None:
        """Project ``beta`` into [0, 1], apply at most one decay and anneal the Gumbel temperature.

        Call after each optimizer step (or as often as decays should be checked).
        """
        if self.host("bits_fixed"):
            return
        self.project_()
        self.decay_step()
        if self.searching and self.options.estimator == "gumbel" and self.options.gumbel_tau_final is not None:
            t0, t1 = self.options.gumbel_tau, self.options.gumbel_tau_final
            p = min(max(float(progress), 0.0), 1.0)
            self.tau.fill_(t0 * (t1 / t0) ** p)

    def force_bits(self, b: int) -> None:
        """Repair hook of ``mpq_plugin.search``: make ``hard_bit_width()`` the largest candidate ``<= b``.

        ``b`` must lie in ``spec.bits``; a ``b`` that is not a candidate snaps down (never up, so a
        repaired plan never costs more than asked), or to the lowest candidate below it. The layer
        lands at that candidate with its pair's ``beta`` at 1 (deterministic).
        """
        lo, hi = self.spec.bits
        if not lo <= int(b) <= hi:
            raise ValueError(f"force_bits({b}) is outside this quantizer's bit range {self.spec.bits}")
        below = [k for k, c in enumerate(self.candidates) if c <= int(b)]
        k = below[-1] if below else 0
        if self.candidates[k] != int(b):
            log.warning("sdq: force_bits(%d) is not a candidate %s; using %d bits", b, self.candidates,
                        self.candidates[k])
        self.set_host("level", k)
        with torch.no_grad():
            if self.beta is not None:
                self.beta.fill_(1.0)
            if self.beta_logit is not None:
                self.beta_logit.fill_(SIGMOID_LOGIT_MAX)

    def fix_bits(self) -> None:
        """Keep the hard choice (``b_i`` if ``beta >= 0.5`` else ``b_{i-1}``) from now on."""
        self.set_host("level", self._hard_index())
        super().fix_bits()

    # -- quantization ----------------------------------------------------------------------------
    def initialize(self, x: torch.Tensor) -> None:
        signed = self.signed
        axis = self.spec.axis if self.per_channel else None
        init = mse_init_step if self.options.init == "mse" else lsq_init_step
        kw = {"rounding": self.options.rounding} if self.options.init == "mse" else {}
        s = torch.stack([init(x.float(), b, signed, axis, self.spec.channels, **kw) for b in self.candidates])
        self.steps.copy_(s.clamp_min(1e-8))

    def _grad_factor(self, x: torch.Tensor, bits: int) -> float:
        if not self.options.scale_grad:
            return 1.0
        n = x.numel() // (self.spec.channels or 1) if self.role == "weight" else x[0].numel()
        return 1.0 / math.sqrt(max(n * _qmax_for_init(bits, self.signed), 1.0))

    def _scale(self, k: int, like: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Step of candidate ``k`` (``(C,)``; LSQ-gradient-scaled and broadcast when ``like`` is given)."""
        s = self.steps[k]
        if like is not None:
            s = grad_scale(s, self._grad_factor(like, self.candidates[k]))
        s = s.abs().clamp_min(1e-8)
        return s if like is None else reshape_for_axis(s, like, self.spec.axis if self.per_channel else None)

    def quantize_candidate(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """``Q_{b_k}(x)`` with candidate ``k``'s learned step."""
        bits = self.candidates[k]
        if self.signed and bits == 1:
            return quantize_b(x, self._scale(k, x), bits, True, self.options.rounding)
        qmin, qmax = float_range(bits, self.signed)
        return kernel_fake_quantize(x, self._scale(k, x), 0.0, qmin, qmax, self.options.rounding)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if not self._has_pair():
            return self.quantize_candidate(x, self.host("level"))
        hi = self.host("level")
        beta = self.beta_value()
        if not self.training:
            return self._mix(x, hi, beta.detach() >= 0.5, beta)
        u = torch.rand(()).to(beta.device)  # global CPU generator: torch.manual_seed makes it repeatable
        z = u < beta.detach()  # Bernoulli(beta)
        if self.options.estimator == "ste":
            return self._mix(x, hi, z, beta)
        if self.beta_logit is not None:
            logit = self.beta_logit
        else:
            b = _ClampSTE.apply(beta, GUMBEL_EPS, 1.0 - GUMBEL_EPS)
            logit = torch.log(b) - torch.log1p(-b)
        z_soft = gumbel_relaxed(logit, u.to(logit.dtype), self.tau)  # a tensor: set_progress recompiles nothing
        if self.options.gumbel_hard:
            return self._mix(x, hi, z, z_soft)
        return self._mix(x, hi, None, z_soft)

    def _mix(self, x: torch.Tensor, hi: int, z: Optional[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
        """Pair ``(hi, hi - 1)``: sampled select (``z`` given) or soft mix with weight ``w``.

        LSQ pairs run on the fused kernel paths (:mod:`mpq_plugin.kernels`); a binary (1-bit)
        candidate keeps the eager composition of :func:`quantize_b`.
        """
        b_hi, b_lo = self.candidates[hi], self.candidates[hi - 1]
        if self.signed and b_lo == 1:
            q_hi, q_lo = self.quantize_candidate(x, hi), self.quantize_candidate(x, hi - 1)
            return stochastic_select(z, w, q_hi, q_lo) if z is not None else interpolate(w, q_hi, q_lo)
        bounds = float_range(b_hi, self.signed) + float_range(b_lo, self.signed)
        s_hi, s_lo = self._scale(hi, x), self._scale(hi - 1, x)
        if z is not None:
            return sdq_select(x, z, w, s_hi, s_lo, *bounds, self.options.rounding)
        return sdq_interpolate(x, w, s_hi, s_lo, *bounds, self.options.rounding)

    # -- bit-widths and export -------------------------------------------------------------------
    def bit_width(self) -> torch.Tensor:
        """Expected bits ``beta b_i + (1 - beta) b_{i-1}`` (differentiable in beta); fixed: ``b``."""
        if not self._has_pair():
            return torch.tensor(float(self.candidates[self.host("level")]), device=self.steps.device)
        hi = self.host("level")
        return interpolated_bits(self.beta_value(), float(self.candidates[hi - 1]), float(self.candidates[hi]))

    def hard_bit_width(self) -> torch.Tensor:
        """``b_i`` if ``beta >= 0.5`` else ``b_{i-1}`` (the bits ``fix_bits`` would keep)."""
        return torch.tensor(float(self.candidates[self._hard_index()]), device=self.steps.device)

    def freeze(self, x: Optional[torch.Tensor] = None) -> QuantState:
        """Codes of ``Q_b`` for the hard choice ``b``.

        Binary (signed 1 bit) layers store codes ``c = [w/s >= 0]`` in {0, 1} as an unsigned
        1-bit state with ``scale = 2s`` and a float ``zero_point = 0.5``:
        ``(c - 0.5) * 2s = ±s``, bit-exact with the forward pass.
        """
        k = self._hard_index()
        bits, signed = self.candidates[k], self.signed
        axis = self.spec.axis if self.per_channel else None
        binary = signed and bits == 1
        with torch.no_grad():
            s = self._scale(k)  # (C,)
            codes = None
            if x is not None:
                sb = reshape_for_axis(s, x, axis)
                if binary:
                    codes = (x / sb >= 0).to(torch.int64)
                else:
                    qmin, qmax = int_range(bits, signed)
                    codes = quantize_codes(x, sb, 0.0, float(qmin), float(qmax), self.options.rounding)
            scale = 2 * s if binary else s.clone()
            zp = (torch.full_like(scale, 0.5) if binary else torch.zeros_like(scale, dtype=torch.int64))
        if not self.per_channel:
            scale, zp = scale.reshape(()), zp.reshape(())
        extra = {"candidates": list(self.candidates)}
        if binary:
            extra["encoding"] = "binary: value = (code - 0.5) * scale = ±scale/2"
        return QuantState(bits=bits, signed=False if binary else signed, scale=scale, zero_point=zp,
                          codes=codes, axis=axis, method=self.method, extra=extra)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, candidates={self.candidates}, level={self.host('level')}"
