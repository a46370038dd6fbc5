"""Shared bit-width decisions (mpq_plugin.nn.sharing): one decision per group during the search
(sdq, csq, learned_range with a learned ``b``) and at freeze (every searching method), budget
accounting, state dict round trip, deepcopy, and the refusals."""
import copy

import pytest
import torch
from torch import nn

import mpq_plugin
from mpq_plugin.nn.layers import quant_layers
from mpq_plugin.nn.sharing import bit_leader, bit_state_names, share_bits, share_layer_bits, shared_bit_groups
from mpq_plugin.search import MPQSearch

torch.set_num_threads(1)

SEARCHING = [m for m in mpq_plugin.list_methods() if m != "lsq"]
GROUP = ("q", "k", "v")


class Attn(nn.Module):
    """q/k/v of different magnitudes (so unshared searches pick different bits) + an output layer."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(32, 32) for _ in range(4))
        with torch.no_grad():
            self.k.weight.mul_(8.0)
            self.v.weight.mul_(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(torch.tanh(self.q(x)) + torch.tanh(self.k(x)) + torch.tanh(self.v(x)))


def _model(method, share=True, seed=0, budget=4.0, **opts):
    torch.manual_seed(seed)
    m = Attn()
    x = torch.randn(64, 32)
    y = m(x).detach()
    cfg = mpq_plugin.MPQConfig(method=method, weight_bits=(2, 8), budget=mpq_plugin.Budget(avg_weight_bits=budget),
                               options=opts)
    mpq_plugin.quantize_(m, cfg, (x[:2],))
    if share:
        assert share_layer_bits(m, [GROUP]) == [GROUP]
    return m, x, y


def _search(m, x, y, steps=30, lr=0.05):
    search = MPQSearch(m, total_steps=steps)
    opt = torch.optim.Adam(m.parameters(), lr=lr)
    for _ in range(steps):
        loss = ((m(x) - y) ** 2).mean() + search.penalty()
        loss.backward()
        opt.step()
        opt.zero_grad()
        search.step()
    return search


def _wq(m, name):
    return getattr(m, name).weight_quantizer


@pytest.mark.parametrize("method", SEARCHING)
def test_bit_state_lives_once_in_the_leader(method):
    m, _, _ = _model(method)
    lead, fol = _wq(m, "q"), _wq(m, "k")
    names = bit_state_names(lead)
    assert "bits_fixed" in names and len(names) >= 2
    sd = m.state_dict()
    for n in names:
        assert f"q.weight_quantizer.{n}" in sd and f"k.weight_quantizer.{n}" not in sd
        assert getattr(fol, n) is getattr(lead, n)
    assert bit_leader(fol) is lead and bit_leader(lead) is lead and isinstance(fol, type(lead))
    assert shared_bit_groups([_wq(m, n) for n in ("q", "k", "v", "o")]) == [[0, 1, 2]]
    ids = [id(p) for p in m.parameters()]
    assert len(ids) == len(set(ids))  # each shared parameter appears once


@pytest.mark.parametrize("method", ["sdq", "csq"])
def test_one_decision_during_the_search(method):
    m, x, y = _model(method)
    lead = _wq(m, "q")
    bp = lead.bit_parameters()[0]
    m(x).pow(2).mean().backward()
    g_all = bp.grad.clone()
    bp.grad = None
    # the followers' forwards reach the leader's bit parameter: q's own gradient is only a part
    m.k.weight_quantizer(m.k.weight).sum().backward()
    assert bp.grad is not None and bp.grad.abs().sum() > 0
    assert not torch.equal(g_all, bp.grad)
    _search(m, x, y, steps=20)
    bits = [float(_wq(m, n).bit_width().detach()) for n in GROUP]
    assert bits[0] == bits[1] == bits[2]


@pytest.mark.parametrize("method", SEARCHING)
def test_freeze_gives_one_width_per_group_within_budget(method):
    m, x, y = _model(method)
    search = _search(m, x, y)
    plan = search.freeze(strict=False)
    assert plan["q"].weight_bits == plan["k"].weight_bits == plan["v"].weight_bits
    # budget accounting: four equal-size layers, so the plan's average is the plain mean, within budget
    assert plan.avg_weight_bits() == pytest.approx(sum(plan[k].weight_bits for k in plan) / 4)
    assert plan.avg_weight_bits() <= 4.0 + 1e-6 and plan.cost["slack_avg_weight_bits"] >= -1e-6
    for name in GROUP:
        assert bool(_wq(m, name).bits_fixed)
        assert int(_wq(m, name).hard_bit_width()) == plan[name].weight_bits


@pytest.mark.parametrize("method", SEARCHING)
def test_freeze_without_budget_still_shares(method):
    m, x, y = _model(method)
    search = MPQSearch(m, budget=None, total_steps=5)
    search.budget = None
    plan = search.freeze(strict=False)
    assert plan["q"].weight_bits == plan["k"].weight_bits == plan["v"].weight_bits


@pytest.mark.parametrize("method", SEARCHING)
def test_state_dict_round_trip_and_deepcopy(method):
    m, x, y = _model(method)
    _search(m, x, y, steps=10)
    MPQSearch(m, total_steps=1).freeze(strict=False)
    m.eval()
    again, _, _ = _model(method, seed=1)
    again.load_state_dict(m.state_dict())
    again.eval()
    with torch.no_grad():
        assert torch.equal(again(x), m(x))
    assert [int(_wq(again, n).hard_bit_width()) for n in GROUP] == [int(_wq(m, n).hard_bit_width()) for n in GROUP]
    twin = copy.deepcopy(m)
    assert bit_leader(_wq(twin, "k")) is _wq(twin, "q")
    with torch.no_grad():
        assert torch.equal(twin(x), m(x))


def test_unshared_state_dict_does_not_load_into_a_shared_model():
    plain, _, _ = _model("sdq", share=False)
    shared, _, _ = _model("sdq")
    with pytest.raises(RuntimeError, match="Unexpected key"):
        shared.load_state_dict(plain.state_dict())


@pytest.mark.parametrize("budget", [None, 4.0, 8.0])
def test_learned_range_u3_members_differ_until_freeze_takes_the_group_minimum(budget):
    """U3 infers bits from each layer's own step and range: members may differ in the search;
    freeze gives the group its smallest member's width (with or without a budget to repair)."""
    m, x, y = _model("learned_range", budget=budget or 4.0)
    with torch.no_grad():  # a finer step on k: more levels, more bits than q and v
        _wq(m, "k").d.mul_(0.25)
    before = [int(_wq(m, n).hard_bit_width()) for n in GROUP]
    assert len(set(before)) > 1
    search = MPQSearch(m, total_steps=1)
    if budget is None:
        search.budget = None
    plan = search.freeze(strict=False)
    bits = [plan[n].weight_bits for n in GROUP]
    if budget is None:
        assert bits == [min(before)] * 3
    else:  # the repair may fill up to the budget, but one width per group
        assert len(set(bits)) == 1 and plan.avg_weight_bits() <= budget + 1e-6


def test_learned_range_with_learned_b_shares_during_the_search():
    m, x, y = _model("learned_range", parametrization="U1")
    assert "b" in bit_state_names(_wq(m, "q"))
    _search(m, x, y, steps=10)
    bits = [float(_wq(m, n).hard_bit_width()) for n in GROUP]
    assert bits[0] == bits[1] == bits[2]


def test_refusals():
    torch.manual_seed(0)
    m = Attn()
    cfg = mpq_plugin.MPQConfig(method="sdq", weight_bits=(2, 8), layer_overrides={"k": {"weight_bits": (3, 6)}})
    mpq_plugin.quantize_(m, cfg, (torch.randn(2, 32),))
    with pytest.raises(ValueError, match="same method, role, bit range"):
        share_layer_bits(m, [GROUP])
    with pytest.raises(ValueError, match="not a quantized layer"):
        share_layer_bits(m, [("q", "nope")])
    with pytest.raises(ValueError, match="two or more"):
        share_bits([_wq(m, "q")])
    share_bits([_wq(m, "q"), _wq(m, "v")])
    with pytest.raises(ValueError, match="already shares"):
        share_bits([_wq(m, "o"), _wq(m, "v")])
    # fixed-bit layers have nothing to decide: skipped
    torch.manual_seed(0)
    fixed = Attn()
    mpq_plugin.quantize_(fixed, mpq_plugin.MPQConfig(method="lsq", weight_bits=4), (torch.randn(2, 32),))
    assert share_layer_bits(fixed, [GROUP]) == []
