"""MPQSearch: the bit-width search as an object any training loop can drive.

    search = MPQSearch(model, total_steps=len(loader) * epochs)
    for x, y in loader:
        loss = task_loss(model(x), y) + search.penalty()
        loss.backward(); opt.step(); opt.zero_grad()
        search.step()                  # progress, quantizer schedules, budget controller, history
    plan = search.freeze()             # BitPlan meeting the budget (or BudgetError)

It needs nothing from the loop but these three calls, so it works the same in a plain loop, a
HF ``Trainer`` callback or an ``accelerate`` loop. Quantizers are seen only through
``bit_width()``, ``hard_bit_width()``, ``set_progress()``, ``fix_bits()`` and the optional
``force_bits(b)`` repair hook (see :mod:`mpq_plugin.search.budgets`).
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from mpq_plugin.config import BitPlan, Budget
from mpq_plugin.nn.costing import cost_tensors
from mpq_plugin.nn.fake_quantizer import FakeQuantizer
from mpq_plugin.nn.sharing import group_min_bits, shared_bit_groups
from mpq_plugin.nn.costing import quant_sites as quant_layers  # own layers + host-placed sites
from mpq_plugin.search.budgets import (
    BUDGET_RATIOS,
    DEFAULT_LAMBDA,
    FORMULATIONS,
    BudgetController,
    BudgetError,
    BudgetPenalty,
    LayerCosts,
    build_knobs,
    check_budget,
    check_feasible,
    hard_bits,
    plan_repair,
)
from mpq_plugin.search.schedules import progress_of, step_ramp

log = logging.getLogger(__name__)

__all__ = ["MPQSearch"]

_STATE_VERSION = 1


def _dist_active() -> bool:
    return bool(torch.distributed.is_available() and torch.distributed.is_initialized())


def _sync_floats(values: List[float]) -> List[float]:
    """Rank 0's values on every rank (no-op without torch.distributed), so controller and
    repair decisions are identical across processes."""
    if not values or not _dist_active():
        return values
    dist = torch.distributed
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.broadcast(t, src=0)
    return [float(v) for v in t.cpu().tolist()]


class MPQSearch:
    """Budgeted bit-width search driven by the user's training loop.

    Args:
        model: a model prepared by :func:`mpq_plugin.quantize_`.
        budget: the :class:`Budget` to meet (default: the one given to ``quantize_``).
            ``None`` there too: no penalty, ``freeze`` only fixes bits.
        total_steps: optimizer steps of the search; ``progress = step / total_steps``.
        formulation: ``hinge_sq`` | ``signed`` | ``hinge`` | ``none`` (default: the quantizers'
            ``budget_penalty``).
        lam: penalty weight in ratio units (default :data:`~mpq_plugin.search.budgets.DEFAULT_LAMBDA`).
        warmup_steps: steps with penalty weight 0 (quantizer schedules still advance).
        ramp_steps: steps over which the weight then rises linearly to 1.
        adaptive: run the :class:`~mpq_plugin.search.budgets.BudgetController`.
        budget_ratio: ``weighted`` | ``unweighted`` average bits (default: the quantizers'
            ``options.budget_ratio``, else ``weighted``).
        controller: a configured :class:`BudgetController` (default settings otherwise).
        history_every: record ``history`` every this many steps.

    Raises:
        ValueError: bad arguments, or a budget below the minimum achievable cost.
    """

    def __init__(self, model: nn.Module, budget: Optional[Budget] = None, *, total_steps: int,
                 formulation: Optional[str] = None, lam: Optional[float] = None, warmup_steps: int = 0,
                 ramp_steps: int = 0, adaptive: bool = True, budget_ratio: Optional[str] = None,
                 controller: Optional[BudgetController] = None, history_every: int = 1) -> None:
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
            raise ValueError(f"total_steps={total_steps!r} must be a positive int (optimizer steps of the search)")
        for name, v in (("warmup_steps", warmup_steps), ("ramp_steps", ramp_steps)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}={v!r} must be an int >= 0")
        if warmup_steps + ramp_steps > total_steps:
            raise ValueError(f"warmup_steps + ramp_steps = {warmup_steps + ramp_steps} exceeds "
                             f"total_steps={total_steps}; shorten them or search longer")
        if not isinstance(history_every, int) or history_every < 1:
            raise ValueError(f"history_every={history_every!r} must be an int >= 1")
        layers = list(quant_layers(model))
        if not layers:
            raise ValueError("the model has no quantized layer; call mpq_plugin.quantize_(model, config) first")
        if budget is None:
            budget = getattr(getattr(model, "_mpq_config", None), "budget", None)
        if budget is not None and not isinstance(budget, Budget):
            if isinstance(budget, Mapping):
                budget = Budget.from_dict(budget)
            else:
                raise TypeError(f"budget must be an mpq_plugin.Budget or a dict, got {type(budget).__name__}")
        self.model = model
        self.budget: Optional[Budget] = budget if budget is not None and any(True for _ in budget.items()) else None
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.ramp_steps = ramp_steps
        self.adaptive = bool(adaptive)
        self.history_every = history_every
        self._quantizers = self._find_quantizers()
        self.formulation = formulation if formulation is not None else self._default_formulation()
        if self.formulation not in FORMULATIONS:
            raise ValueError(f"unknown formulation {self.formulation!r}; use one of {sorted(FORMULATIONS)}")
        self.lam = float(DEFAULT_LAMBDA[self.formulation] if lam is None else lam)
        if self.lam < 0:
            raise ValueError(f"lam={lam} must be >= 0")
        self.budget_ratio = budget_ratio if budget_ratio is not None else self._default_ratio()
        if self.budget_ratio not in BUDGET_RATIOS:
            raise ValueError(f"budget_ratio={self.budget_ratio!r}; use one of {BUDGET_RATIOS}")
        self.controller = controller if controller is not None else BudgetController()
        self._penalty = (BudgetPenalty(self.budget, self.formulation, self.lam, budget_ratio=self.budget_ratio)
                         if self.budget is not None else None)
        if self.budget is not None:
            check_feasible(model, self.budget, budget_ratio=self.budget_ratio)
        self._step = 0
        self._frozen = False
        self._history: List[Dict[str, float]] = []
        self._last_penalty: Optional[torch.Tensor] = None
        self._set_progress()

    # -- discovery ---------------------------------------------------------------------------
    def _find_quantizers(self) -> List[FakeQuantizer]:
        seen: Dict[int, FakeQuantizer] = {}
        for _, layer in quant_layers(self.model):
            for q in (layer.weight_quantizer, layer.input_quantizer):
                if q is not None:
                    seen.setdefault(id(q), q)
        for m in self.model.modules():
            if isinstance(m, FakeQuantizer):
                seen.setdefault(id(m), m)
        return list(seen.values())

    def _default_formulation(self) -> str:
        kinds = sorted({str(getattr(type(q), "budget_penalty", "none")) for q in self._quantizers} - {"none"})
        if len(kinds) > 1:
            raise ValueError(f"the model mixes quantizers with budget formulations {kinds}; pass formulation=")
        return kinds[0] if kinds else "none"

    def _default_ratio(self) -> str:
        for q in self._quantizers:
            r = getattr(q.options, "budget_ratio", None)
            if r is not None:
                return str(r)
        return "weighted"

    def _device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    # -- progress ----------------------------------------------------------------------------
    @property
    def progress(self) -> float:
        """``step / total_steps`` in [0, 1]."""
        return progress_of(self._step, self.total_steps)

    @property
    def step_count(self) -> int:
        return self._step

    @property
    def frozen(self) -> bool:
        return self._frozen

    @property
    def history(self) -> List[Dict[str, float]]:
        """Per recorded step: ``step``, ``progress``, ``penalty``, ``penalty_weight``, ``lam`` (largest
        effective lambda), ``avg_weight_bits`` (hard, parameter-weighted), ``avg_weight_bits_unweighted``,
        ``cost/<k>``, ``soft/<k>``, ``lam/<k>`` per constraint, ``bits/<layer>`` (hard weight bits),
        ``soft_bits/<layer>`` and ``act_bits/<layer>`` (learnable input bits)."""
        return self._history

    def penalty_weight(self, step: Optional[int] = None) -> float:
        """Warm-up/ramp factor of the penalty at ``step`` (default: now)."""
        return step_ramp(self._step if step is None else step, self.warmup_steps, self.ramp_steps)

    def _set_progress(self) -> None:
        p = self.progress
        for q in self._quantizers:
            q.set_progress(p)

    def _effective_lams(self, weight: float) -> Dict[str, float]:
        if self.budget is None:
            return {}
        return {k: self.lam * weight * (self.controller.lam_scale.get(k, 1.0) if self.adaptive else 1.0)
                for k, _ in self.budget.items()}

    # -- the loop API ------------------------------------------------------------------------
    def penalty(self) -> torch.Tensor:
        """The budget penalty to add to the task loss (a 0 tensor without budget, during warm-up,
        for ``formulation='none'`` and after :meth:`freeze`)."""
        w = self.penalty_weight()
        if self._penalty is None or self._frozen or self.formulation == "none" or w <= 0.0:
            return torch.zeros((), device=self._device())
        ctrl = self.controller if self.adaptive else None
        terms = self._penalty.terms(self.model, weight=w,
                                    lam_scale=ctrl.lam_scale if ctrl else None,
                                    target_scale=ctrl.target_scale if ctrl else None)
        total = torch.stack(list(terms.values())).sum()
        self._last_penalty = total.detach()
        return total

    def step(self) -> None:
        """Call once after each ``optimizer.step()``: advances progress, calls ``set_progress``
        on every quantizer, updates the budget controller and records the history."""
        applied_weight = self.penalty_weight()
        self._step += 1
        self._set_progress()
        record = self._step % self.history_every == 0
        control = (self.adaptive and not self._frozen and self._penalty is not None
                   and self.formulation != "none" and applied_weight > 0.0)
        if not (record or control):
            self._last_penalty = None
            return
        m = self._measure(sync=control)
        if control and m is not None and self.budget is not None:
            deadline = int(round(self.controller.deadline * self.total_steps))
            self.controller.update(self.formulation, m["hard"], m["soft"], dict(self.budget.items()),
                                   steps_left=deadline - self._step)
        if record:
            self._record(m)
        self._last_penalty = None

    def _measure(self, sync: bool) -> Optional[Dict[str, Any]]:
        """Hard and soft costs and per-layer bits now (no gradient)."""
        with torch.no_grad():
            try:
                ct = cost_tensors(self.model)
            except RuntimeError:
                if self.budget is not None:
                    raise
                ct = None
            wb, ab = hard_bits(self.model)
            keys = [k for k, _ in self.budget.items()] if self.budget is not None else []
            if ct is None:
                return {"wb": wb, "ab": ab, "soft_w": None, "hard": {}, "soft": {}, "avg": None}
            costs = LayerCosts.from_cost_tensors(ct)
            soft_t = costs.soft_totals(ct.weight_bits, ct.act_bits, keys, self.budget_ratio)
            soft_w = ct.weight_bits.detach().float().cpu().tolist()
        soft = {k: float(v) for k, v in soft_t.items()}
        if sync:
            flat = _sync_floats(wb + ab + [soft[k] for k in keys])
            n = len(wb)
            wb, ab = flat[:n], flat[n:2 * n]
            soft = dict(zip(keys, flat[2 * n:]))
        hard_all = costs.totals(wb, ab, self.budget_ratio)
        weighted = costs.totals(wb, ab, "weighted")
        return {"wb": wb, "ab": ab, "soft_w": soft_w, "names": costs.names,
                "hard": {k: hard_all[k] for k in keys}, "soft": soft,
                "avg": weighted["avg_weight_bits"], "avg_unweighted": sum(wb) / len(wb)}

    def _record(self, m: Optional[Dict[str, Any]]) -> None:
        lams = self._effective_lams(self.penalty_weight(self._step - 1))
        rec: Dict[str, float] = {
            "step": float(self._step), "progress": self.progress,
            "penalty": float(self._last_penalty) if self._last_penalty is not None else 0.0,
            "penalty_weight": self.penalty_weight(self._step - 1),
            "lam": max(lams.values()) if lams else 0.0,
        }
        if m is not None:
            names = m.get("names") or [n for n, _ in quant_layers(self.model)]
            if m["avg"] is not None:
                rec["avg_weight_bits"] = float(m["avg"])
                rec["avg_weight_bits_unweighted"] = float(m["avg_unweighted"])
            for k, v in m["hard"].items():
                rec[f"cost/{k}"] = float(v)
                rec[f"soft/{k}"] = float(m["soft"][k])
                rec[f"lam/{k}"] = lams[k]
            layers = dict(quant_layers(self.model))
            for i, name in enumerate(names):
                rec[f"bits/{name}"] = float(m["wb"][i])
                if m["soft_w"] is not None:
                    rec[f"soft_bits/{name}"] = float(m["soft_w"][i])
                aq = layers[name].input_quantizer
                if aq is not None and not aq.spec.fixed:
                    rec[f"act_bits/{name}"] = float(m["ab"][i])
        self._history.append(rec)

    # -- end of search -----------------------------------------------------------------------
    def _polish_with_ilp(self, costs: LayerCosts, learned: List[float], new_w: List[int], new_a: List[int],
                         pairs: List[Tuple[Any, FakeQuantizer]], moves: Dict[str, int]) -> List[int]:
        """Integer granularity can leave the greedy repair more than ``tolerance`` under a tight
        budget (a few big layers: no single raise fits). Then find the plan *closest to the
        learned one* (the hard bits before any repair; fewest parameter-weighted bit changes) whose binding cost is within
        ``tolerance`` of its limit, or as close as any plan gets (two small ILPs, pulp/CBC).
        The learned allocation is kept wherever possible: the fill never re-allocates freely.
        Only for budgets linear in weight bits (avg_weight_bits, weight_kb, bops), weighted ratio.
        """
        assert self.budget is not None
        limits = dict(self.budget.items())
        tol = self.controller.tolerance
        if not set(limits) <= {"avg_weight_bits", "weight_kb", "bops"} or self.budget_ratio != "weighted":
            return new_w
        tot = costs.totals(new_w, new_a, self.budget_ratio)
        if any(tot[k] >= v * (1.0 - tol) for k, v in limits.items()):
            return new_w  # the greedy repair is already within tolerance on a binding constraint
        try:
            from mpq_plugin.search.budgets import closest_plan_within_budget
            plan = closest_plan_within_budget(costs, learned, new_a, {
                k.layer: (k.lo, k.hi) for k, _ in pairs if k.role == "weight" and k.settable
            }, limits, tolerance=tol)
        except ImportError:
            log.info("freeze: pulp not installed, skipping the exact fill (pip install mpq_plugin[search])")
            return new_w
        if plan is None or plan == [int(w) for w in new_w]:
            return new_w
        new_tot = costs.totals(plan, new_a, self.budget_ratio)
        moves["raised"] = sum(max(c - int(round(w)), 0) for c, w in zip(plan, learned))
        moves["lowered"] = sum(max(int(round(w)) - c, 0) for c, w in zip(plan, learned))
        log.info("freeze: exact fill moved the plan from %s to %s", tot, new_tot)
        return plan

    def freeze(self, strict: bool = True, *, repair: bool = True, fill: Optional[bool] = None,
               sensitivity: Optional[Mapping[str, float]] = None, rel_tol: float = 1e-6) -> BitPlan:
        """Fix every bit-width (:func:`mpq_plugin.freeze`) and return the plan.

        Before fixing, if the hard plan misses the budget, the deterministic repair of
        :func:`~mpq_plugin.search.budgets.plan_repair` lowers bits through the quantizers'
        ``force_bits(b)`` (and, with ``fill``, raises bits that still fit; ``None``: after a
        repair or when far under budget). Then the achieved plan is checked: ``plan.cost``
        carries ``slack_<k>`` (limit - achieved) per constraint, ``repair_lowered`` and
        ``repair_raised``, and ``avg_weight_bits_unweighted`` for the unweighted ratio.

        Raises:
            BudgetError: ``strict`` and a constraint is still over budget (the model stays
                frozen; the plan is ``err.plan``).
        """
        moves = {"lowered": 0, "raised": 0}
        unsettable: List[str] = []
        at_min = no_knobs = False
        decided: Optional[Tuple[List[int], List[int]]] = None
        if self.budget is not None and repair:
            with torch.no_grad():
                costs = LayerCosts.from_model(self.model)
                wb, ab = hard_bits(self.model)
            flat = _sync_floats(wb + ab)
            wb, ab = flat[:len(wb)], flat[len(wb):]
            pairs = build_knobs(self.model, sensitivity)
            knobs = [k for k, _ in pairs]
            new_w, new_a, moves = plan_repair(costs, wb, ab, knobs, self.budget, budget_ratio=self.budget_ratio,
                                              rel_tol=rel_tol, fill=fill, tolerance=self.controller.tolerance)
            if fill is not False:
                new_w = self._polish_with_ilp(costs, wb, new_w, new_a, pairs, moves)
            new_w = self._one_width_per_group(new_w, moves)
            for knob, q in pairs:
                old = int(round(wb[knob.layer] if knob.role == "weight" else ab[knob.layer]))
                new = new_w[knob.layer] if knob.role == "weight" else new_a[knob.layer]
                if new != old:
                    q.force_bits(int(new))  # type: ignore[operator]
            unsettable = sorted({type(q).__name__ for k, q in pairs if not k.settable})
            at_min = bool(knobs) and all(not k.settable or (new_w if k.role == "weight" else new_a)[k.layer] <= k.lo
                                         for k in knobs)
            no_knobs = not knobs
            decided = (new_w, new_a)
            if moves["lowered"] or moves["raised"]:
                log.info("freeze: repair lowered %d and raised %d bit-widths to meet the budget",
                         moves["lowered"], moves["raised"])
        elif repair and shared_bit_groups([layer.weight_quantizer for _, layer in quant_layers(self.model)]):
            # no budget: still one width per sharing group (its smallest learned one)
            with torch.no_grad():
                wb, _ = hard_bits(self.model)
            wb = _sync_floats(wb)
            new_w = self._one_width_per_group(wb, moves)
            for (_, layer), old, new in zip(quant_layers(self.model), wb, new_w):
                if int(round(old)) != new and callable(getattr(layer.weight_quantizer, "force_bits", None)):
                    layer.weight_quantizer.force_bits(new)
        from mpq_plugin.api import freeze as fix_all

        plan = fix_all(self.model)
        self._frozen = True
        if decided is not None:
            self._warn_ignored(plan, decided)
        plan.cost["repair_lowered"] = float(moves["lowered"])
        plan.cost["repair_raised"] = float(moves["raised"])
        if self.budget_ratio == "unweighted":
            bits = [lb.weight_bits for lb in plan.layers.values()]
            plan.cost["avg_weight_bits_unweighted"] = float(sum(bits)) / max(len(bits), 1)
        if self.budget is None:
            return plan
        plan.budget = self.budget
        slack = check_budget(plan, self.budget, rel_tol, budget_ratio=self.budget_ratio)
        for k, s in slack.items():
            plan.cost[f"slack_{k}"] = s
        limits = dict(self.budget.items())
        bad = {k: (limits[k] - s, limits[k]) for k, s in slack.items() if limits[k] - s > limits[k] * (1 + rel_tol)}
        if bad:
            hint = self._hint(repair, unsettable, at_min, no_knobs)
            if strict:
                raise BudgetError(bad, hint, plan)
            log.warning("%s", BudgetError(bad, hint, plan))
        return plan

    def _one_width_per_group(self, bits: List[Any], moves: Dict[str, int]) -> List[int]:
        """Weight bits with each sharing group (:mod:`mpq_plugin.nn.sharing`) at its smallest
        member's width: one decision per group, and never more cost than ``bits``."""
        groups = shared_bit_groups([layer.weight_quantizer for _, layer in quant_layers(self.model)])
        out = group_min_bits(bits, groups)
        moves["lowered"] += sum(max(int(round(b)) - o, 0) for b, o in zip(bits, out))
        return out

    def _warn_ignored(self, plan: BitPlan, decided: Tuple[List[int], List[int]]) -> None:
        for i, (name, layer) in enumerate(quant_layers(self.model)):
            wq = layer.weight_quantizer
            if callable(getattr(wq, "force_bits", None)) and not wq.spec.fixed \
                    and plan[name].weight_bits != decided[0][i]:
                log.warning("freeze: %s ignored force_bits(%d) on %s (frozen at %d bits)",
                            type(wq).__name__, decided[0][i], name, plan[name].weight_bits)

    def _hint(self, repair: bool, unsettable: List[str], at_min: bool, no_knobs: bool) -> str:
        parts = []
        if no_knobs:
            parts.append("no quantizer has a searchable bit-width (fixed bits cannot be repaired)")
        elif not repair:
            parts.append("repair=False, so bits were frozen as learned")
        elif unsettable:
            parts.append(f"{', '.join(unsettable)} do(es) not implement force_bits(b), so freeze() could not "
                         "repair the plan")
        elif at_min:
            parts.append("every repairable bit-width is at its minimum")
        parts.append("search longer (total_steps), raise lam, or call freeze(strict=False) to keep this plan")
        return "; ".join(parts)

    # -- checkpointing and logging -------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume exactly (with the model's own state dict)."""
        return {
            "version": _STATE_VERSION, "step": self._step, "total_steps": self.total_steps,
            "formulation": self.formulation, "lam": self.lam, "warmup_steps": self.warmup_steps,
            "ramp_steps": self.ramp_steps, "adaptive": self.adaptive, "budget_ratio": self.budget_ratio,
            "budget": self.budget.to_dict() if self.budget is not None else None,
            "frozen": self._frozen, "controller": self.controller.state_dict(),
            "history": [dict(r) for r in self._history],
        }

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        """Restore step, controller, history and frozen flag; re-applies ``set_progress``."""
        if sd.get("version") != _STATE_VERSION:
            raise ValueError(f"MPQSearch state version {sd.get('version')!r} is not {_STATE_VERSION}")
        if sd["formulation"] != self.formulation:
            raise ValueError(f"checkpoint formulation {sd['formulation']!r} differs from this search's "
                             f"{self.formulation!r}; build MPQSearch with formulation={sd['formulation']!r}")
        mine = self.budget.to_dict() if self.budget is not None else None
        if sd.get("budget") != mine:
            log.warning("resuming a search with budget %s under budget %s", sd.get("budget"), mine)
        for k in ("total_steps", "warmup_steps", "ramp_steps", "lam"):
            if sd[k] != getattr(self, k):
                log.warning("resuming with %s=%s (checkpoint had %s)", k, getattr(self, k), sd[k])
        self._step = int(sd["step"])
        self._frozen = bool(sd["frozen"])
        self.controller.load_state_dict(sd["controller"])
        self._history = [dict(r) for r in sd["history"]]
        self._last_penalty = None
        self._set_progress()

    def summary(self) -> Dict[str, Any]:
        """Current state for logging: step, progress, penalty weight, hard/soft cost, target,
        slack and effective lambda per constraint, and the hard average weight bits."""
        m = self._measure(sync=False)
        w = self.penalty_weight()
        out: Dict[str, Any] = {"step": self._step, "progress": self.progress, "penalty_weight": w,
                               "formulation": self.formulation, "frozen": self._frozen}
        if m is not None and m["avg"] is not None:
            out["avg_weight_bits"] = m["avg"]
            out["avg_weight_bits_unweighted"] = m["avg_unweighted"]
        if self.budget is not None and m is not None:
            lams = self._effective_lams(w)
            for k, t in self.budget.items():
                out[f"cost/{k}"] = m["hard"][k]
                out[f"soft/{k}"] = m["soft"][k]
                out[f"target/{k}"] = t
                out[f"slack/{k}"] = t - m["hard"][k]
                out[f"lam/{k}"] = lams[k]
        return out

    def __repr__(self) -> str:
        b = self.budget.to_dict() if self.budget is not None else None
        return (f"MPQSearch(budget={b}, formulation={self.formulation!r}, lam={self.lam:g}, "
                f"step={self._step}/{self.total_steps}, frozen={self._frozen})")

