"""Baselines in the harness: uniform LSQ, round-to-nearest PTQ, HAWQ-V3 (Hutchinson + ILP)."""
from __future__ import annotations

import copy
import itertools
import math
from typing import Dict, List, Sequence

import pytest
import torch
from torch import nn

import mpq_plugin
from mpq_plugin import Budget, MPQConfig
from mpq_plugin.core.cost import LayerGeometry
from mpq_plugin.nn.layers import QuantLayer, quant_layers
from mpq_plugin.search.baselines import (
    hawq_allocate,
    hawq_config,
    hutchinson_trace,
    plan_cost,
    rtn_ptq_,
    rtn_quantize,
    solve_bit_ilp,
    uniform_bits_for_budget,
    uniform_config,
)
from tests.conftest import TinyConvNet, tiny_mlp

X_IMG = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _mlp3() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 12), nn.ReLU(), nn.Linear(12, 4))


def _regression_batches(n_batches: int = 2, batch: int = 16, d_in: int = 16, d_out: int = 4,
                        seed: int = 0) -> List[tuple]:
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(d_in, d_out, generator=g)
    out = []
    for _ in range(n_batches):
        x = torch.randn(batch, d_in, generator=g)
        out.append((x, torch.tanh(x @ teacher)))
    return out


def _fitted_batches(model: nn.Module, n_batches: int = 2, batch: int = 16, d_in: int = 16) -> List[tuple]:
    """Targets = the model's own outputs plus small noise: near a minimum the Hessian is close
    to positive semi-definite, as for the trained models HAWQ is applied to."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n_batches):
        x = torch.randn(batch, d_in, generator=g)
        with torch.no_grad():
            y = model(x)
        out.append((x, y + 0.01 * torch.randn(y.shape, generator=g)))
    return out


# --------------------------------------------------------------------------- uniform LSQ
def test_uniform_config_quantizes_every_layer_at_the_same_bits() -> None:
    cfg = uniform_config(3, act_bits=4, per_channel=True)
    assert (cfg.method, cfg.weight_bits, cfg.act_bits, cfg.per_channel) == ("lsq", (3, 3), (4, 4), True)
    model = mpq_plugin.quantize_(tiny_mlp(), cfg)
    plan = mpq_plugin.freeze(model)
    assert {lb.weight_bits for lb in plan.values()} == {3} and {lb.act_bits for lb in plan.values()} == {4}
    with pytest.raises(TypeError, match="one integer"):
        uniform_config((2, 4))  # type: ignore[arg-type]


@pytest.mark.parametrize("avg, expected", [(3.0, 3), (2.5, 2), (2.0, 2), (7.99, 7), (8.0, 8), (16.0, 8)])
def test_uniform_bits_for_avg_weight_bits(avg: float, expected: int) -> None:
    assert uniform_bits_for_budget(_mlp3(), Budget(avg_weight_bits=avg)) == expected


def test_uniform_bits_below_min_names_the_minimum() -> None:
    with pytest.raises(ValueError, match=r"minimum achievable .*'avg_weight_bits': 2\.0"):
        uniform_bits_for_budget(_mlp3(), Budget(avg_weight_bits=1.5))


def test_uniform_bits_for_weight_kb_and_bops_match_model_cost() -> None:
    costs = {}
    for b in (3, 4):
        q = mpq_plugin.quantize_(TinyConvNet(), uniform_config(b, act_bits=8), example_inputs=(X_IMG,))
        costs[b] = mpq_plugin.model_cost(q)
    for key in ("weight_kb", "bops"):
        at4 = float(costs[4][key])  # type: ignore[arg-type]
        for limit, expected in ((at4, 4), (at4 * 0.999, 3)):
            got = uniform_bits_for_budget(TinyConvNet(), Budget(**{key: limit}), act_bits=8,
                                          example_inputs=(X_IMG,))
            assert got == expected, (key, limit)
    # the quantized model and its layer geometry give the same answer
    q4 = mpq_plugin.quantize_(TinyConvNet(), uniform_config(4), example_inputs=(X_IMG,))
    geoms = [layer.geometry(name) for name, layer in quant_layers(q4)]
    limit = float(costs[4]["bops"])  # type: ignore[arg-type]
    assert uniform_bits_for_budget(q4, Budget(bops=limit)) == 4
    assert uniform_bits_for_budget(geoms, Budget(bops=limit * 0.999)) == 3


def test_uniform_bits_needs_shapes_for_bops_on_conv_models() -> None:
    with pytest.raises(ValueError, match="example_inputs"):
        uniform_bits_for_budget(TinyConvNet(), Budget(bops=1e6))
    # weight-only budgets need no forward pass
    assert uniform_bits_for_budget(TinyConvNet(), Budget(avg_weight_bits=4.2)) == 4


# --------------------------------------------------------------------------- RTN PTQ
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_codes_equal_round_w_over_max_scale(bits: int, per_channel: bool) -> None:
    model = TinyConvNet()
    float_weights = {n: m.weight.detach().clone() for n, m in model.named_modules()
                     if isinstance(m, (nn.Conv2d, nn.Linear))}
    rtn_ptq_(model, bits, act_bits=None, per_channel=per_channel, calibration_batches=[X_IMG])
    qmax = 2 ** (bits - 1) - 1
    for name, layer in quant_layers(model):
        w = float_weights[name]
        if per_channel:
            s = w.abs().reshape(w.shape[0], -1).amax(dim=1) / qmax
            ref = torch.round(w / s.reshape(-1, *([1] * (w.dim() - 1))))
        else:
            ref = torch.round(w / (w.abs().max() / qmax))
        state = layer.weight_quantizer.freeze(layer.weight)
        assert torch.equal(state.codes, ref.to(torch.int64)), name
        assert int(state.codes.abs().max()) == qmax  # the largest weight lands on the top code
        assert torch.equal(rtn_quantize(w, bits, per_channel).codes, state.codes)
        # the fake-quant forward is the dequantized codes
        assert torch.equal(layer.quantized_weight(), state.dequantize())


def test_rtn_error_decreases_with_bits() -> None:
    ref_model = TinyConvNet()
    with torch.no_grad():
        y_float = ref_model(X_IMG)
    out_err, w_err = [], []
    for bits in (2, 3, 4, 8):
        model = copy.deepcopy(ref_model)
        rtn_ptq_(model, bits, act_bits=None, calibration_batches=[X_IMG])
        with torch.no_grad():
            out_err.append(float((model(X_IMG) - y_float).square().mean()))
            w_err.append(sum(float((l.quantized_weight() - l.weight).square().sum()) for _, l in quant_layers(model)))
    assert all(a > b for a, b in zip(out_err, out_err[1:])), out_err
    assert all(a > b for a, b in zip(w_err, w_err[1:])), w_err
    assert out_err[-1] < 1e-3 * out_err[0]


def test_rtn_activation_ranges_are_float_maxima_over_all_batches() -> None:
    model = _mlp3()
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(5, 16, generator=g), torch.zeros(5)), (3 * torch.randn(5, 16, generator=g), torch.zeros(5))]
    # expected: max |input| of each layer of the FLOAT model over both batches
    seen: Dict[str, float] = {}
    hooks = [m.register_forward_pre_hook(lambda m, i, n=n: seen.__setitem__(n, max(seen.get(n, 0.0), float(i[0].abs().max()))))
             for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    for h in hooks:
        h.remove()
    assert seen["2"] > 0 and seen["0"] > 0
    model.train()
    rtn_ptq_(model, 4, act_bits=8, calibration_batches=iter(batches))
    assert model.training  # mode restored
    for name, layer in quant_layers(model):
        st = layer.input_quantizer.freeze()
        qmax = 127 if st.signed else 255
        assert st.signed == (name == "0")  # raw inputs are signed, post-ReLU inputs are not
        assert float(st.scale) == pytest.approx(seen[name] / qmax, rel=1e-6), name


def test_rtn_per_layer_plan() -> None:
    model = _mlp3()
    _, plan = rtn_ptq_(model, {"0": 2, "4": 8}, act_bits=8, calibration_batches=[torch.randn(4, 16)])
    assert {n: lb.weight_bits for n, lb in plan.items()} == {"0": 2, "4": 8}
    assert not isinstance(model[2], QuantLayer)  # not in the plan: stays float
    assert plan.method == "rtn" and plan.cost["weight_params"] == 16 * 24 + 12 * 4
    # a BitPlan is accepted too (its activation bits included)
    model2 = _mlp3()
    _, plan2 = rtn_ptq_(model2, plan, calibration_batches=[torch.randn(4, 16)])
    assert plan2.to_dict() == plan.to_dict()
    with pytest.raises(ValueError, match="not Conv1d/Conv2d/Linear"):
        rtn_ptq_(_mlp3(), {"1": 4})


# --------------------------------------------------------------------------- Hutchinson
def _exact_block_hessians(model: nn.Module, loss_fn: nn.Module, batch: tuple, names: Sequence[str]):
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    flat = torch.cat([params[n].detach().flatten() for n in names])

    def f(v: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(v, sizes)
        new = dict(params)
        new.update({n: c.reshape(s) for n, c, s in zip(names, chunks, shapes)})
        return loss_fn(torch.func.functional_call(model, new, (batch[0],)), batch[1])

    return torch.autograd.functional.hessian(f, flat), sizes


def test_hutchinson_matches_exact_hessian_trace() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64))
               for _ in range(2)]
    names = ["0.weight", "2.weight"]
    loss_fn = nn.MSELoss()
    n_samples = 1500
    est = hutchinson_trace(model, loss_fn, batches, {n: model.get_parameter(n) for n in names},
                           n_samples=n_samples, seed=0)
    exact = {n: 0.0 for n in names}
    var = {n: 0.0 for n in names}
    for batch in batches:
        H, sizes = _exact_block_hessians(model, loss_fn, batch, names)
        start = 0
        for n, size in zip(names, sizes):
            rows = slice(start, start + size)
            block = H[rows, rows]
            exact[n] += float(torch.trace(block)) / len(batches)
            # Var(z_l^T (Hz)_l) for Rademacher z: 2 * sum of squared off-diagonals inside the block
            # plus the squared cross-block entries of the block's rows
            cross = H[rows].square().sum() - block.square().sum()
            var[n] += float(2 * (block.square().sum() - block.diagonal().square().sum()) + cross)
            start += size
    for n in names:
        sigma = math.sqrt(var[n] / (len(batches) ** 2 * n_samples))
        assert sigma < 0.1 * abs(exact[n])  # the check has power
        assert abs(est[n] - exact[n]) < 5 * sigma, (n, est[n], exact[n], sigma)
    # restores state
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_hutchinson_is_seeded_and_validates() -> None:
    model = _mlp3()
    batches = _regression_batches()
    params = {"0": model[0].weight, "4": model[4].weight}
    a = hutchinson_trace(model, nn.MSELoss(), batches, params, n_samples=4, seed=7)
    b = hutchinson_trace(model, nn.MSELoss(), batches, params, n_samples=4, seed=7)
    c = hutchinson_trace(model, nn.MSELoss(), batches, params, n_samples=4, seed=8)
    assert a == b and a != c
    with pytest.raises(ValueError, match="n_samples"):
        hutchinson_trace(model, nn.MSELoss(), batches, params, n_samples=0)
    with pytest.raises(ValueError, match="empty"):
        hutchinson_trace(model, nn.MSELoss(), [], params)


# --------------------------------------------------------------------------- ILP
def _brute_force(sens: Dict[str, Dict[int, float]], geoms: List[LayerGeometry], budget: Budget,
                 acts: List[int]) -> Dict[str, int]:
    names = [g.name for g in geoms]
    best, best_bits = math.inf, None
    for combo in itertools.product(*(sorted(sens[n]) for n in names)):
        cost = plan_cost(geoms, list(combo), acts)
        if all(cost[k] <= v * (1 + 1e-6) for k, v in budget.items()):
            obj = sum(sens[n][b] for n, b in zip(names, combo))
            if obj < best:
                best, best_bits = obj, dict(zip(names, combo))
    assert best_bits is not None
    return best_bits


@pytest.mark.parametrize("seed", range(6))
def test_ilp_equals_brute_force_on_three_layers(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    cands = (2, 3, 4, 8)
    sizes = torch.randint(10, 500, (3,), generator=g).tolist()
    geoms = [LayerGeometry(f"l{i}", "linear", n, 4, int(n * (i + 1) * 7), 10) for i, n in enumerate(sizes)]
    acts = [8, 4, 8]
    sens = {f"l{i}": {} for i in range(3)}
    for i in range(3):
        err = torch.rand(1, generator=g).item() * 10 ** (2 * torch.rand(1, generator=g).item())
        for b in cands:  # decreasing in bits, like a real quantization error
            sens[f"l{i}"][b] = err * 4.0 ** (-b) * (1 + 0.1 * torch.rand(1, generator=g).item())
    budgets = [Budget(avg_weight_bits=2.0 + 6 * torch.rand(1, generator=g).item()),
               Budget(weight_kb=plan_cost(geoms, [3, 3, 3], acts)["weight_kb"] * (0.9 + 0.5 * torch.rand(1, generator=g).item())),
               Budget(bops=plan_cost(geoms, [4, 4, 4], acts)["bops"] * (0.6 + 0.6 * torch.rand(1, generator=g).item()),
                      avg_weight_bits=5.0)]
    for budget in budgets:
        bits, status = solve_bit_ilp(sens, geoms, budget, acts)
        assert status == "Optimal"
        assert bits == _brute_force(sens, geoms, budget, acts), budget
        cost = plan_cost(geoms, [bits[g.name] for g in geoms], acts)
        assert all(cost[k] <= v * (1 + 1e-6) for k, v in budget.items())


def test_ilp_exact_fit_budget_and_infeasible_budget() -> None:
    geoms = [LayerGeometry(n, "linear", 100, 0, 100, 10) for n in "abc"]
    sens = {n: {2: 9.0 - i, 4: 1.0, 8: 0.0} for i, n in enumerate("abc")}
    bits, _ = solve_bit_ilp(sens, geoms, Budget(avg_weight_bits=4.0))  # 2+2+8 or 4+4+4 fit exactly
    assert sum(bits.values()) == 12
    assert bits == {"a": 4, "b": 4, "c": 4}  # objective 3; any choice with a 2-bit layer costs >= 7
    with pytest.raises(ValueError, match="minimum achievable is 2"):
        solve_bit_ilp(sens, geoms, Budget(avg_weight_bits=1.5))


# --------------------------------------------------------------------------- HAWQ end to end
def test_hawq_allocation_is_optimal_meets_budget_and_round_trips() -> None:
    model = _mlp3()
    batches = _fitted_batches(model)
    budget = Budget(avg_weight_bits=3.3)
    result = hawq_allocate(model, nn.MSELoss(), batches, budget, candidates=(2, 3, 4, 8), n_samples=8, seed=0)
    assert result.status == "Optimal" and set(result.bits) == {"0", "2", "4"}
    assert result.cost["avg_weight_bits"] <= 3.3
    assert all(t > 0 for t in result.traces.values())
    # the ILP's choice is the brute-force optimum of the sensitivities it computed
    geoms = [LayerGeometry(n, "linear", result.weight_params[n], 0, 0, 0) for n in ("0", "2", "4")]
    assert result.bits == _brute_force(result.sensitivities, geoms, budget, [8, 8, 8])
    # sensitivities decrease with bits (more bits, less quantization error)
    for s in result.sensitivities.values():
        assert s[2] > s[3] > s[4] > s[8]
    # QAT config at the allocated bits: quantize_ reproduces bits and cost exactly
    q = mpq_plugin.quantize_(copy.deepcopy(model), hawq_config(result), example_inputs=(batches[0][0],))
    plan = mpq_plugin.freeze(q)
    assert {n: lb.weight_bits for n, lb in plan.items()} == result.bits
    for key in ("avg_weight_bits", "weight_kb", "bops", "act_kb_sum", "act_kb_max"):
        assert plan.cost[key] == pytest.approx(result.cost[key], rel=1e-6), key
    assert plan.cost["slack_avg_weight_bits"] >= 0
    assert result.to_bitplan().to_dict() == plan.to_dict()


class _TwoBranch(nn.Module):
    """``out = gain_a * a(x) + gain_b * b(x)`` with ``a`` and ``b`` identical: equal sizes and
    equal quantization errors, Hessian traces in the ratio ``gain_a^2 : gain_b^2``."""

    def __init__(self, gain_a: float, gain_b: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.load_state_dict(self.a.state_dict())
        self.gains = (gain_a, gain_b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gains[0] * self.a(x) + self.gains[1] * self.b(x)


@pytest.mark.parametrize("gains, high", [((10.0, 0.1), "a"), ((0.1, 10.0), "b")])
def test_hawq_gives_more_bits_to_the_high_trace_layer(gains: tuple, high: str) -> None:
    model = _TwoBranch(*gains)
    batches = _regression_batches(d_in=8, d_out=8)
    result = hawq_allocate(model, nn.MSELoss(), batches, Budget(avg_weight_bits=3.0),
                           candidates=(2, 4), n_samples=8)
    low = "b" if high == "a" else "a"
    assert result.traces[high] > 100 * result.traces[low]
    assert result.bits == {high: 4, low: 2}


def test_hawq_respects_config_matching_and_fixed_overrides() -> None:
    model = _mlp3()
    cfg = MPQConfig(method="lsq", weight_bits=(2, 8), exclude=("0",), layer_overrides={"4": {"weight_bits": 8}})
    result = hawq_allocate(model, nn.MSELoss(), _regression_batches(), Budget(avg_weight_bits=3.0),
                           n_samples=2, config=cfg)
    assert set(result.bits) == {"2", "4"} and result.bits["4"] == 8
    assert set(result.sensitivities["4"]) == {8}
    q = mpq_plugin.quantize_(copy.deepcopy(model), hawq_config(result))
    assert not isinstance(q[0], QuantLayer) and isinstance(q[2], QuantLayer)


def test_hawq_bops_budget_on_a_conv_net() -> None:
    model = TinyConvNet()
    batches = [(X_IMG, torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(0)))]
    q4 = mpq_plugin.quantize_(TinyConvNet(), uniform_config(4), example_inputs=(X_IMG,))
    bops4 = float(mpq_plugin.model_cost(q4)["bops"])  # type: ignore[arg-type]
    result = hawq_allocate(model, nn.CrossEntropyLoss(), batches, Budget(bops=bops4), n_samples=4)
    assert result.cost["bops"] <= bops4
    q = mpq_plugin.quantize_(copy.deepcopy(model), hawq_config(result), example_inputs=(X_IMG,))
    assert float(mpq_plugin.model_cost(q)["bops"]) == pytest.approx(result.cost["bops"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="act_bits"):
        hawq_config(result, act_bits=4)


def test_hawq_infeasible_budget_fails_before_estimating() -> None:
    with pytest.raises(ValueError, match="minimum achievable is 2"):
        hawq_allocate(_mlp3(), nn.MSELoss(), _regression_batches(), Budget(avg_weight_bits=1.5))
    with pytest.raises(ValueError, match="minimum achievable"):
        hawq_allocate(_mlp3(), nn.MSELoss(), _regression_batches(), Budget(weight_kb=0.01))
    with pytest.raises(ValueError, match="candidates"):
        hawq_allocate(_mlp3(), nn.MSELoss(), _regression_batches(), Budget(avg_weight_bits=3), candidates=(1, 2))
