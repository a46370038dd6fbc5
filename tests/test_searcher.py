"""MPQSearch: loop API, warm-up, budget controller, repair at freeze, BudgetError, resume."""
import copy
import logging
import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import mpq_plugin
from mpq_plugin.config import Budget, MethodOptions
from mpq_plugin.core.affine import fake_quantize, int_range, quantize_codes
from mpq_plugin.core.state import QuantState
from mpq_plugin.nn.fake_quantizer import FakeQuantizer, QuantizerSpec
from mpq_plugin.nn.layers import quant_layers
from mpq_plugin.registry import METHODS, get_method, list_methods, register_method
from mpq_plugin.search import BudgetError, MPQSearch
from mpq_plugin.search.searcher import _sync_floats


from tests.learnable_bits import LearnableBits as _LearnableBits, NoRepair as _NoRepair, Opts as _Opts  # noqa: E402


@pytest.fixture
def lb():
    register_method("_test_lb_search", _Opts)(_LearnableBits)
    yield "_test_lb_search"
    METHODS.pop("_test_lb_search", None)


@pytest.fixture
def norepair():
    register_method("_test_norepair_search", _Opts)(_NoRepair)
    yield "_test_norepair_search"
    METHODS.pop("_test_norepair_search", None)


def _mlp():
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                         nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))


def _setup(method, budget=None, act_bits=None, seed=0, weight_bits=(2, 8), **opts):
    torch.manual_seed(seed)
    m = _mlp()
    teacher = copy.deepcopy(m)
    x = torch.randn(128, 16)
    cfg = mpq_plugin.MPQConfig(method=method, weight_bits=weight_bits, act_bits=act_bits, budget=budget,
                               options=opts)
    mpq_plugin.quantize_(m, cfg, (x[:2],))
    return m, x, teacher(x).detach()


def _train(m, search, x, y, steps, lr=0.03, task=True):
    opt = torch.optim.Adam(m.parameters(), lr=lr)
    for _ in range(steps):
        loss = search.penalty()
        if task:
            loss = loss + ((m(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        search.step()


def _hard_avg(search):
    return search.summary()["avg_weight_bits"]


# -- construction ------------------------------------------------------------------------------------
def test_defaults_come_from_model_and_quantizers(lb):
    m, _, _ = _setup(lb, budget=Budget(avg_weight_bits=4.0))
    s = MPQSearch(m, total_steps=10)
    assert s.budget == Budget(avg_weight_bits=4.0)
    assert s.formulation == "hinge_sq" and s.lam == 10.0 and s.budget_ratio == "weighted"
    s2 = MPQSearch(m, Budget(weight_kb=5.0), total_steps=10, formulation="signed", lam=0.5)
    assert s2.budget == Budget(weight_kb=5.0) and s2.formulation == "signed" and s2.lam == 0.5
    m3, _, _ = _setup(lb, budget=Budget(avg_weight_bits=4.0), budget_ratio="unweighted")
    assert MPQSearch(m3, total_steps=10).budget_ratio == "unweighted"


@pytest.mark.parametrize("kwargs, match", [
    (dict(total_steps=0), "total_steps"),
    (dict(total_steps=10, warmup_steps=8, ramp_steps=3), "exceeds"),
    (dict(total_steps=10, formulation="l1"), "formulation"),
    (dict(total_steps=10, budget_ratio="mean"), "budget_ratio"),
    (dict(total_steps=10, lam=-1.0), "lam"),
    (dict(total_steps=10, history_every=0), "history_every"),
])
def test_invalid_arguments(lb, kwargs, match):
    m, _, _ = _setup(lb, budget=Budget(avg_weight_bits=4.0))
    with pytest.raises(ValueError, match=match):
        MPQSearch(m, **kwargs)


def test_infeasible_budget_is_refused(lb):
    m, _, _ = _setup(lb, weight_bits=(3, 8))
    with pytest.raises(ValueError, match="minimum achievable"):
        MPQSearch(m, Budget(weight_kb=0.5), total_steps=10)
    with pytest.raises(ValueError, match="quantized layer"):
        MPQSearch(_mlp(), total_steps=10)


# -- loop API ----------------------------------------------------------------------------------------
def test_no_budget_means_zero_penalty_and_plain_freeze(lb):
    m, x, y = _setup(lb)
    s = MPQSearch(m, total_steps=5)
    p = s.penalty()
    assert p.shape == () and float(p) == 0.0
    s.step()
    plan = s.freeze()
    assert len(plan) == 5 and plan.budget is None and not any(k.startswith("slack_") for k in plan.cost)
    assert all(lb_.weight_bits == 8 for lb_ in plan.values())


def test_warmup_and_ramp_scale_the_penalty(lb):
    m, _, _ = _setup(lb, budget=Budget(avg_weight_bits=4.0))
    s = MPQSearch(m, total_steps=20, warmup_steps=3, ramp_steps=2, adaptive=False, lam=1.0)
    full = 1.0 * (8.0 / 4.0 - 1.0) ** 2
    seen = []
    for _ in range(7):
        seen.append(float(s.penalty().detach()))
        s.step()
    assert seen == pytest.approx([0.0, 0.0, 0.0, 0.0, 0.5 * full, full, full])
    assert [h["penalty_weight"] for h in s.history] == [0.0, 0.0, 0.0, 0.0, 0.5, 1.0, 1.0]


def test_step_drives_progress_of_every_quantizer(lb):
    m, _, _ = _setup(lb)
    extra = _LearnableBits(QuantizerSpec("act", (2, 8)))
    m.add_module("side", extra)  # a quantizer outside any quantized layer (other integrations)
    s = MPQSearch(m, total_steps=4)
    assert extra.progress_seen == 0.0
    for k in range(1, 7):
        s.step()
        assert s.progress == min(k / 4, 1.0)
    qs = [l.weight_quantizer for _, l in quant_layers(m)] + [extra]
    assert all(q.progress_seen == 1.0 for q in qs)


def test_history_and_summary(lb):
    m, x, y = _setup(lb, budget=Budget(avg_weight_bits=6.0, weight_kb=6.0), act_bits=(4, 8))
    s = MPQSearch(m, total_steps=10, formulation="hinge")
    _train(m, s, x, y, 3)
    h = s.history
    assert [r["step"] for r in h] == [1.0, 2.0, 3.0]
    r = h[-1]
    for key in ("progress", "penalty", "lam", "avg_weight_bits", "avg_weight_bits_unweighted",
                "cost/avg_weight_bits", "cost/weight_kb", "lam/weight_kb", "soft/weight_kb",
                "bits/0", "soft_bits/8", "act_bits/2"):
        assert key in r, key
    assert r["penalty"] > 0 and r["lam"] >= 1.0
    summ = s.summary()
    assert summ["step"] == 3 and summ["target/weight_kb"] == 6.0
    assert summ["slack/weight_kb"] == pytest.approx(6.0 - summ["cost/weight_kb"])
    s2 = MPQSearch(m, total_steps=10, history_every=2)
    for _ in range(5):
        s2.step()
    assert [r["step"] for r in s2.history] == [2.0, 4.0]


# -- controller + freeze -------------------------------------------------------------------------------
@pytest.mark.parametrize("formulation", ["hinge_sq", "hinge", "signed"])
def test_controller_reaches_tight_budget_and_strict_freeze_passes(lb, formulation):
    target = 4.0
    m, x, y = _setup(lb, budget=Budget(avg_weight_bits=target))
    s = MPQSearch(m, total_steps=150, formulation=formulation)
    _train(m, s, x, y, 150)
    before = _hard_avg(s)
    assert 0.99 * target <= before <= target * 1.01, before  # the search itself lands on the budget
    plan = s.freeze(strict=True)
    assert 0.99 * target <= plan.cost["avg_weight_bits"] <= target
    assert plan.cost["slack_avg_weight_bits"] == pytest.approx(target - plan.cost["avg_weight_bits"])
    assert plan.budget == Budget(avg_weight_bits=target)


def test_without_the_controller_the_penalty_alone_falls_short(lb):
    m, x, y = _setup(lb, budget=Budget(avg_weight_bits=4.0))
    s = MPQSearch(m, total_steps=150, formulation="hinge_sq", adaptive=False)
    _train(m, s, x, y, 150)
    assert _hard_avg(s) > 4.0 * 1.01  # the test above passes because of the controller
    assert s.controller.lam_scale == {}


@pytest.mark.parametrize("formulation", ["hinge_sq", "signed"])
def test_non_integer_budget_is_met_within_one_percent(lb, formulation):
    target = 3.7
    m, x, y = _setup(lb, budget=Budget(avg_weight_bits=target), seed=1)
    s = MPQSearch(m, total_steps=120, formulation=formulation)
    _train(m, s, x, y, 120)
    plan = s.freeze(strict=True)
    assert 0.99 * target <= plan.cost["avg_weight_bits"] <= target
    hard = [int(l.weight_quantizer.hard_bit_width()) for _, l in quant_layers(m)]
    assert hard == [plan[n].weight_bits for n in plan]


def test_signed_penalty_regrows_bits_and_hinge_does_not(lb):
    results = {}
    for form in ("signed", "hinge_sq"):
        m, x, y = _setup(lb, budget=Budget(avg_weight_bits=5.0))
        for _, layer in quant_layers(m):
            layer.weight_quantizer.force_bits(2)
        s = MPQSearch(m, total_steps=120, formulation=form)
        _train(m, s, x, y, 120, lr=0.05, task=False)  # the budget term alone
        results[form] = _hard_avg(s)
    assert results["hinge_sq"] == 2.0
    assert 4.5 <= results["signed"] <= 5.05


def test_freeze_repairs_an_untrained_plan(lb):
    m, _, _ = _setup(lb, budget=Budget(avg_weight_bits=4.3))
    s = MPQSearch(m, total_steps=10)
    plan = s.freeze()
    assert 0.99 * 4.3 <= plan.cost["avg_weight_bits"] <= 4.3
    assert plan.cost["repair_lowered"] > 0
    assert s.frozen and float(s.penalty().detach()) == 0.0
    assert all(bool(l.weight_quantizer.bits_fixed) for _, l in quant_layers(m))


def test_freeze_without_repair_hook_raises_budget_error(norepair, caplog):
    m, _, _ = _setup(norepair, budget=Budget(avg_weight_bits=4.0))
    s = MPQSearch(m, total_steps=10)
    with pytest.raises(BudgetError) as err:
        s.freeze(strict=True)
    msg = str(err.value)
    assert "avg_weight_bits = 8 > limit 4" in msg and "NoRepair" in msg and "force_bits" in msg
    assert err.value.violations == {"avg_weight_bits": (8.0, 4.0)}
    assert err.value.plan is not None and err.value.plan.cost["slack_avg_weight_bits"] == -4.0
    m2, _, _ = _setup(norepair, budget=Budget(avg_weight_bits=4.0))
    with caplog.at_level(logging.WARNING):
        plan = MPQSearch(m2, total_steps=10).freeze(strict=False)
    assert plan.cost["slack_avg_weight_bits"] == -4.0 and "exceeds its budget" in caplog.text


def test_freeze_repair_false_keeps_learned_bits(lb):
    m, _, _ = _setup(lb, budget=Budget(avg_weight_bits=4.0))
    with pytest.raises(BudgetError, match="repair=False"):
        MPQSearch(m, total_steps=10).freeze(repair=False)


def test_activation_budget_is_repaired_through_act_quantizers(lb):
    m, _, _ = _setup(lb, act_bits=(2, 8))
    full = mpq_plugin.model_cost(m)["act_kb_max"]
    s = MPQSearch(m, Budget(act_kb_max=full / 2), total_steps=10)
    plan = s.freeze()
    assert 0.0 <= plan.cost["slack_act_kb_max"] <= 0.01 * full / 2
    assert all(lb_.weight_bits == 8 for lb_ in plan.values())  # weights untouched


def test_lsq_baseline_has_no_penalty_and_is_checked(tmp_path):
    m, x, y = _setup("lsq", weight_bits=4, act_bits=8)
    s = MPQSearch(m, Budget(avg_weight_bits=4.5), total_steps=3)
    assert s.formulation == "none" and float(s.penalty().detach()) == 0.0
    _train(m, s, x, y, 3)
    plan = s.freeze()
    assert plan.cost["slack_avg_weight_bits"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="minimum achievable"):
        MPQSearch(_setup("lsq", weight_bits=4, act_bits=8)[0], Budget(avg_weight_bits=3.0), total_steps=3)


def test_unweighted_budget_is_checked_unweighted(lb):
    m, _, _ = _setup(lb, budget=Budget(avg_weight_bits=5.0), budget_ratio="unweighted")
    s = MPQSearch(m, total_steps=10, formulation="signed")
    plan = s.freeze()
    bits = [l.weight_bits for l in plan.values()]
    assert plan.cost["avg_weight_bits_unweighted"] == sum(bits) / len(bits) == 5.0
    assert plan.cost["slack_avg_weight_bits"] == 0.0


# -- resume ---------------------------------------------------------------------------------------------
def test_state_dict_resume_is_exact(lb):
    m, x, y = _setup(lb, budget=Budget(avg_weight_bits=3.5, weight_kb=3.0))
    s = MPQSearch(m, total_steps=60, formulation="hinge", warmup_steps=2, ramp_steps=3)
    _train(m, s, x, y, 20)
    sd = copy.deepcopy(s.state_dict())
    model_sd = copy.deepcopy(m.state_dict())
    ref_penalty = float(s.penalty().detach())
    ref_lams = dict(s.controller.lam_scale)
    assert any(v > 1.0 for v in ref_lams.values())  # the controller did something worth restoring

    m2, _, _ = _setup(lb, budget=Budget(avg_weight_bits=3.5, weight_kb=3.0), seed=5)
    m2.load_state_dict(model_sd)
    s2 = MPQSearch(m2, total_steps=60, formulation="hinge", warmup_steps=2, ramp_steps=3)
    s2.load_state_dict(sd)
    assert float(s2.penalty().detach()) == ref_penalty
    assert s2.controller.lam_scale == ref_lams and s2.progress == s.progress and s2.step_count == 20
    assert s2.history == s.history
    assert all(l.weight_quantizer.progress_seen == 20 / 60 for _, l in quant_layers(m2))
    s.step()
    s2.step()
    assert s2.controller.state_dict() == s.controller.state_dict() and s2.history == s.history
    with pytest.raises(ValueError, match="formulation"):
        MPQSearch(m2, total_steps=60, formulation="signed").load_state_dict(sd)


# -- multi-process ----------------------------------------------------------------------------------------
def test_single_process_group_syncs_and_freezes(lb, tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        assert _sync_floats([1.5, 2.0]) == [1.5, 2.0]
        m, x, y = _setup(lb, budget=Budget(avg_weight_bits=4.3))
        s = MPQSearch(m, total_steps=5)
        _train(m, s, x, y, 5)
        assert s.freeze().cost["slack_avg_weight_bits"] >= 0
    finally:
        dist.destroy_process_group()


# -- the registered methods ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", [name for name in list_methods() if not name.startswith("_")])
def test_registered_methods_drive_the_search(method):
    cls = get_method(method).quantizer_cls
    searches = getattr(cls, "searches_bits", True)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(8, 16)
    mpq_plugin.quantize_(m, mpq_plugin.MPQConfig(method=method, weight_bits=(2, 8) if searches else 4, act_bits=8),
                         (x,))
    s = MPQSearch(m, Budget(avg_weight_bits=4.4 if searches else 4.0), total_steps=4)
    for _ in range(2):
        loss = m(x).pow(2).mean() + s.penalty()
        loss.backward()
        s.step()
    assert s.progress == 0.5 and len(s.history) == 2
    plan = s.freeze(strict=False)
    assert "slack_avg_weight_bits" in plan.cost
    hard = [int(l.weight_quantizer.hard_bit_width()) for _, l in quant_layers(m)]
    assert hard == [plan[n].weight_bits for n in plan]
    if callable(getattr(cls, "force_bits", None)):  # the repair hook meets any feasible budget
        assert plan.cost["slack_avg_weight_bits"] >= -1e-6
