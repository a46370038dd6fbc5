"""CSQ (Xiao et al., DAC 2023): bit-level continuous sparsification of weights.

A weight is synthesized from bit logits ``p, n`` (shape ``weight.shape + (N,)``), one mask
logit per magnitude plane ``mu`` (``(N,)``, per layer) and a scale ``s``::

    W = s * sum_i m_i (sigmoid(T p_i) - sigmoid(T n_i)) 2^(N-1-i) / (2^N - 1)     (plane 0 = MSB)

with soft masks ``m_i = sigmoid(T mu_i)`` during the search and hard masks after ``fix_bits()``
(the "ticket"). After ``fix_bits()`` the forward also uses hard bits ``1[p > 0]`` with a
sigmoid-surrogate gradient, so ``freeze().dequantize()`` equals the forward bit for bit.

Bit-width convention: the library counts a sign bit, so ``bit_width() = kept planes + 1`` and
``N = max_bits - 1`` (the paper counts magnitude planes only). The ``floor = min_bits - 1`` most
significant planes are protected (mask fixed at 1), so no layer goes below ``min_bits``.
Activations use a PACT clip with fixed bits (CSQ does not search them). See
``docs/_methods_csq.md`` for every choice.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from mpq_plugin.config import MethodOptions
from mpq_plugin.core.bitplane import _ClipQuant, _HardBit, act_levels, plane_coefficients, soft_masks  # noqa: F401
from mpq_plugin.core.state import QuantState
from mpq_plugin.kernels import bitplane_weight, pact_quantize  # dispatched: triton / compiled / eager
from mpq_plugin.nn.fake_quantizer import FakeQuantizer, QuantizerSpec
from mpq_plugin.registry import register_method

log = logging.getLogger(__name__)

BIT_INITS = ("symmetric", "code")
TICKET_BITS = ("hard", "soft")
BUDGET_RATIOS = ("unweighted", "weighted")


@dataclass(frozen=True)
class CSQOptions(MethodOptions):
    """Options of CSQ.

    Attributes:
        final_temp: ``T = final_temp ** progress`` (code: 200, ``progress = epoch / ticket``).
        temp_steps: 0 = ``T`` follows every ``set_progress`` call (continuous); ``k > 0`` = ``T``
            changes only ``k`` times over the search (the code's once-per-epoch staircase with
            ``k`` = ticket epochs).
        mask_init: initial mask logit ``mu``. Default 3 (soft mask 0.95, every plane starts
            clearly kept, so the budget term alone decides what to prune). Code value: 0.
        bit_init: ``symmetric``: set bits get logit ``+bit_logit_init``, cleared bits
            ``-bit_logit_init``; ``code``: ``bit_logit_init`` / 0 as the official code (1 / 0).
        bit_logit_init: magnitude of the initial bit logits (default 0.05). Bits must start
            near their threshold so they can still flip: the gradient ``T sigmoid'(T p)``
            vanishes once ``T |p| >> 1`` and an Adam step moves ``p`` by about ``lr``. With
            ``|p| = 4`` no bit ever flipped in a 600-step search (lr 2e-3, ``T = 200^progress``)
            and pruned layers kept their truncated ``ini2bit`` codes (SmallCNN/MNIST at 3 bits:
            77% vs 92% with 0.05). The official code's logits also start at the threshold
            (cleared bits 0, set bits 1). The initial soft weight is small (``~0.025 x`` the float weight at
            ``T = 1``): BatchNorm absorbs it in training, but eval-mode accuracy right after
            ``quantize_`` (running statistics of the float model) is near chance.
        ticket_bits: after ``fix_bits()``: ``hard`` bits ``1[p>0]`` with a sigmoid-surrogate
            gradient (bit-exact freeze), or ``soft`` ``sigmoid(T p)`` as the final official code
            (then ``freeze()`` only approximates the forward).
        budget_ratio: read by ``mpq_plugin.search``: ``weighted`` by layer size (paper abstract,
            "model size"; the default, so ``Budget(avg_weight_bits=3)`` means the same model size
            for every method) or ``unweighted`` fraction of kept planes over layers (official code).
        act_clip_init: initial PACT clip ``alpha``; ``None`` = from the first batch (see
            ``act_clip_percentile``); the code uses 10.
        act_clip_percentile: percentile of ``|x|`` of the first batch for ``alpha`` (100 = max).
    """

    final_temp: float = 200.0
    temp_steps: int = 0
    mask_init: float = 3.0
    bit_init: str = "symmetric"
    bit_logit_init: float = 0.05
    ticket_bits: str = "hard"
    budget_ratio: str = "weighted"
    act_clip_init: Optional[float] = None
    act_clip_percentile: float = 100.0

    def __post_init__(self) -> None:
        if not self.final_temp >= 1.0:
            raise ValueError(f"final_temp={self.final_temp}; use a temperature >= 1 (code: 200)")
        if self.temp_steps < 0:
            raise ValueError(f"temp_steps={self.temp_steps}; use 0 (continuous) or a positive count")
        if self.bit_init not in BIT_INITS:
            raise ValueError(f"bit_init={self.bit_init!r}; use one of {BIT_INITS}")
        if not self.bit_logit_init > 0:
            raise ValueError(f"bit_logit_init={self.bit_logit_init}; use a positive logit, e.g. 1.0")
        if self.ticket_bits not in TICKET_BITS:
            raise ValueError(f"ticket_bits={self.ticket_bits!r}; use one of {TICKET_BITS}")
        if self.budget_ratio not in BUDGET_RATIOS:
            raise ValueError(f"budget_ratio={self.budget_ratio!r}; use one of {BUDGET_RATIOS}")
        if self.act_clip_init is not None and not self.act_clip_init > 0:
            raise ValueError(f"act_clip_init={self.act_clip_init}; use a positive clip or None (from data)")
        if not 0 < self.act_clip_percentile <= 100:
            raise ValueError(f"act_clip_percentile={self.act_clip_percentile}; use a value in (0, 100]")


# -- pure functions ---------------------------------------------------------------------------
# -- the quantizer ----------------------------------------------------------------------------
_logged_act_range = False


@register_method("csq", CSQOptions)
class CSQQuantizer(FakeQuantizer):
    """CSQ: bit-plane weights with learned per-layer plane masks (budget can prune and regrow)."""

    replaces_weight = True
    budget_penalty = "signed"
    bit_state = ("mu", "kept_mask")  # plane-mask logits and the planes kept so far
    host_state = FakeQuantizer.host_state + ("kept_mask", "act_bits_t")  # ticket planes, activation bits

    def __init__(self, spec: QuantizerSpec, options: Optional[CSQOptions] = None) -> None:
        super().__init__(spec, options)
        self.register_buffer("temperature", torch.tensor(1.0))
        if spec.role == "weight":
            self._init_weight_params(spec)
        else:
            self._init_act_params(spec)

    def _init_weight_params(self, spec: QuantizerSpec) -> None:
        if spec.bits[1] < 2:
            raise ValueError(
                f"csq needs at least one magnitude plane plus the sign bit, but max weight bits is "
                f"{spec.bits[1]}; set weight_bits to at least 2 (e.g. (2, 8))"
            )
        self.n_planes = spec.bits[1] - 1
        self.floor = spec.bits[0] - 1  # protected MSB planes
        self.set_host("signed_flag", 1)  # the p/n split always carries a sign
        shape = tuple(spec.shape) + (self.n_planes,) if spec.shape is not None else (0,)
        self.p = nn.Parameter(torch.zeros(shape))
        self.n = nn.Parameter(torch.zeros(shape))
        self.mu = nn.Parameter(torch.full((self.n_planes,), float(self.options.mask_init)))
        self.s = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("kept_mask", torch.ones(self.n_planes, dtype=torch.bool))

    def _init_act_params(self, spec: QuantizerSpec) -> None:
        global _logged_act_range
        self.register_buffer("act_bits_t", torch.tensor(spec.bits[1]))  # a buffer: force_bits survives state_dict
        if not spec.fixed and not _logged_act_range:
            log.info("csq does not search activation bits; using the maximum of the range %s", spec.bits)
            _logged_act_range = True
        self.alpha = nn.Parameter(torch.tensor(float(self.options.act_clip_init or 1.0)))

    @property
    def is_weight(self) -> bool:
        return self.spec.role == "weight"

    @property
    def act_bits(self) -> int:
        """Activation bit-width (activation quantizers only)."""
        return self.host("act_bits_t")

    # -- initialization ---------------------------------------------------------------------
    def initialize(self, x: torch.Tensor) -> None:
        self.to(device=x.device)  # parameters follow the tensor they quantize
        if self.is_weight:
            self._ini2bit(x)
        elif self.options.act_clip_init is None:
            self.alpha.fill_(self._clip_from_data(x))

    def _ini2bit(self, w: torch.Tensor) -> None:
        """Official ``ini2bit``: ``s = max|w|``, binary digits of ``round(|w| (2^N-1) / s)``."""
        if self.spec.shape is not None and tuple(w.shape) != tuple(self.spec.shape):
            raise ValueError(f"csq weight quantizer built for shape {tuple(self.spec.shape)} got {tuple(w.shape)}")
        shape = tuple(w.shape) + (self.n_planes,)
        if tuple(self.p.shape) != shape:  # built without spec.shape: size the parameters now
            self.p.data = torch.zeros(shape, device=w.device)
            self.n.data = torch.zeros(shape, device=w.device)
        w = w.float()
        s = float(w.abs().max())
        s = s if s > 0 else 1.0  # all-zero weight: every code is 0, any scale works
        levels = 2**self.n_planes - 1
        k_pos = torch.round(w.clamp_min(0) * levels / s).to(torch.int64)
        k_neg = torch.round((-w).clamp_min(0) * levels / s).to(torch.int64)
        shifts = torch.arange(self.n_planes - 1, -1, -1, device=w.device)  # MSB first
        on, off = self.options.bit_logit_init, (0.0 if self.options.bit_init == "code" else -self.options.bit_logit_init)
        for logits, k in ((self.p, k_pos), (self.n, k_neg)):
            digits = (k.unsqueeze(-1) >> shifts) & 1  # (*W, N)
            logits.copy_(torch.where(digits.bool(), on, off))
        self.s.fill_(s)

    def _clip_from_data(self, x: torch.Tensor) -> float:
        a = x.abs() if self.signed else x.clamp_min(0)
        a = a.flatten().float()
        pct = self.options.act_clip_percentile
        if pct >= 100:
            v = float(a.max())
        else:
            k = max(1, min(a.numel(), int(math.ceil(pct / 100 * a.numel()))))
            v = float(a.kthvalue(k).values)
        return v if v > 0 else 1.0

    # -- schedules and phases ---------------------------------------------------------------
    def set_progress(self, progress: float) -> None:
        """``T = final_temp ** progress`` (progress may exceed 1: the code keeps raising T)."""
        progress = max(float(progress), 0.0)
        k = self.options.temp_steps
        if k > 0:
            progress = math.floor(progress * k + 1e-9) / k
        self.temperature.fill_(self.options.final_temp**progress)

    def fix_bits(self) -> None:
        """The ticket: masks become hard (``mu >= 0`` kept) and are locked from now on."""
        if self.is_weight and not self.host("bits_fixed"):
            with torch.no_grad():
                self.set_host("kept_mask", self._kept_from_mu())
        super().fix_bits()

    def bit_parameters(self) -> List[nn.Parameter]:
        """The per-layer bit-selection logits ``mu`` (their own optimizer group: trainers give
        them a larger learning rate so the budget term can prune planes within a short search)."""
        return [self.mu] if self.role == "weight" else []

    def reset_round(self) -> None:
        """Multi-round continuous sparsification (ImageNet script): ``mu <- min(T mu, mu_0)``.

        Call at the end of a round, then restart the temperature with ``set_progress(0)``.
        """
        with torch.no_grad():
            self.mu.copy_(torch.clamp(self.temperature * self.mu, max=self.options.mask_init))

    def force_bits(self, b: int) -> None:
        """Repair hook of ``mpq_plugin.search``: make ``hard_bit_width() == b``.

        Weights keep the protected planes plus the ``b - 1 - floor`` unprotected planes with the
        largest ``mu`` (ties: more significant first) by moving ``mu`` just across 0; after
        ``fix_bits()`` the locked masks change too. Activations switch to ``b`` bits.
        """
        lo, hi = self.spec.bits
        if not lo <= int(b) <= hi:
            raise ValueError(f"force_bits({b}) is outside this quantizer's bit range {self.spec.bits}")
        if not self.is_weight:
            self.set_host("act_bits_t", int(b))
            return
        with torch.no_grad():
            free = self.mu[self.floor:]
            order = sorted(range(free.numel()), key=lambda j: (-float(free[j]), j))
            keep = torch.zeros(self.n_planes, dtype=torch.bool, device=self.mu.device)
            keep[: self.floor] = True
            for j in order[: int(b) - 1 - self.floor]:
                keep[self.floor + j] = True
            upd = torch.where(keep, self.mu.clamp_min(0.0), self.mu.clamp_max(-1e-3))
            upd[: self.floor] = self.mu[: self.floor]
            self.mu.copy_(upd)
            if self.host("bits_fixed"):
                self.set_host("kept_mask", keep)

    def budget_weight(self, num_params: int) -> float:
        """Weight of this layer's planes in the budget ratio ``R`` (``options.budget_ratio``)."""
        return 1.0 if self.options.budget_ratio == "unweighted" else float(num_params)

    # -- masks and bit-widths ---------------------------------------------------------------
    def _kept_from_mu(self) -> torch.Tensor:
        kept = self.mu.detach() >= 0  # soft mask >= 0.5, as the code's budget count
        kept[: self.floor] = True
        return kept

    def kept_planes(self) -> torch.Tensor:
        """Boolean ``(N,)``: planes the frozen model keeps (locked after ``fix_bits``)."""
        return self.kept_mask.clone() if self.host("bits_fixed") else self._kept_from_mu()

    def masks(self) -> torch.Tensor:
        """Current plane masks: soft during the search, hard 0/1 after ``fix_bits``."""
        if self.host("bits_fixed"):
            return self.kept_mask.to(self.mu.dtype)
        return soft_masks(self.mu, self.temperature, self.floor)

    def bit_width(self) -> torch.Tensor:
        if not self.is_weight:
            return torch.tensor(float(self.act_bits), device=self.alpha.device)
        return self.masks().sum() + 1.0  # + sign bit

    def hard_bit_width(self) -> torch.Tensor:
        if not self.is_weight:
            return torch.tensor(float(self.act_bits), device=self.alpha.device)
        return self.kept_planes().sum().to(self.mu.dtype) + 1.0

    # -- forward ----------------------------------------------------------------------------
    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_weight:
            return self._quantize_act(x)
        return self._weight()

    def _weight(self) -> torch.Tensor:
        if not self.host("bits_fixed"):
            return bitplane_weight(self.p, self.n, self.masks(), self.s, self.temperature)
        if self.options.ticket_bits == "soft":
            return bitplane_weight(self.p, self.n, self.masks(), self.s, self.temperature)
        codes, scale, _ = self._exact()
        return codes * scale

    def _plane_layout(self) -> Tuple[List[int], int]:
        """Kept plane indices and the exponent ``e_min`` of the lowest kept plane."""
        if self.host("bits_fixed"):  # host values: no graph break under torch.compile
            kept = [i for i, k in enumerate(self.host("kept_mask")) if k]
        else:
            kept = [int(i) for i in torch.nonzero(self._kept_from_mu()).flatten()]
        return kept, (self.n_planes - 1 - kept[-1]) if kept else 0

    def _exact(self) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
        """Integer codes (float, surrogate gradient) and the scale with the low plane factored out."""
        kept, e_min = self._plane_layout()
        pow2 = torch.zeros(self.n_planes, dtype=self.p.dtype, device=self.p.device)
        for i in kept:
            pow2[i] = 2.0 ** (self.n_planes - 1 - i - e_min)
        bits = _HardBit.apply(self.p, self.temperature) - _HardBit.apply(self.n, self.temperature)
        codes = torch.matmul(bits, pow2)  # (*W,) small integers, exact in float
        return codes, self._exact_scale(e_min), kept

    def _exact_scale(self, e_min: int) -> torch.Tensor:
        return self.s * (2.0**e_min / (2.0**self.n_planes - 1))

    def float_weight(self) -> torch.Tensor:
        if not self.host("initialized"):
            raise RuntimeError("csq weight quantizer is not initialized: run it on the float weight first")
        if not self.is_weight:
            raise RuntimeError("float_weight() is for weight quantizers; this one quantizes activations")
        return self._weight()

    def _quantize_act(self, x: torch.Tensor) -> torch.Tensor:
        qmin, qmax, div = act_levels(self.act_bits, self.signed)
        alpha = self.alpha.abs().clamp_min(1e-8)
        return pact_quantize(x, alpha, qmin, qmax, div)

    # -- freeze -----------------------------------------------------------------------------
    def freeze(self, x: Optional[torch.Tensor] = None) -> QuantState:
        """Thresholded integer model: ``codes * scale`` equals the forward once bits are fixed.

        Weights: ``k = sum_{i in K} (1[p_i>0] - 1[n_i>0]) 2^(N-1-i-e_min)`` with ``K`` the kept
        planes and ``e_min`` the exponent of the lowest one; ``scale = s 2^e_min / (2^N - 1)``;
        ``bits`` = span of kept planes + sign bit. ``x`` is ignored (the weight is synthesized).
        """
        if not self.is_weight:
            return self._freeze_act()
        if not self.host("initialized"):
            raise RuntimeError("csq weight quantizer is not initialized: run it on the float weight first")
        with torch.no_grad():
            codes, scale, kept = self._exact()
            codes = codes.to(torch.int64)
            if float(scale) < 0:  # fold a negative learned scale into the codes (exact)
                codes, scale = -codes, -scale
        span = kept[-1] - kept[0] + 1 if kept else 0
        state = QuantState(
            bits=span + 1, signed=True, scale=scale.detach().clone().reshape(()),
            zero_point=torch.zeros((), dtype=torch.int64, device=scale.device), codes=codes,
            method=self.method,
            extra={"n_planes": self.n_planes, "kept_planes": kept, "magnitude_planes": len(kept),
                   "span": span, "low_plane_exponent": self._plane_layout()[1],
                   "exact_forward": self.host("bits_fixed") and self.options.ticket_bits == "hard"},
        )
        state.check()
        return state

    def _freeze_act(self) -> QuantState:
        qmin, qmax, div = act_levels(self.act_bits, self.signed)
        with torch.no_grad():
            scale = self.alpha.abs().clamp_min(1e-8) / div
        return QuantState(bits=self.act_bits, signed=self.signed, scale=scale.detach().clone().reshape(()),
                          zero_point=torch.zeros((), dtype=torch.int64, device=scale.device),
                          method=self.method, extra={"clip": float(self.alpha.detach().abs())})

    # -- state dict: size lazily built parameters from the checkpoint ------------------------
    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        if self.is_weight:
            for name in ("p", "n"):
                param, key = self._parameters[name], prefix + name
                if key in state_dict and param is not None and param.numel() == 0:
                    param.data = torch.empty_like(state_dict[key], dtype=param.dtype, device=param.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        if self.is_weight:
            return f"{super().extra_repr()}, planes={self.n_planes}, protected={self.floor}"
        return f"{super().extra_repr()}, act_bits={self.act_bits}"
