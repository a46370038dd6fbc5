"""mpq as an Intel Neural Compressor 3.x algorithm, through INC's real quantize/prepare/convert/autotune."""
import copy
import logging
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("neural_compressor.torch.quantization")

from neural_compressor.torch.quantization import TuningConfig, convert, prepare, quantize  # noqa: E402
from neural_compressor.torch.quantization import autotune as inc_autotune  # noqa: E402

import mpq_plugin  # noqa: E402
from mpq_plugin import inc  # noqa: E402
from mpq_plugin.datasets import load_digits_loaders  # noqa: E402
from mpq_plugin.models import SmallCNN  # noqa: E402
from mpq_plugin.nn.layers import quant_layers  # noqa: E402
from mpq_plugin.search.trainer import FitConfig, evaluate, train_float  # noqa: E402

FIT = FitConfig(search_steps=20, finetune_steps=8, lr=3e-3, bit_lr=0.1, progress_bar=False, log_every=1000)


@pytest.fixture(scope="module")
def data():
    torch.set_num_threads(1)
    return load_digits_loaders(batch_size=64, seed=0)


@pytest.fixture(scope="module")
def float_model(data):
    torch.manual_seed(0)
    m = SmallCNN()
    train_float(m, data[0], 60, lr=1e-2, progress_bar=False)
    return m.eval()


def _frozen_plan_ok(q: nn.Module, budget: float) -> None:
    assert isinstance(q.mpq_plan, mpq_plugin.BitPlan)
    assert q.mpq_plan.avg_weight_bits() <= budget + 1e-6
    assert all(bool(layer.weight_quantizer.bits_fixed) for _, layer in quant_layers(q))
    assert q.is_quantized  # set by INC's quantize


def test_select_by_object_runs_search_freeze_finetune(data, float_model):
    train, val = data
    q = quantize(copy.deepcopy(float_model), inc.MPQConfig(method="learned_range", budget=3.0),
                 run_fn=inc.train_with(train, val, FIT))
    _frozen_plan_ok(q, 3.0)
    assert q.mpq_plan.method == "learned_range"
    res = q.mpq_fit_result
    assert res.completed and res.steps == FIT.search_steps + FIT.finetune_steps
    assert res.metrics["accuracy"] > 0.5  # a trained 10-class model, not chance


def test_select_by_name_dict_with_local_overrides(data, float_model):
    train, _ = data
    cfg = {"mpq": {"global": {"method": "sdq", "budget": 3.5},
                   "local": {"fc": {"weight_bits": 8}, "features.0": {"dtype": "fp32"}}}}
    q = quantize(copy.deepcopy(float_model), cfg, run_fn=inc.train_with(train, None, FIT))
    _frozen_plan_ok(q, 3.5)
    assert q.mpq_plan.method == "sdq"
    assert q.mpq_plan["fc"].weight_bits == 8
    assert "features.0" not in q.mpq_plan and type(q.features[0]) is nn.Conv2d
    assert set(q.mpq_plan) == {"features.3", "features.6", "fc"}


def test_set_local_pins_and_excludes(data, float_model):
    train, _ = data
    cfg = inc.MPQConfig(method="sdq", budget=3.0, min_bits=2, max_bits=6)
    cfg.set_local("fc", inc.MPQConfig(weight_bits=8))
    cfg.set_local("features.0", inc.MPQConfig(dtype="fp32"))
    native, _ = inc.to_native_config(cfg.to_config_mapping(model_info=cfg.get_model_info(float_model)),
                                     cfg.get_model_info(float_model))
    assert native.layer_overrides == {"fc": {"weight_bits": (8, 8), "act_bits": (8, 8)}}
    assert native.exclude == (r"features\.0",)
    q = quantize(copy.deepcopy(float_model), cfg, run_fn=inc.train_with(train, None, FIT))
    assert q.mpq_plan["fc"].weight_bits == 8
    assert all(q.mpq_plan[n].weight_bits <= 6 for n in ("features.3", "features.6"))
    assert type(q.features[0]) is nn.Conv2d


def _user_loop(train, steps):
    def run(model):
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        it = iter(train)
        for _ in range(steps):
            try:
                x, y = next(it)
            except StopIteration:
                it = iter(train)
                x, y = next(it)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return run


def test_prepare_convert_with_users_training_loop(data, float_model):
    train, val = data
    x0 = next(iter(train))[0]
    p = prepare(copy.deepcopy(float_model), inc.MPQConfig(method="sdq", budget=3.0, search_steps=20),
                example_inputs=x0)
    assert p.is_prepared and next(quant_layers(p), None) is not None
    session = p._mpq_inc_session
    _user_loop(train, 20)(p)
    assert session.search.step_count == 20  # the optimizer hooks drove the search
    c = convert(p)
    assert c.mpq_plan.avg_weight_bits() <= 3.0 + 1e-6
    assert all(bool(layer.weight_quantizer.bits_fixed) for _, layer in quant_layers(c))
    assert not hasattr(c, "_mpq_inc_session")
    # hooks are gone: another optimizer step no longer advances the search
    _user_loop(train, 1)(c)
    assert session.search.step_count == 20
    assert evaluate(c, val)["accuracy"] > 0.3


def test_quantize_with_custom_run_fn_and_errors(data, float_model):
    train, _ = data
    q = quantize(copy.deepcopy(float_model), inc.MPQConfig(method="sdq", budget=3.0, search_steps=15),
                 run_fn=_user_loop(train, 15), example_inputs=next(iter(train))[0])
    assert q.mpq_plan.avg_weight_bits() <= 3.0 + 1e-6
    with pytest.raises(ValueError, match="search_steps"):
        quantize(copy.deepcopy(float_model), inc.MPQConfig(budget=3.0), run_fn=_user_loop(train, 1))
    with pytest.raises(ValueError, match="train_with"):
        quantize(copy.deepcopy(float_model), inc.MPQConfig(budget=3.0))


def test_bad_configs_name_the_problem(float_model):
    with pytest.raises(ValueError, match=r"unknown mpq config key\(s\) \['bugdet'\]"):
        inc.MPQConfig(bugdet=3.0)
    with pytest.raises(ValueError, match="below the minimum"):
        inc.MPQConfig(budget=1.5, min_bits=2)
    with pytest.raises(ValueError, match="not registered|unknown method|registered"):
        inc.MPQConfig(method="nope")
    with pytest.raises(ValueError, match="dtype"):
        inc.MPQConfig(dtype="int4")
    with pytest.raises(ValueError, match=r"unknown algorithm .*'mpq'"):
        inc.quantize(copy.deepcopy(float_model), {"mqp": {"global": {"budget": 3.0}}})
    with pytest.raises(ValueError, match="Intel Neural Compressor rejected"):
        inc.quantize(copy.deepcopy(float_model), {"mpq": {"global": {"budget": 3.0, "wbits": 4}}})
    with pytest.raises(ValueError, match="tuning space"):
        quantize(copy.deepcopy(float_model), inc.MPQConfig(budget=[3.0, 4.0]), run_fn=lambda m: None)
    assert inc.get_default_mpq_config().budget == 4.0


def _avg_bits(model: nn.Module) -> float:
    plan = getattr(model, "mpq_plan", None)
    return 32.0 if plan is None else plan.avg_weight_bits()


def test_autotune_picks_smallest_budget_within_tolerance(data, float_model):
    train, _ = data
    before = {k: v.clone() for k, v in float_model.state_dict().items()}
    # a size-aware score: float (32 bits) scores 4; a trial passes (5% tolerance) from 3.8 average bits up
    best = inc.autotune(float_model, lambda m: min(_avg_bits(m), 4.0), inc.train_with(train, None, FIT),
                        budgets=(4.0, 2.5, 6.0, 3.0), tolerable_loss=0.05, config=inc.MPQConfig(method="sdq"))
    rep = best.mpq_autotune
    assert [t["budget"] for t in rep["trials"]] == [2.5, 3.0, 4.0]  # cheapest first, stopped at the pass
    assert [t["passed"] for t in rep["trials"]] == [False, False, True]
    assert rep["met_tolerance"] and rep["chosen"] == 3 and rep["baseline"] == 4.0
    assert best.mpq_plan.budget.avg_weight_bits == 4.0 and 3.8 <= best.mpq_plan.avg_weight_bits() <= 4.0
    assert [t["warm_started_from"] for t in rep["trials"]] == [None, 2.5, 3.0]
    assert [t["warm_started_layers"] for t in rep["trials"]] == [0, 4, 4]  # every searched layer of SmallCNN
    assert all(t["wall_s"] > 0 for t in rep["trials"])
    after = float_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # every trial used a copy of the float model


def test_autotune_no_budget_meets_returns_best_and_warns(data, float_model, caplog):
    train, _ = data
    seen = {}

    def score(m):  # float scores 10; the 2.5-bit trial scores best of the two, neither passes
        plan = getattr(m, "mpq_plan", None)
        if plan is None:
            return 10.0
        seen[plan.budget.avg_weight_bits] = m
        return 4.0 if plan.budget.avg_weight_bits == 2.5 else 1.0

    with caplog.at_level(logging.WARNING, logger="mpq_plugin.integrations.inc"):
        best = inc.autotune(float_model, score, inc.train_with(train, None, FIT), budgets=(2.5, 3.0),
                            tolerable_loss=0.01, config=inc.MPQConfig(method="sdq"), warm_start=False)
    rep = best.mpq_autotune
    assert not rep["met_tolerance"] and [t["passed"] for t in rep["trials"]] == [False, False]
    assert rep["chosen"] == 1 and best.mpq_plan.budget.avg_weight_bits == 2.5
    assert best is seen[2.5]  # the evaluated trial model, not a retrained one
    assert [t["warm_started_from"] for t in rep["trials"]] == [None, None]
    assert "no budget in [2.5, 3.0] is within tolerable_loss" in caplog.text


def test_incs_own_autotune_with_the_cheapest_first_sampler(data, float_model):
    train, _ = data
    tune = TuningConfig(config_set=[inc.get_mpq_config_set_for_tuning((3.0, 2.5), method="sdq")],
                        sampler=inc.CheapestFirstSampler, tolerable_loss=0.9)
    best = inc_autotune(copy.deepcopy(float_model), tune, eval_fn=lambda m: 1.0,
                        run_fn=inc.train_with(train, None, FIT))
    assert best.mpq_plan.budget.avg_weight_bits == 2.5  # the first, cheapest trial passed


def _run_py(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_import_errors_say_what_to_install():
    missing = _run_py("import sys; sys.modules['neural_compressor'] = None\n"
                      "try:\n    import mpq_plugin.inc\nexcept ImportError as e:\n    print('ERR', e)")
    assert "ERR" in missing.stdout and "pip install mpq_plugin[inc]" in missing.stdout, missing.stderr
    old = _run_py("import sys, neural_compressor; sys.modules['neural_compressor.torch.quantization'] = None\n"
                  "try:\n    import mpq_plugin.inc\nexcept ImportError as e:\n    print('ERR', e)")
    assert "ERR" in old.stdout and "3.x" in old.stdout and "tested with 3.10" in old.stdout, old.stderr
    plain = _run_py("import sys, mpq_plugin; print('neural_compressor' in sys.modules)")
    assert plain.stdout.strip() == "False", plain.stderr
