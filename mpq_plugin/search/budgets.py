"""Budgets as differentiable penalties, a budget controller, a hard check and a repair step.

Constraints (any subset of :class:`~mpq_plugin.config.Budget`, summed): ``avg_weight_bits``,
``weight_kb`` (for MB pass ``MB * 1024``), ``act_kb_sum``, ``act_kb_max``, ``bops``.

**Units.** Every penalty works on the *ratio* ``cost / target`` (and the hard ratio), so one
``lam`` means the same pressure for every constraint kind and model size; an absolute lambda
from a paper converts with :func:`lam_from_absolute` (learned range: ``0.1 / KB^2`` on a 70 KB
target is ``lam = 0.1 * 70^2 = 490``). Defaults (:data:`DEFAULT_LAMBDA`) move a tiny model to its
budget within a few hundred Adam steps; the :class:`BudgetController` raises them while the
hard cost stays over budget.

Formulations (pure functions of ``(cost, hard, target, lam)``; ``cost`` differentiable):

* ``hinge_sq`` (learned range, Uhlich et al. Eq. 10): ``lam * relu(cost/t - 1)^2``;
* ``signed`` (CSQ §3.4): ``lam * ((hard - t)/t) * (cost/t)``, the coefficient carries no
  gradient and changes sign, so bits are pushed down above budget and *regrow* below it;
* ``hinge`` (SDQ reconstruction): ``lam * relu(cost/t - 1)`` on the expected cost;
* ``none`` (fixed-bit baselines): 0.

**Repair hook.** A quantizer *may* implement ``force_bits(b: int) -> None``: afterwards its
``hard_bit_width()`` is ``b`` (an integer within ``spec.bits``, sign bit included as in
``bit_width()``), a later ``fix_bits()`` fixes ``b``, and ``freeze(x).dequantize() ==
forward(x)`` still holds. The search calls it *before* ``fix_bits()`` when the learned plan
misses the budget (see :func:`plan_repair`); quantizers without it are left as learned and the
miss is reported.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from mpq_plugin.config import BitPlan, Budget
from mpq_plugin.nn.costing import FLOAT_BITS, CostTensors, cost_tensors
from mpq_plugin.nn.costing import quant_sites as quant_layers  # own layers + host-placed sites
from mpq_plugin.nn.fake_quantizer import FakeQuantizer

log = logging.getLogger(__name__)

__all__ = [
    "BUDGET_KEYS",
    "BUDGET_RATIOS",
    "DEFAULT_LAMBDA",
    "FORMULATIONS",
    "BudgetController",
    "BudgetError",
    "BudgetPenalty",
    "Knob",
    "build_knobs",
    "LayerCosts",
    "check_budget",
    "check_feasible",
    "hard_bit_tensors",
    "hard_bits",
    "hinge",
    "hinge_sq",
    "lam_from_absolute",
    "minimum_achievable",
    "no_penalty",
    "plan_repair",
    "signed",
]

BUDGET_KEYS = ("avg_weight_bits", "weight_kb", "act_kb_sum", "act_kb_max", "bops")
BUDGET_RATIOS = ("weighted", "unweighted")
_KB_BITS = 8.0 * 1024.0


# -- penalty formulations ---------------------------------------------------------------------
def hinge_sq(cost: torch.Tensor, hard: float, target: float, lam: float) -> torch.Tensor:
    """Learned range: ``lam * relu(cost/target - 1)^2`` (zero on or under budget)."""
    return lam * torch.relu(cost / target - 1.0) ** 2


def signed(cost: torch.Tensor, hard: Union[float, torch.Tensor], target: float, lam: float) -> torch.Tensor:
    """CSQ: ``lam * ((hard - target)/target) * (cost/target)``; the coefficient is a constant
    (from the hard cost, a float or a detached tensor), negative under budget, so gradient
    descent then *raises* bits."""
    return (lam * (hard - target) / target) * (cost / target)


def hinge(cost: torch.Tensor, hard: float, target: float, lam: float) -> torch.Tensor:
    """SDQ: ``lam * relu(cost/target - 1)`` on the expected cost."""
    return lam * torch.relu(cost / target - 1.0)


def no_penalty(cost: torch.Tensor, hard: float, target: float, lam: float) -> torch.Tensor:
    """Fixed-bit baselines: always 0 (keeps the graph so ``backward`` works)."""
    return cost * 0.0


PenaltyFn = Callable[[torch.Tensor, Any, float, float], torch.Tensor]
FORMULATIONS: Dict[str, PenaltyFn] = {"hinge_sq": hinge_sq, "signed": signed, "hinge": hinge, "none": no_penalty}

#: ratio-normalized defaults (see the module docstring)
DEFAULT_LAMBDA: Dict[str, float] = {"hinge_sq": 10.0, "signed": 1.0, "hinge": 1.0, "none": 0.0}


def lam_from_absolute(lam: float, target: float, formulation: str) -> float:
    """Convert a lambda written for absolute units (e.g. ``0.1`` per KB^2 in the learned-range
    paper) into this module's ratio units for a budget ``target`` in the same units."""
    _check_formulation(formulation)
    if formulation == "hinge":
        return lam * target
    return lam * target * target


def _check_formulation(name: str) -> None:
    if name not in FORMULATIONS:
        raise ValueError(f"unknown budget formulation {name!r}; use one of {sorted(FORMULATIONS)}")


def _check_ratio(ratio: str) -> None:
    if ratio not in BUDGET_RATIOS:
        raise ValueError(f"budget_ratio={ratio!r}; use 'weighted' (parameter-weighted) or 'unweighted' "
                         "(every layer counts equally, as CSQ's code)")


# -- errors -------------------------------------------------------------------------------------
class BudgetError(ValueError):
    """The frozen plan misses its budget. ``violations`` maps each violated constraint to
    ``(achieved, limit)``; ``plan`` is the (frozen) plan when raised by ``freeze``."""

    def __init__(self, violations: Mapping[str, Tuple[float, float]], hint: str = "",
                 plan: Optional[BitPlan] = None) -> None:
        self.violations = dict(violations)
        self.plan = plan
        parts = [f"{k} = {a:.6g} > limit {lim:.6g} (over by {100.0 * (a - lim) / lim:.2f}%, slack {lim - a:.6g})"
                 for k, (a, lim) in self.violations.items()]
        msg = "the plan exceeds its budget: " + "; ".join(parts)
        super().__init__(msg + (f". {hint}" if hint else ""))


# -- cost arithmetic on plain numbers -------------------------------------------------------------
@dataclass
class LayerCosts:
    """Per-layer geometry as float64 arrays; the same formulas as ``mpq_plugin.core.cost``
    evaluated on plain numbers (hard costs, repair) or on tensors of any device (penalties)."""

    names: List[str]
    weight_numel: np.ndarray
    weight_store: np.ndarray  # weight + bias elements (weight memory counts biases)
    macs: np.ndarray
    act_numel: np.ndarray
    act_mask: np.ndarray  # layers whose input activation counts (not embeddings)

    @classmethod
    def from_cost_tensors(cls, ct: CostTensors) -> "LayerCosts":
        g = ct.geometry
        mask = np.zeros(len(g), dtype=bool)
        mask[list(ct.act_layers)] = True
        return cls(list(ct.names),
                   np.array([x.weight_numel for x in g], dtype=np.float64),
                   np.array([x.weight_numel + x.bias_numel for x in g], dtype=np.float64),
                   np.array([x.macs for x in g], dtype=np.float64),
                   np.array([x.act_numel for x in g], dtype=np.float64), mask)

    @classmethod
    def from_model(cls, model: nn.Module) -> "LayerCosts":
        with torch.no_grad():
            return cls.from_cost_tensors(cost_tensors(model))

    def __len__(self) -> int:
        return len(self.names)

    def totals(self, wbits: Sequence[float], abits: Sequence[float], ratio: str = "weighted") -> Dict[str, float]:
        """Every cost for integer (or any) bits, as floats."""
        wb = np.asarray(wbits, dtype=np.float64)
        ab = np.asarray(abits, dtype=np.float64)
        act = self.act_numel[self.act_mask] * ab[self.act_mask] / _KB_BITS
        return {
            "avg_weight_bits": float(wb.mean()) if ratio == "unweighted"
            else float((self.weight_numel * wb).sum() / max(self.weight_numel.sum(), 1.0)),
            "weight_kb": float((self.weight_store * wb).sum() / _KB_BITS),
            "act_kb_sum": float(act.sum()) if act.size else 0.0,
            "act_kb_max": float(act.max()) if act.size else 0.0,
            "bops": float((self.macs * wb * ab).sum()),
        }

    def soft_totals(self, wbits: torch.Tensor, abits: torch.Tensor, keys: Sequence[str],
                    ratio: str = "weighted") -> Dict[str, torch.Tensor]:
        """Differentiable costs for ``keys``, computed on the bits' device."""
        dev, dt = wbits.device, wbits.dtype

        def t(a: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(a, dtype=dt, device=dev)

        out: Dict[str, torch.Tensor] = {}
        idx = torch.as_tensor(np.flatnonzero(self.act_mask), dtype=torch.long, device=dev)
        for k in keys:
            if k == "avg_weight_bits":
                out[k] = wbits.mean() if ratio == "unweighted" else \
                    (t(self.weight_numel / max(self.weight_numel.sum(), 1.0)) * wbits).sum()
            elif k == "weight_kb":
                out[k] = (t(self.weight_store / _KB_BITS) * wbits).sum()
            elif k in ("act_kb_sum", "act_kb_max"):
                kb = t(self.act_numel[self.act_mask] / _KB_BITS) * abits.index_select(0, idx)
                if kb.numel() == 0:
                    out[k] = wbits.sum() * 0.0
                else:
                    out[k] = kb.sum() if k == "act_kb_sum" else kb.max()
            elif k == "bops":
                out[k] = (t(self.macs) * wbits * abits).sum()
            else:
                raise ValueError(f"unknown budget key {k!r}; known: {BUDGET_KEYS}")
        return out


def hard_bit_tensors(model: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per quantized layer (``quant_layers`` order): the integer weight and input-activation bits
    the quantizers would freeze to (32 for float inputs), as two float tensors on the first
    quantizer's device (no host synchronization)."""
    w: List[torch.Tensor] = []
    a: List[Optional[torch.Tensor]] = []
    for _, layer in quant_layers(model):
        w.append(layer.weight_quantizer.hard_bit_width().detach().float().reshape(()))
        aq = layer.input_quantizer
        a.append(aq.hard_bit_width().detach().float().reshape(()) if aq is not None else None)
    if not w:
        raise ValueError("the model has no quantized layer; call mpq_plugin.quantize_(model, config) first")
    dev = w[0].device
    ab = [x.to(dev) if x is not None else torch.tensor(FLOAT_BITS, device=dev) for x in a]
    return torch.stack([x.to(dev) for x in w]), torch.stack(ab)


def hard_bits(model: nn.Module) -> Tuple[List[float], List[float]]:
    """:func:`hard_bit_tensors` as two lists of floats (one host synchronization)."""
    wb, ab = hard_bit_tensors(model)
    flat = torch.cat([wb, ab]).cpu().tolist()
    return flat[: wb.numel()], flat[wb.numel():]


# -- the differentiable penalty ---------------------------------------------------------------------
class BudgetPenalty:
    """Sum over the set constraints of one formulation, computed from ``cost_tensors(model)``.

    Args:
        budget: a :class:`Budget` (any subset of constraints).
        formulation: ``hinge_sq`` | ``signed`` | ``hinge`` | ``none``.
        lam: ratio-normalized weight (default :data:`DEFAULT_LAMBDA`).
        budget_ratio: ``weighted`` (parameter-weighted average bits, as ``Budget`` defines it)
            or ``unweighted`` (CSQ's code: every layer counts equally); only ``avg_weight_bits``
            is affected.

    Example:
        >>> pen = BudgetPenalty(Budget(avg_weight_bits=4.0), "hinge_sq")   # doctest: +SKIP
        >>> loss = task_loss + pen(model)                                   # doctest: +SKIP
    """

    def __init__(self, budget: Budget, formulation: str = "hinge_sq", lam: Optional[float] = None,
                 *, budget_ratio: str = "weighted") -> None:
        if not isinstance(budget, Budget):
            raise TypeError(f"budget must be an mpq_plugin.Budget, got {type(budget).__name__}")
        _check_formulation(formulation)
        _check_ratio(budget_ratio)
        self.budget = budget
        self.formulation = formulation
        self.lam = float(DEFAULT_LAMBDA[formulation] if lam is None else lam)
        if self.lam < 0:
            raise ValueError(f"lam={lam} must be >= 0")
        self.budget_ratio = budget_ratio
        self.targets: Dict[str, float] = dict(budget.items())

    def measure(self, model: nn.Module) -> Tuple[Dict[str, torch.Tensor], Dict[str, float]]:
        """``(soft, hard)``: differentiable costs from ``bit_width()`` and hard costs from
        ``hard_bit_width()`` for each set constraint."""
        ct = cost_tensors(model)
        costs = LayerCosts.from_cost_tensors(ct)
        soft = costs.soft_totals(ct.weight_bits, ct.act_bits, list(self.targets), self.budget_ratio)
        wb, ab = hard_bits(model)
        all_hard = costs.totals(wb, ab, self.budget_ratio)
        return soft, {k: all_hard[k] for k in self.targets}

    def terms(self, model: nn.Module, *, weight: float = 1.0,
              lam_scale: Optional[Mapping[str, float]] = None,
              target_scale: Optional[Mapping[str, float]] = None,
              hard: Optional[Mapping[str, float]] = None) -> Dict[str, torch.Tensor]:
        """One penalty term per constraint. ``lam_scale``/``target_scale`` come from the
        controller; ``hard`` overrides the hard costs (only ``signed`` uses them; they are
        otherwise computed on the model's device without a host synchronization)."""
        ct = cost_tensors(model)
        costs = LayerCosts.from_cost_tensors(ct)
        keys = list(self.targets)
        soft = costs.soft_totals(ct.weight_bits, ct.act_bits, keys, self.budget_ratio)
        hard_c: Mapping[str, Union[float, torch.Tensor]] = {}
        if self.formulation == "signed":
            if hard is None:
                wb, ab = hard_bit_tensors(model)
                hard_c = costs.soft_totals(wb.to(ct.weight_bits), ab.to(ct.weight_bits), keys, self.budget_ratio)
            else:
                hard_c = hard
        fn = FORMULATIONS[self.formulation]
        out: Dict[str, torch.Tensor] = {}
        for k, target in self.targets.items():
            lam = self.lam * weight * (lam_scale or {}).get(k, 1.0)
            eff = target * (target_scale or {}).get(k, 1.0)
            # the signed term's coefficient compares the hard cost with the real target
            out[k] = fn(soft[k], hard_c.get(k, 0.0), target if self.formulation == "signed" else eff, lam)  # type: ignore[arg-type]
        return out

    def __call__(self, model: nn.Module, **kw: Any) -> torch.Tensor:
        terms = self.terms(model, **kw)
        return torch.stack(list(terms.values())).sum()


# -- hard check --------------------------------------------------------------------------------------
def _achieved(plan_or_cost: Union[BitPlan, Mapping[str, float]], key: str, ratio: str) -> float:
    if isinstance(plan_or_cost, BitPlan):
        if key == "avg_weight_bits":
            if ratio == "unweighted":
                bits = [lb.weight_bits for lb in plan_or_cost.layers.values()]
                return float(sum(bits)) / max(len(bits), 1)
            if "avg_weight_bits" in plan_or_cost.cost:
                return float(plan_or_cost.cost["avg_weight_bits"])
            return plan_or_cost.avg_weight_bits()
        if key not in plan_or_cost.cost:
            raise ValueError(f"the plan carries no {key!r} cost; check a plan made by freeze(), or pass a cost dict")
        return float(plan_or_cost.cost[key])
    if ratio == "unweighted" and key == "avg_weight_bits" and "avg_weight_bits_unweighted" in plan_or_cost:
        return float(plan_or_cost["avg_weight_bits_unweighted"])
    if key not in plan_or_cost:
        raise ValueError(f"the cost has no {key!r} entry (has: {sorted(plan_or_cost)})")
    return float(plan_or_cost[key])


def check_budget(plan_or_cost: Union[BitPlan, Mapping[str, float]], budget: Budget, rel_tol: float = 1e-6,
                 *, budget_ratio: str = "weighted", strict: bool = False) -> Dict[str, float]:
    """Slack ``limit - achieved`` per set constraint (negative: over budget).

    A constraint is violated when ``achieved > limit * (1 + rel_tol)``; with ``strict=True``
    violations raise :class:`BudgetError` naming each one, its achieved value and its limit.
    ``plan_or_cost`` is a :class:`BitPlan` (its ``cost``) or a cost dict such as
    :func:`mpq_plugin.model_cost`'s.
    """
    _check_ratio(budget_ratio)
    slack: Dict[str, float] = {}
    bad: Dict[str, Tuple[float, float]] = {}
    for key, limit in budget.items():
        a = _achieved(plan_or_cost, key, budget_ratio)
        slack[key] = limit - a
        if a > limit * (1.0 + rel_tol):
            bad[key] = (a, limit)
    if bad and strict:
        raise BudgetError(bad, plan=plan_or_cost if isinstance(plan_or_cost, BitPlan) else None)
    return slack


def minimum_achievable(model: nn.Module, budget: Optional[Budget] = None, *,
                       budget_ratio: str = "weighted") -> Dict[str, float]:
    """The lowest cost of each constraint (every layer at its minimum bits; float inputs at
    32 bits). ``budget`` restricts the keys to its set constraints."""
    _check_ratio(budget_ratio)
    with torch.no_grad():
        ct = cost_tensors(model, bits="min")
        costs = LayerCosts.from_cost_tensors(ct)
        out = costs.totals(ct.weight_bits.tolist(), ct.act_bits.tolist(), budget_ratio)
    keys = [k for k, _ in budget.items()] if budget is not None else list(BUDGET_KEYS)
    return {k: out[k] for k in keys}


def check_feasible(model: nn.Module, budget: Budget, *, budget_ratio: str = "weighted") -> None:
    """Raise ``ValueError`` when the budget is below :func:`minimum_achievable` (reuses
    :func:`mpq_plugin.api.check_budget_feasible`; adds the unweighted average-bits case)."""
    from mpq_plugin.api import check_budget_feasible

    check_budget_feasible(model, budget, shapes_known=True)
    if budget_ratio == "unweighted" and budget.avg_weight_bits is not None:
        lowest = minimum_achievable(model, Budget(avg_weight_bits=budget.avg_weight_bits),
                                    budget_ratio="unweighted")["avg_weight_bits"]
        if lowest > budget.avg_weight_bits * (1 + 1e-6):
            raise ValueError(f"budget avg_weight_bits={budget.avg_weight_bits:g} (unweighted) is below the "
                             f"minimum achievable {lowest:.6g}; raise the budget or lower the minimum bits")


# -- budget controller ----------------------------------------------------------------------------------
@dataclass
class BudgetController:
    """Adapts each constraint's lambda (and, for hinge penalties, the target the penalty aims
    at) from the *hard* cost, so the frozen plan lands on the budget rather than near it.

    Per step and constraint, with ``r = hard / target`` and ``soft`` the differentiable cost:

    * over budget (``r > 1``): if the soft cost fell by less than the rate that closes the gap
      by the deadline (``deadline`` of the search), ``lam_scale *= growth``; for
      ``hinge``/``hinge_sq`` whose soft cost is already under the aimed target (soft and hard
      disagree, e.g. SDQ's expected vs realized bits) the aimed target is lowered:
      ``target_scale *= 1 - target_step``;
    * under the band (``r < 1 - tolerance``): hinge kinds relax (``lam_scale *= shrink``,
      ``target_scale`` back toward 1, so the task loss regrows bits); ``signed`` holds (its
      negative coefficient regrows bits by itself);
    * inside the band: ``signed`` relaxes (``lam_scale *= shrink``), hinge kinds hold.

    ``lam_scale`` stays in ``[min_scale, max_scale]``, ``target_scale`` in
    ``[min_target_scale, 1]``.
    """

    growth: float = 1.05
    shrink: float = 0.98
    min_scale: float = 1.0
    max_scale: float = 1e4
    tolerance: float = 0.01
    deadline: float = 0.8
    target_step: float = 0.005
    min_target_scale: float = 0.5
    lam_scale: Dict[str, float] = field(default_factory=dict)
    target_scale: Dict[str, float] = field(default_factory=dict)
    prev_soft: Dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (self.growth >= 1.0 and 0.0 < self.shrink <= 1.0):
            raise ValueError(f"growth={self.growth} must be >= 1 and shrink={self.shrink} in (0, 1]")
        if not 0.0 < self.min_scale <= self.max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got {self.min_scale}, {self.max_scale}")
        if not 0.0 <= self.tolerance < 1.0:
            raise ValueError(f"tolerance={self.tolerance} must be a fraction in [0, 1)")
        if not 0.0 < self.deadline <= 1.0:
            raise ValueError(f"deadline={self.deadline} must be a fraction of the search in (0, 1]")
        if not 0.0 < self.min_target_scale <= 1.0:
            raise ValueError(f"min_target_scale={self.min_target_scale} must be in (0, 1]")

    def update(self, formulation: str, hard: Mapping[str, float], soft: Mapping[str, float],
               targets: Mapping[str, float], steps_left: int = 1) -> None:
        """One controller step; ``steps_left``: optimizer steps until the deadline (>= 1)."""
        _check_formulation(formulation)
        if formulation == "none":
            return
        steps_left = max(int(steps_left), 1)
        for k, t in targets.items():
            ls = self.lam_scale.get(k, 1.0)
            ts = self.target_scale.get(k, 1.0)
            r = hard[k] / t
            prev = self.prev_soft.get(k)
            if r > 1.0 + 1e-9:
                needed = max(soft[k] - t * ts, 1e-12 * t) / steps_left
                if prev is None or prev - soft[k] < needed:
                    ls *= self.growth
                if formulation != "signed" and soft[k] <= t * ts:
                    ts *= 1.0 - self.target_step
            elif r < 1.0 - self.tolerance:
                if formulation != "signed":
                    ls *= self.shrink
                    ts = min(1.0, ts * (1.0 + self.target_step))
            elif formulation == "signed":
                ls *= self.shrink
            self.lam_scale[k] = min(self.max_scale, max(self.min_scale, ls))
            self.target_scale[k] = min(1.0, max(self.min_target_scale, ts))
            self.prev_soft[k] = float(soft[k])

    def state_dict(self) -> Dict[str, Any]:
        return {"lam_scale": dict(self.lam_scale), "target_scale": dict(self.target_scale),
                "prev_soft": dict(self.prev_soft)}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        self.lam_scale = {str(k): float(v) for k, v in sd.get("lam_scale", {}).items()}
        self.target_scale = {str(k): float(v) for k, v in sd.get("target_scale", {}).items()}
        self.prev_soft = {str(k): float(v) for k, v in sd.get("prev_soft", {}).items()}


# -- deterministic repair ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Knob:
    """One bit-width the repair may move: layer ``layer``'s weight or input-activation bits."""

    layer: int
    role: str  # "weight" | "act"
    lo: int
    hi: int
    settable: bool = True
    sensitivity: float = 1.0


def _deltas(costs: LayerCosts, wb: np.ndarray, ab: np.ndarray, knobs: Sequence[Knob], step: int,
            keys: Sequence[str], ratio: str) -> np.ndarray:
    """Change of each cost (rows: ``keys``) when each knob (columns) moves by ``step`` bits."""
    kl = np.array([k.layer for k in knobs], dtype=np.int64)
    isw = np.array([k.role == "weight" for k in knobs])
    isa = ~isw
    d = np.zeros((len(keys), len(knobs)))
    act_vals = np.where(costs.act_mask, costs.act_numel * ab / _KB_BITS, -np.inf)
    for i, key in enumerate(keys):
        if key == "avg_weight_bits":
            per = np.full(len(costs), 1.0 / len(costs)) if ratio == "unweighted" else \
                costs.weight_numel / max(costs.weight_numel.sum(), 1.0)
            d[i] = isw * step * per[kl]
        elif key == "weight_kb":
            d[i] = isw * step * costs.weight_store[kl] / _KB_BITS
        elif key == "act_kb_sum":
            d[i] = isa * costs.act_mask[kl] * step * costs.act_numel[kl] / _KB_BITS
        elif key == "act_kb_max":
            if not costs.act_mask.any():
                continue
            order = np.sort(act_vals)[::-1]
            top1, top2 = order[0], (order[1] if order.size > 1 else -np.inf)
            excl = np.where(act_vals[kl] >= top1, top2, top1)  # max over the other layers
            new = costs.act_numel[kl] * (ab[kl] + step) / _KB_BITS
            d[i] = np.where(isa & costs.act_mask[kl], np.maximum(excl, new) - top1, 0.0)
        elif key == "bops":
            d[i] = step * costs.macs[kl] * np.where(isw, ab[kl], wb[kl])
    return d


def _noise(knobs: Sequence[Knob], bits: np.ndarray) -> np.ndarray:
    # relative quantization-noise power of a b-bit uniform quantizer ~ 4^-b: going b -> b-1 adds
    # 3 * 4^-b (per layer, independent of its size), scaled by the layer's sensitivity
    return np.array([k.sensitivity for k in knobs]) * 3.0 * np.power(4.0, -bits)


def plan_repair(costs: LayerCosts, wbits: Sequence[float], abits: Sequence[float], knobs: Sequence[Knob],
                budget: Budget, *, budget_ratio: str = "weighted", rel_tol: float = 1e-6,
                fill: Optional[bool] = None, tolerance: float = 0.01) -> Tuple[List[int], List[int], Dict[str, int]]:
    """Deterministic greedy repair of integer bits to meet ``budget``.

    *Lower* (while a constraint is violated): among settable knobs above their minimum whose
    decrement reduces a violated cost, drop one bit of the one with the smallest
    sensitivity-to-size ratio ``noise / gain``, where ``noise = s * 3 * 4^-b`` is the added
    relative quantization noise and ``gain`` the summed relative reduction of the violated
    costs (so big layers at high bits go first). Ties: lowest layer index.

    *Fill* (``fill=True``, or ``None`` = when lowering changed something or every constraint is
    under by more than ``tolerance``): raise one bit of the knob with the largest
    ``noise removed / relative cost added`` whose increment keeps every constraint within its
    limit, until none fits. Knobs that touch no constraint are never raised.

    Returns ``(weight_bits, act_bits, {"lowered": n, "raised": m})``.
    """
    _check_ratio(budget_ratio)
    wb = np.rint(np.asarray(wbits, dtype=np.float64))
    ab = np.rint(np.asarray(abits, dtype=np.float64))
    limits = dict(budget.items())
    keys = list(limits)
    lim = np.array([limits[k] for k in keys])
    moves = {"lowered": 0, "raised": 0}
    if not knobs or not keys:
        return [int(b) for b in wb], [int(b) for b in ab], moves
    kl = np.array([k.layer for k in knobs], dtype=np.int64)
    isw = np.array([k.role == "weight" for k in knobs])
    lo = np.array([k.lo for k in knobs], dtype=np.float64)
    hi = np.array([k.hi for k in knobs], dtype=np.float64)
    ok = np.array([k.settable for k in knobs])

    def cur() -> np.ndarray:
        return np.where(isw, wb[kl], ab[kl])

    def apply(j: int, step: int) -> None:
        (wb if isw[j] else ab)[kl[j]] += step

    def totals() -> np.ndarray:
        t = costs.totals(wb, ab, budget_ratio)
        return np.array([t[k] for k in keys])

    while True:
        tot = totals()
        viol = tot > lim * (1.0 + rel_tol)
        if not viol.any():
            break
        b = cur()
        red = np.maximum(-_deltas(costs, wb, ab, knobs, -1, keys, budget_ratio), 0.0)
        if "act_kb_max" in keys:  # the max is a per-layer limit: tied maxima must all come down
            i = keys.index("act_kb_max")
            over = costs.act_mask[kl] & (costs.act_numel[kl] * ab[kl] / _KB_BITS > lim[i] * (1.0 + rel_tol))
            red[i] = np.where(~isw & over, costs.act_numel[kl] / _KB_BITS, 0.0)
        gain = (red[viol] / lim[viol, None]).sum(axis=0)
        valid = ok & (b > lo) & (gain > 0)
        if not valid.any():
            break
        score = np.where(valid, _noise(knobs, b) / np.where(valid, gain, 1.0), np.inf)
        apply(int(np.argmin(score)), -1)
        moves["lowered"] += 1

    tot = totals()
    if fill is None:
        fill = moves["lowered"] > 0 or bool((tot < lim * (1.0 - tolerance)).all())
    if fill and not (tot > lim * (1.0 + rel_tol)).any():
        for _ in range(4 * len(knobs) + 4):
            tot = _fill_greedy(costs, wb, ab, knobs, keys, lim, budget_ratio, ok, lo, hi, cur, apply, totals, moves)
            if (tot >= lim * (1.0 - tolerance)).any():  # close enough on the binding constraint
                break
            if not _exchange(costs, wb, ab, knobs, keys, lim, budget_ratio, ok, lo, hi, cur, apply, totals, moves):
                break
    return [int(x) for x in wb], [int(x) for x in ab], moves


def _fill_greedy(costs: LayerCosts, wb: np.ndarray, ab: np.ndarray, knobs: Sequence[Knob], keys: List[str],
                 lim: np.ndarray, ratio: str, ok: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                 cur: Callable[[], np.ndarray], apply: Callable[[int, int], None],
                 totals: Callable[[], np.ndarray], moves: Dict[str, int]) -> np.ndarray:
    """Raise the knob with the most noise removed per relative cost added while one fits."""
    tot = totals()
    while True:
        b = cur()
        d = _deltas(costs, wb, ab, knobs, +1, keys, ratio)
        cost = (np.maximum(d, 0.0) / lim[:, None]).sum(axis=0)
        fits = ((tot[:, None] + d) <= lim[:, None] * (1.0 + 1e-12)).all(axis=0)
        valid = ok & (b < hi) & fits & (cost > 0)
        if not valid.any():
            return tot
        score = np.where(valid, _noise(knobs, b + 1) / np.where(valid, cost, 1.0), -np.inf)
        apply(int(np.argmax(score)), +1)
        moves["raised"] += 1
        tot = totals()


def _exchange(costs: LayerCosts, wb: np.ndarray, ab: np.ndarray, knobs: Sequence[Knob], keys: List[str],
              lim: np.ndarray, ratio: str, ok: np.ndarray, lo: np.ndarray, hi: np.ndarray,
              cur: Callable[[], np.ndarray], apply: Callable[[int, int], None],
              totals: Callable[[], np.ndarray], moves: Dict[str, int]) -> bool:
    """One bit up on knob ``i`` and one down on knob ``j`` that fits and uses the most budget
    (only when single raises no longer fit and the plan is still far under budget)."""
    tot = totals()
    b = cur()
    up = _deltas(costs, wb, ab, knobs, +1, keys, ratio)
    dn = _deltas(costs, wb, ab, knobs, -1, keys, ratio)
    new = tot[:, None, None] + up[:, :, None] + dn[:, None, :]  # (keys, i, j), max cost approximate
    fits = (new <= lim[:, None, None] * (1.0 + 1e-12)).all(axis=0)
    gain = ((new - tot[:, None, None]) / lim[:, None, None]).sum(axis=0)
    valid = fits & (gain > 1e-12) & (ok & (b < hi))[:, None] & (ok & (b > lo))[None, :]
    np.fill_diagonal(valid, False)
    order = np.argsort(np.where(valid, -gain, np.inf), axis=None, kind="stable")
    for flat in order[: int(valid.sum())]:
        i, j = divmod(int(flat), len(knobs))
        apply(i, +1)
        apply(j, -1)
        if (totals() <= lim * (1.0 + 1e-12)).all():
            moves["raised"] += 1
            moves["lowered"] += 1
            return True
        apply(i, -1)
        apply(j, +1)
    return False


def build_knobs(model: nn.Module, sensitivity: Optional[Mapping[str, float]] = None) -> List[Tuple[Knob, FakeQuantizer]]:
    """The repairable bit-widths of a model: every learnable (``spec.bits`` a range) weight or
    input quantizer; ``settable`` when it implements ``force_bits``. ``sensitivity`` maps a layer
    name (both roles) or ``"<name>:act"`` to a factor (default 1)."""
    sens = dict(sensitivity or {})
    out: List[Tuple[Knob, FakeQuantizer]] = []
    for i, (name, layer) in enumerate(quant_layers(model)):
        for role, q in (("weight", layer.weight_quantizer), ("act", layer.input_quantizer)):
            if q is None or q.spec.fixed:
                continue
            s = sens.get(f"{name}:act" if role == "act" else name, sens.get(name, 1.0))
            if s <= 0:
                raise ValueError(f"sensitivity[{name!r}]={s} must be > 0")
            lo, hi = q.spec.bits
            out.append((Knob(i, role, int(lo), int(hi), callable(getattr(q, "force_bits", None)), float(s)), q))
    return out


def closest_plan_within_budget(costs: "LayerCosts", learned: Sequence[float], abits: Sequence[float],
                               ranges: Mapping[int, Tuple[int, int]], limits: Mapping[str, float],
                               tolerance: float = 0.01) -> Optional[List[int]]:
    """The integer weight plan closest to ``learned`` that uses the budget (two ILPs, pulp/CBC).

    1. For each constraint ``k`` (linear in weight bits: ``avg_weight_bits``, ``weight_kb``,
       ``bops``), the largest cost ``U_k`` reachable within every limit; the binding one is the
       ``k`` with the highest ``U_k / limit_k``.
    2. Minimize ``sum_l n_l |b_l - learned_l|`` (parameter-weighted bit changes) subject to
       every limit and ``cost_k >= min(U_k, (1 - tolerance) limit_k)``.
    Layers not in ``ranges`` keep their learned bits. Returns ``None`` when the solver fails.
    """
    import pulp  # type: ignore[import-untyped]

    n = len(costs)
    ab = np.asarray(abits, dtype=np.float64)
    coef = {
        "avg_weight_bits": costs.weight_numel / max(costs.weight_numel.sum(), 1.0),
        "weight_kb": costs.weight_store / _KB_BITS,
        "bops": costs.macs * ab,
    }
    cands = {i: (list(range(ranges[i][0], ranges[i][1] + 1)) if i in ranges else [int(round(learned[i]))])
             for i in range(n)}

    def model(name: str):  # fresh problem with one-hot variables and the limits
        prob = pulp.LpProblem(name, pulp.LpMaximize if name.startswith("max") else pulp.LpMinimize)
        new_var = getattr(prob, "add_variable", None)
        x = {(i, b): (new_var(f"x_{i}_{b}", cat=pulp.LpBinary) if new_var is not None
                      else pulp.LpVariable(f"x_{i}_{b}", cat=pulp.LpBinary))
             for i in range(n) for b in cands[i]}
        for i in range(n):
            prob += pulp.lpSum(x[i, b] for b in cands[i]) == 1
        cost = {k: pulp.lpSum(float(coef[k][i]) * b * x[i, b] for i in range(n) for b in cands[i]) for k in limits}
        for k, lim in limits.items():
            prob += cost[k] <= lim * (1.0 + 1e-9)
        return prob, x, cost

    def solve(prob) -> bool:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            solver = pulp.PULP_CBC_CMD(msg=False)
        prob.solve(solver)
        return pulp.LpStatus[prob.status] == "Optimal"

    best_k, best_u = None, -1.0
    reach: Dict[str, float] = {}
    for k, lim in limits.items():
        prob, _, cost = model(f"max_{k}")
        prob += cost[k]
        if not solve(prob):
            return None
        reach[k] = float(pulp.value(cost[k]))
        if reach[k] / lim > best_u:
            best_k, best_u = k, reach[k] / lim
    assert best_k is not None
    prob, x, cost = model("closest")
    # parameter-weighted bit changes; a tiny quantization-noise term breaks ties (prefer lowering
    # where a bit is worth least: high bit-widths)
    prob += pulp.lpSum(float(costs.weight_numel[i]) * (abs(b - float(learned[i])) + 1e-3 * 4.0 ** (-b)) * x[i, b]
                       for i in range(n) for b in cands[i])
    prob += cost[best_k] >= min(reach[best_k] * (1.0 - 1e-9), limits[best_k] * (1.0 - tolerance))
    if not solve(prob):
        return None
    return [next(b for b in cands[i] if pulp.value(x[i, b]) > 0.5) for i in range(n)]
