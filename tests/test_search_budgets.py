"""Budget penalties, cost arithmetic, hard check, feasibility, controller and repair."""
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

import mpq_plugin
from mpq_plugin.config import BitPlan, Budget, LayerBits, MethodOptions
from mpq_plugin.core.affine import fake_quantize, int_range, quantize_codes
from mpq_plugin.core.state import QuantState
from mpq_plugin.nn.costing import cost_tensors, model_cost
from mpq_plugin.nn.fake_quantizer import FakeQuantizer
from mpq_plugin.registry import METHODS, register_method
from mpq_plugin.search.budgets import (
    BudgetController,
    BudgetError,
    BudgetPenalty,
    Knob,
    LayerCosts,
    _deltas,
    build_knobs,
    check_budget,
    check_feasible,
    hard_bits,
    hinge,
    hinge_sq,
    lam_from_absolute,
    minimum_achievable,
    plan_repair,
    signed,
)


# -- a test-only quantizer with a learnable bit-width ----------------------------------------------
from tests.learnable_bits import LearnableBits as _LearnableBits, Opts as _Opts  # noqa: E402


@pytest.fixture
def lb():
    register_method("_test_lb_budgets", _Opts)(_LearnableBits)
    yield "_test_lb_budgets"
    METHODS.pop("_test_lb_budgets", None)


def _conv_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 3 * 3, 10))


def _quantized(method, weight_bits=(2, 8), act_bits=(2, 8), budget=None, **opts):
    m = _conv_model()
    cfg = mpq_plugin.MPQConfig(method=method, weight_bits=weight_bits, act_bits=act_bits, budget=budget,
                               options=opts)
    return mpq_plugin.quantize_(m, cfg, (torch.randn(2, 3, 8, 8),))


def _set_bits(model, wbits, abits=None):
    qs = [l for _, l in mpq_plugin.nn.quant_layers(model)]
    for i, layer in enumerate(qs):
        layer.weight_quantizer.force_bits(wbits[i])
        if abits is not None and layer.input_quantizer is not None:
            layer.input_quantizer.force_bits(abits[i])


def _f(t):
    return float(t.detach())


# -- formulations -----------------------------------------------------------------------------------
def _grad(fn, c, hard, t, lam):
    x = torch.tensor(c, requires_grad=True, dtype=torch.float64)
    v = fn(x, hard, t, lam)
    v.backward()
    return float(v.detach()), float(x.grad)


def test_hinge_sq_zero_under_budget_and_quadratic_over():
    assert _grad(hinge_sq, 3.0, 3.0, 4.0, 10.0) == (0.0, 0.0)
    assert _grad(hinge_sq, 4.0, 4.0, 4.0, 10.0) == (0.0, 0.0)
    v, g = _grad(hinge_sq, 5.0, 5.0, 4.0, 10.0)
    assert v == pytest.approx(10.0 * 0.25**2) and g == pytest.approx(2 * 10.0 * 0.25 / 4.0)
    assert g > 0  # descent lowers the cost


def test_signed_changes_sign_with_hard_cost_and_has_constant_coefficient():
    v_over, g_over = _grad(signed, 3.5, 5.0, 4.0, 2.0)
    v_under, g_under = _grad(signed, 3.5, 3.0, 4.0, 2.0)
    assert g_over == pytest.approx(2.0 * (5.0 - 4.0) / 4.0 / 4.0) and g_over > 0   # pushes bits down
    assert g_under == pytest.approx(2.0 * (3.0 - 4.0) / 4.0 / 4.0) and g_under < 0  # regrows bits
    assert v_over == pytest.approx(2.0 * 0.25 * 3.5 / 4.0) and v_under < 0
    # the gradient does not depend on the soft cost (the coefficient is a constant)
    assert _grad(signed, 7.0, 5.0, 4.0, 2.0)[1] == pytest.approx(g_over)
    assert _grad(signed, 2.0, 4.0, 4.0, 2.0)[1] == 0.0  # on budget: no pressure


def test_hinge_linear_over_budget():
    assert _grad(hinge, 3.9, 5.0, 4.0, 1.0) == (0.0, 0.0)
    v, g = _grad(hinge, 6.0, 6.0, 4.0, 1.0)
    assert v == pytest.approx(0.5) and g == pytest.approx(0.25)


def test_lam_from_absolute_matches_paper_units():
    t, lam_abs = 70.0, 0.1  # learned range: 0.1 per KB^2
    lam = lam_from_absolute(lam_abs, t, "hinge_sq")
    assert lam == pytest.approx(490.0)
    c = torch.tensor(77.0)
    assert float(hinge_sq(c, 77.0, t, lam)) == pytest.approx(lam_abs * (77.0 - t) ** 2)
    assert float(hinge(c, 77.0, t, lam_from_absolute(0.5, t, "hinge"))) == pytest.approx(0.5 * 7.0)
    assert float(signed(c, 80.0, t, lam_from_absolute(0.01, t, "signed"))) == pytest.approx(0.01 * 10.0 * 77.0)
    with pytest.raises(ValueError, match="formulation"):
        lam_from_absolute(1.0, 1.0, "square")


# -- cost arithmetic ------------------------------------------------------------------------------
def test_layer_costs_match_core_cost(lb):
    m = _quantized(lb)
    _set_bits(m, [3, 5, 7], [4, 6, 8])
    ct = cost_tensors(m)
    costs = LayerCosts.from_cost_tensors(ct)
    with torch.no_grad():
        ref = {k: float(v) for k, v in ct.totals().items()}
    wb, ab = hard_bits(m)
    assert wb == [3.0, 5.0, 7.0] and ab == [4.0, 6.0, 8.0]
    got = costs.totals(wb, ab)
    soft = costs.soft_totals(ct.weight_bits, ct.act_bits, list(ref))
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=1e-6)
        assert float(soft[k].detach()) == pytest.approx(ref[k], rel=1e-6)
    rep = model_cost(m)
    assert got["weight_kb"] == pytest.approx(rep["weight_kb"], rel=1e-6)
    assert costs.totals(wb, ab, "unweighted")["avg_weight_bits"] == pytest.approx(5.0)


def test_soft_costs_are_differentiable(lb):
    m = _quantized(lb)
    pen = BudgetPenalty(Budget(avg_weight_bits=2.5, act_kb_max=0.01, bops=1.0), "hinge")
    soft, hard = pen.measure(m)
    total = sum(soft.values())
    total.backward()
    for _, layer in mpq_plugin.nn.quant_layers(m):
        assert layer.weight_quantizer.b.grad is not None and float(layer.weight_quantizer.b.grad) > 0
    assert set(hard) == {"avg_weight_bits", "act_kb_max", "bops"}


def test_unweighted_ratio_counts_layers_equally(lb):
    m = _quantized(lb, act_bits=None)
    _set_bits(m, [8, 2, 2])
    ct = cost_tensors(m)
    sizes = [g.weight_numel for g in ct.geometry]
    weighted = (8 * sizes[0] + 2 * sizes[1] + 2 * sizes[2]) / sum(sizes)
    w = BudgetPenalty(Budget(avg_weight_bits=4.0), "signed", budget_ratio="weighted").measure(m)
    u = BudgetPenalty(Budget(avg_weight_bits=4.0), "signed", budget_ratio="unweighted").measure(m)
    assert w[1]["avg_weight_bits"] == pytest.approx(weighted)
    assert u[1]["avg_weight_bits"] == pytest.approx(4.0)
    assert float(u[0]["avg_weight_bits"].detach()) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="budget_ratio"):
        BudgetPenalty(Budget(avg_weight_bits=4.0), "signed", budget_ratio="per_layer")


def test_penalty_composes_constraints_as_a_sum(lb):
    m = _quantized(lb)
    full = dict(avg_weight_bits=3.0, weight_kb=0.5, act_kb_sum=0.2, act_kb_max=0.05, bops=2e5)
    for form in ("hinge_sq", "hinge", "signed"):
        both = BudgetPenalty(Budget(**full), form, lam=2.0)
        terms = both.terms(m)
        assert set(terms) == set(full)
        singles = [_f(BudgetPenalty(Budget(**{k: v}), form, lam=2.0)(m)) for k, v in full.items()]
        assert _f(both(m)) == pytest.approx(sum(singles), rel=1e-6)
        assert all(_f(t) > 0 for t in terms.values())  # every layer starts at 8 bits: over budget
    sub = BudgetPenalty(Budget(weight_kb=100.0), "hinge_sq")
    assert _f(sub(m)) == 0.0  # under budget


def test_penalty_scales_and_weight(lb):
    m = _quantized(lb)
    pen = BudgetPenalty(Budget(avg_weight_bits=4.0), "hinge_sq", lam=1.0)
    base = _f(pen(m))
    assert base == pytest.approx(1.0)  # (8/4 - 1)^2
    assert _f(pen(m, weight=0.5, lam_scale={"avg_weight_bits": 3.0})) == pytest.approx(1.5)
    assert _f(pen(m, target_scale={"avg_weight_bits": 0.5})) == pytest.approx(9.0)  # aims at 2 bits
    with pytest.raises(ValueError, match="formulation"):
        BudgetPenalty(Budget(avg_weight_bits=4.0), "l2")
    with pytest.raises(TypeError):
        BudgetPenalty({"avg_weight_bits": 4.0}, "hinge")


# -- hard check ----------------------------------------------------------------------------------
def _plan(cost, layers=None):
    layers = layers or {"a": LayerBits(4, None, 10), "b": LayerBits(2, None, 30)}
    return BitPlan(layers, cost=cost)


def test_check_budget_slack_and_strict_error():
    plan = _plan({"avg_weight_bits": 2.5, "weight_kb": 11.0, "bops": 5.0})
    b = Budget(avg_weight_bits=3.0, weight_kb=10.0)
    slack = check_budget(plan, b)
    assert slack == {"avg_weight_bits": pytest.approx(0.5), "weight_kb": pytest.approx(-1.0)}
    with pytest.raises(BudgetError) as e:
        check_budget(plan, b, strict=True)
    msg = str(e.value)
    assert "weight_kb = 11 > limit 10" in msg and "avg_weight_bits" not in msg
    assert e.value.violations == {"weight_kb": (11.0, 10.0)}
    assert isinstance(e.value, ValueError)
    assert check_budget(plan, Budget(weight_kb=10.0), rel_tol=0.2, strict=True)["weight_kb"] == pytest.approx(-1.0)


def test_check_budget_unweighted_and_cost_dicts():
    plan = _plan({"avg_weight_bits": 2.5})
    assert check_budget(plan, Budget(avg_weight_bits=3.0), budget_ratio="unweighted")["avg_weight_bits"] == 0.0
    assert check_budget({"bops": 3.0}, Budget(bops=4.0)) == {"bops": 1.0}
    with pytest.raises(ValueError, match="act_kb_max"):
        check_budget({"bops": 3.0}, Budget(act_kb_max=4.0))
    no_cost = _plan({})
    assert check_budget(no_cost, Budget(avg_weight_bits=3.0))["avg_weight_bits"] == pytest.approx(0.5)


def test_minimum_achievable_and_feasibility(lb):
    m = _quantized(lb, weight_bits=(3, 8), act_bits=(4, 8))
    low = minimum_achievable(m)
    assert low["avg_weight_bits"] == pytest.approx(3.0)
    ct = cost_tensors(m, bits="min")
    assert low["bops"] == pytest.approx(float(ct.totals()["bops"]), rel=1e-6)
    assert set(minimum_achievable(m, Budget(bops=1.0))) == {"bops"}
    check_feasible(m, Budget(weight_kb=low["weight_kb"] * 1.01))
    with pytest.raises(ValueError, match="minimum achievable"):
        check_feasible(m, Budget(weight_kb=low["weight_kb"] * 0.9))
    with pytest.raises(ValueError, match="minimum achievable"):
        check_feasible(m, Budget(act_kb_max=low["act_kb_max"] * 0.5))


# -- controller -----------------------------------------------------------------------------------
def test_controller_grows_lambda_over_budget_and_relaxes_under():
    c = BudgetController(growth=2.0, shrink=0.5)
    t = {"bops": 10.0}
    c.update("hinge_sq", {"bops": 12.0}, {"bops": 12.0}, t, steps_left=1)
    c.update("hinge_sq", {"bops": 12.0}, {"bops": 12.0}, t, steps_left=1)
    assert c.lam_scale["bops"] == 4.0
    c.update("hinge_sq", {"bops": 8.0}, {"bops": 8.0}, t)
    assert c.lam_scale["bops"] == 2.0
    c.update("hinge_sq", {"bops": 9.95}, {"bops": 9.95}, t)  # inside the 1% band: hold
    assert c.lam_scale["bops"] == 2.0


def test_controller_holds_while_soft_cost_falls_fast_enough():
    c = BudgetController(growth=2.0)
    t = {"bops": 10.0}
    c.update("hinge", {"bops": 20.0}, {"bops": 20.0}, t, steps_left=10)  # first step: grow
    c.update("hinge", {"bops": 20.0}, {"bops": 18.0}, t, steps_left=9)   # fell by 2 >= 8/9: hold
    assert c.lam_scale["bops"] == 2.0
    c.update("hinge", {"bops": 20.0}, {"bops": 17.9}, t, steps_left=8)   # fell by 0.1 < 7.9/8: grow
    assert c.lam_scale["bops"] == 4.0


def test_controller_lowers_hinge_target_when_soft_and_hard_disagree():
    c = BudgetController(target_step=0.1)
    t = {"avg_weight_bits": 4.0}
    c.update("hinge", {"avg_weight_bits": 4.5}, {"avg_weight_bits": 3.9}, t)
    assert c.target_scale["avg_weight_bits"] == pytest.approx(0.9)
    c.update("hinge", {"avg_weight_bits": 3.0}, {"avg_weight_bits": 3.0}, t)  # far under: back up
    assert c.target_scale["avg_weight_bits"] == pytest.approx(0.99)
    s = BudgetController(target_step=0.1)
    s.update("signed", {"avg_weight_bits": 4.5}, {"avg_weight_bits": 3.9}, t)
    assert s.target_scale["avg_weight_bits"] == 1.0  # signed compares the hard cost itself


def test_controller_signed_holds_under_and_relaxes_in_band():
    c = BudgetController(growth=2.0, shrink=0.5, min_scale=0.25)
    t = {"weight_kb": 1.0}
    c.update("signed", {"weight_kb": 2.0}, {"weight_kb": 2.0}, t)
    c.update("signed", {"weight_kb": 0.5}, {"weight_kb": 0.5}, t)
    assert c.lam_scale["weight_kb"] == 2.0
    c.update("signed", {"weight_kb": 0.995}, {"weight_kb": 0.995}, t)
    assert c.lam_scale["weight_kb"] == 1.0


def test_controller_state_dict_round_trip_and_validation():
    c = BudgetController()
    c.update("hinge", {"bops": 2.0}, {"bops": 0.5}, {"bops": 1.0})
    d = BudgetController()
    d.load_state_dict(c.state_dict())
    assert d.state_dict() == c.state_dict()
    with pytest.raises(ValueError):
        BudgetController(growth=0.5)
    with pytest.raises(ValueError):
        BudgetController(deadline=0.0)


# -- repair ---------------------------------------------------------------------------------------
def _toy_costs(sizes, macs=None, acts=None):
    n = np.array(sizes, dtype=float)
    return LayerCosts([f"l{i}" for i in range(len(sizes))], n, n + 1, np.array(macs or sizes, dtype=float),
                      np.array(acts or sizes, dtype=float), np.ones(len(sizes), dtype=bool))


def test_deltas_match_exact_cost_changes():
    rng = np.random.default_rng(0)
    costs = _toy_costs([100, 400, 50, 800], macs=[1000, 20, 300, 7], acts=[64, 640, 64, 32])
    knobs = [Knob(i, r, 2, 8) for i in range(4) for r in ("weight", "act")]
    keys = ["avg_weight_bits", "weight_kb", "act_kb_sum", "act_kb_max", "bops"]
    for _ in range(20):
        wb = rng.integers(3, 8, 4).astype(float)
        ab = rng.integers(3, 8, 4).astype(float)
        ab[1] = ab[0] = 6.0  # ties for the max activation exercise the top-2 logic
        for ratio in ("weighted", "unweighted"):
            for step in (-1, 1):
                d = _deltas(costs, wb, ab, knobs, step, keys, ratio)
                before = costs.totals(wb, ab, ratio)
                for j, k in enumerate(knobs):
                    w2, a2 = wb.copy(), ab.copy()
                    (w2 if k.role == "weight" else a2)[k.layer] += step
                    after = costs.totals(w2, a2, ratio)
                    for i, key in enumerate(keys):
                        assert d[i, j] == pytest.approx(after[key] - before[key], abs=1e-9)


def test_repair_lowers_big_high_bit_layers_first_and_meets_budget():
    costs = _toy_costs([1000, 100, 10])
    knobs = [Knob(i, "weight", 2, 8) for i in range(3)]
    wb, ab = [6, 6, 6], [32, 32, 32]
    t = (5 * 1000 + 6 * 100 + 6 * 10) / 1110  # exactly one bit off the big layer
    nw, na, moves = plan_repair(costs, wb, ab, knobs, Budget(avg_weight_bits=t), fill=False)
    assert nw == [5, 6, 6] and na == [32, 32, 32] and moves == {"lowered": 1, "raised": 0}
    again = plan_repair(costs, wb, ab, knobs, Budget(avg_weight_bits=t), fill=False)
    assert again == (nw, na, moves)  # deterministic


def test_repair_prefers_high_bit_layers_at_equal_size():
    costs = _toy_costs([100, 100])
    knobs = [Knob(0, "weight", 2, 8), Knob(1, "weight", 2, 8)]
    nw, _, _ = plan_repair(costs, [4, 7], [32, 32], knobs, Budget(avg_weight_bits=5.0), fill=False)
    assert nw == [4, 6]  # 4^-7 noise is cheaper than 4^-4
    sens = [Knob(0, "weight", 2, 8, True, 1.0), Knob(1, "weight", 2, 8, True, 1e6)]
    nw, _, _ = plan_repair(costs, [4, 7], [32, 32], sens, Budget(avg_weight_bits=5.0), fill=False)
    assert nw == [3, 7]  # a very sensitive layer is protected


def test_repair_respects_unsettable_and_min_bits():
    costs = _toy_costs([100, 100])
    knobs = [Knob(0, "weight", 2, 8, settable=False), Knob(1, "weight", 3, 8)]
    nw, _, moves = plan_repair(costs, [8, 8], [32, 32], knobs, Budget(avg_weight_bits=4.0))
    assert nw == [8, 3] and moves["lowered"] == 5  # still over: the caller reports it


def test_fill_gets_within_tolerance_from_far_below():
    sizes = [432] + [2304] * 6 + [4608] + [9216] * 5 + [18432] + [36864] * 5 + [640]
    costs = _toy_costs(sizes)
    rng = np.random.default_rng(1)
    knobs = [Knob(i, "weight", 2, 8) for i in range(len(sizes))]
    for _ in range(30):
        wb = rng.integers(2, 9, len(sizes))
        t = float(rng.uniform(2.5, 6.5))
        nw, na, _ = plan_repair(costs, wb, [32] * len(sizes), knobs, Budget(avg_weight_bits=t))
        got = costs.totals(nw, na)["avg_weight_bits"]
        assert 0.99 * t <= got <= t * (1 + 1e-9)


def test_fill_off_and_auto():
    costs = _toy_costs([100, 100])
    knobs = [Knob(0, "weight", 2, 8), Knob(1, "weight", 2, 8)]
    b = Budget(avg_weight_bits=6.0)
    assert plan_repair(costs, [3, 3], [32, 32], knobs, b, fill=False)[0] == [3, 3]
    assert plan_repair(costs, [3, 3], [32, 32], knobs, b)[0] == [6, 6]  # auto: far under
    assert plan_repair(costs, [6, 5], [32, 32], knobs, Budget(avg_weight_bits=5.52))[0] == [6, 5]  # in band


def test_exchange_moves_when_single_raises_do_not_fit():
    costs = _toy_costs([100, 64])
    knobs = [Knob(0, "weight", 2, 8), Knob(1, "weight", 2, 8)]
    t = (4 * 100 + 8 * 64 + 90) / 164  # 90 bit-params free; raising the big layer costs 100
    nw, _, moves = plan_repair(costs, [4, 8], [32, 32], knobs, Budget(avg_weight_bits=t))
    assert nw == [6, 6]  # two exchanges (+100 -64 each) use the budget; a third would not fit
    assert moves == {"lowered": 2, "raised": 2}
    assert costs.totals(nw, [32, 32])["avg_weight_bits"] <= t


def test_repair_activation_max_and_bops():
    costs = _toy_costs([100, 100], macs=[10, 10], acts=[1024, 256])
    knobs = [Knob(i, r, 2, 8) for i in range(2) for r in ("weight", "act")]
    b = Budget(act_kb_max=0.5)  # 1024 elements at 4 bits = 0.5 KB
    nw, na, _ = plan_repair(costs, [8, 8], [8, 8], knobs, b, fill=False)
    assert na == [4, 8] and nw == [8, 8]
    nw, na, _ = plan_repair(costs, [8, 8], [8, 8], knobs, Budget(bops=800.0), fill=False)
    assert costs.totals(nw, na)["bops"] <= 800.0


def test_repair_lowers_every_tied_activation_maximum():
    costs = _toy_costs([10, 10, 10], acts=[1024, 1024, 512])
    knobs = [Knob(i, "act", 2, 8) for i in range(3)]
    nw, na, _ = plan_repair(costs, [8, 8, 8], [8, 8, 8], knobs, Budget(act_kb_max=0.5), fill=False)
    assert na == [4, 4, 8]


def test_build_knobs_reads_quantizers(lb):
    m = _quantized(lb)
    pairs = build_knobs(m, {"0": 2.0, "2:act": 3.0})
    assert len(pairs) == 6  # 3 weights + 3 input activations
    k0 = [k for k, _ in pairs if k.layer == 0 and k.role == "weight"][0]
    assert k0.sensitivity == 2.0 and k0.settable and (k0.lo, k0.hi) == (2, 8)
    lsq = _quantized("lsq", weight_bits=4, act_bits=8)
    assert build_knobs(lsq) == []  # fixed bits are not repairable
    with pytest.raises(ValueError, match="sensitivity"):
        build_knobs(m, {"0": 0.0})
