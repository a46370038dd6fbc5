"""The trainer: exact resume, Ctrl-C checkpoints, NaN early stop, bad-input messages."""
from __future__ import annotations

import os
import signal

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mpq_plugin
from mpq_plugin.registry import get_method
from mpq_plugin.search.trainer import (
    EpochSampler,
    FitConfig,
    TrainingDiverged,
    evaluate,
    fit,
    load_checkpoint,
)

SEARCHING = [m for m in mpq_plugin.list_methods() if get_method(m).quantizer_cls.searches_bits]


class Net(nn.Module):
    """Conv-BN-ReLU, dropout (so the RNG state matters), linear head."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(4 * 8 * 8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x)))).flatten(1))


def make_data(n: int = 70, classes: int = 4, batch_size: int = 16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    ds = TensorDataset(x, y)
    return DataLoader(ds, batch_size=batch_size, shuffle=True), DataLoader(ds, batch_size=32)


def make_model() -> Net:
    torch.manual_seed(123)
    return Net()


def mpq_config(method: str = "lsq") -> mpq_plugin.MPQConfig:
    if get_method(method).quantizer_cls.searches_bits:
        return mpq_plugin.MPQConfig(method=method, weight_bits=(2, 8), act_bits=8,
                                    budget=mpq_plugin.Budget(avg_weight_bits=4.0))
    return mpq_plugin.MPQConfig(method=method, weight_bits=4, act_bits=8)


def fit_config(run_dir, **kw) -> FitConfig:
    kw.setdefault("kd", False)
    kw.setdefault("strict_budget", False)  # 6 search steps need not reach the budget; exactness is tested
    return FitConfig(search_steps=6, finetune_steps=6, lr=0.01, run_dir=str(run_dir), progress_bar=False, **kw)


def _states_equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs after resume"


# -- resume exactness ---------------------------------------------------------------------------------
def _resume_cases():
    """Every method mid-search (mid-epoch); lsq and sdq+KD also at the phase boundary and mid-finetune."""
    return ([("lsq", False, s) for s in (3, 6, 9)] + [(m, False, 4) for m in SEARCHING]
            + [("lsq", True, 9), ("sdq", True, 6), ("sdq", True, 9)])


@pytest.mark.parametrize("method,kd,stop", _resume_cases())
def test_resume_is_exact(tmp_path, method: str, kd: bool, stop: int) -> None:
    train, val = make_data()
    full = fit(make_model(), train, val, mpq_config(method), fit_config(tmp_path / "a", kd=kd))
    assert full.completed and len(full.losses) == 12

    first = fit(make_model(), train, val, mpq_config(method), fit_config(tmp_path / "b", kd=kd), stop_at_step=stop)
    assert not first.completed and first.steps == stop
    assert first.losses == full.losses[:stop]
    model = make_model()  # a fresh process would rebuild the float model the same way
    resumed = fit(model, train, val, mpq_config(method), fit_config(tmp_path / "b", kd=kd), resume=True)
    assert resumed.completed
    assert resumed.losses[stop] == full.losses[stop], "next-step loss after resume differs"
    assert resumed.losses == full.losses
    assert resumed.plan.to_dict() == full.plan.to_dict()
    assert resumed.metrics["accuracy"] == full.metrics["accuracy"]
    reference = make_model()
    ck = load_checkpoint(tmp_path / "a")
    mpq_plugin.quantize_(reference, mpq_config(method), example_inputs=(next(iter(train))[0],))
    reference.load_state_dict(ck["model"])
    _states_equal(model, reference)


def test_periodic_checkpoint_resume_matches(tmp_path) -> None:
    """A run killed hard after a periodic checkpoint resumes from it exactly."""
    train, val = make_data()
    full = fit(make_model(), train, val, mpq_config(), fit_config(tmp_path / "a"))
    # simulate a crash right after the step-5 checkpoint by stopping at 5 (it saves the same state)
    fit(make_model(), train, val, mpq_config(), fit_config(tmp_path / "b", checkpoint_every=5), stop_at_step=7)
    ck = load_checkpoint(tmp_path / "b")
    assert ck["step"] == 7
    res = fit(make_model(), train, val, mpq_config(), fit_config(tmp_path / "b", checkpoint_every=5), resume=True)
    assert res.losses == full.losses


def test_ctrl_c_leaves_resumable_checkpoint(tmp_path) -> None:
    train, val = make_data()
    full = fit(make_model(), train, val, mpq_config(), fit_config(tmp_path / "a"))
    calls = {"n": 0}

    def interrupting_loss(out, y):
        calls["n"] += 1
        if calls["n"] == 1 + 5:  # the 1 is fit's one-batch check; Ctrl-C during step 5
            os.kill(os.getpid(), signal.SIGINT)
        return F.cross_entropy(out, y)

    with pytest.raises(KeyboardInterrupt):
        fit(make_model(), train, val, mpq_config(), fit_config(tmp_path / "b"), loss_fn=interrupting_loss)
    ck = load_checkpoint(tmp_path / "b")
    assert ck["step"] == 5, "the interrupted step is finished before saving"
    res = fit(make_model(), train, val, mpq_config(), fit_config(tmp_path / "b"), resume=True)
    assert res.losses == full.losses


def test_completed_run_resume_returns_saved_result(tmp_path) -> None:
    train, val = make_data()
    full = fit(make_model(), train, val, mpq_config(), fit_config(tmp_path))
    again = fit(make_model(), train, val, mpq_config(), fit_config(tmp_path), resume=True)
    assert again.completed and again.metrics["accuracy"] == full.metrics["accuracy"]
    assert again.losses == full.losses


def test_resume_with_other_settings_names_them(tmp_path) -> None:
    train, val = make_data()
    fit(make_model(), train, val, mpq_config(), fit_config(tmp_path), stop_at_step=2)
    with pytest.raises(ValueError, match=r"lr \(0.01 -> 0.02\)"):
        fit(make_model(), train, val, mpq_config(), fit_config(tmp_path).replace(lr=0.02), resume=True)
    other = mpq_plugin.MPQConfig(method="lsq", weight_bits=3, act_bits=8)
    with pytest.raises(ValueError, match="MPQConfig"):
        fit(make_model(), train, val, other, fit_config(tmp_path), resume=True)


def test_checkpoint_holds_every_state(tmp_path) -> None:
    train, val = make_data()
    fit(make_model(), train, val, mpq_config(), fit_config(tmp_path), stop_at_step=8)
    ck = load_checkpoint(tmp_path)
    assert ck["step"] == 8 and ck["phase"] == "finetune" and ck["frozen"]
    assert {"torch", "numpy", "python"} <= set(ck["rng"])
    assert ck["data"] == {"seed": 0, "epoch": 1, "batch": 3, "steps_per_epoch": 5, "dataset_len": 70,
                          "batch_size": 16}
    assert ck["optimizer"]["state"] and ck["optimizer_phase"] == "finetune"
    assert ck["scheduler"]["last_epoch"] == 2
    assert "conv.weight_quantizer.step" in ck["model"]
    assert mpq_plugin.BitPlan.from_json(ck["plan"])["fc"].weight_bits == 4
    assert len(ck["losses"]) == 8 and ck["seconds"]["search"] > 0
    assert (tmp_path / "plan.json").is_file()
    assert not list(tmp_path.glob(".*tmp")), "temporary checkpoint file left behind"


def test_epoch_sampler_depends_only_on_seed_and_epoch() -> None:
    a = list(EpochSampler(20, seed=1, epoch=3))
    assert a == list(EpochSampler(20, seed=1, epoch=3)) and sorted(a) == list(range(20))
    assert a != list(EpochSampler(20, seed=1, epoch=4)) and a != list(EpochSampler(20, seed=2, epoch=3))
    assert list(EpochSampler(20, seed=1, epoch=3, start=8)) == a[8:]



def _length_spread(order, lengths, batch):
    return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b)
               for b in (order[k:k + batch] for k in range(0, len(order) - batch + 1, batch)))


def test_epoch_sampler_groups_by_length_and_still_replays() -> None:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 65, (203,), generator=g).tolist()
    grouped = EpochSampler(203, seed=1, epoch=2, lengths=lengths, batch_size=8, mega=5)
    a = list(grouped)
    assert sorted(a) == list(range(203))  # a permutation
    assert a == list(EpochSampler(203, seed=1, epoch=2, lengths=lengths, batch_size=8, mega=5))
    assert a != list(EpochSampler(203, seed=1, epoch=3, lengths=lengths, batch_size=8, mega=5))
    assert list(EpochSampler(203, seed=1, epoch=2, start=16, lengths=lengths, batch_size=8, mega=5)) == a[16:]
    plain = list(EpochSampler(203, seed=1, epoch=2))
    assert _length_spread(a, lengths, 8) < 0.5 * _length_spread(plain, lengths, 8)
    # the partial batch (203 = 25 * 8 + 3) stays last, so drop_last drops 3 samples as without grouping
    assert len(a[200:]) == 3
    # batch order is shuffled: batch lengths do not fall monotonically within a mega-batch
    first = [max(lengths[i] for i in a[k:k + 8]) for k in range(0, 40, 8)]
    assert first != sorted(first, reverse=True) or len(set(first)) == 1
    with pytest.raises(ValueError, match="lengths for"):
        EpochSampler(10, seed=0, epoch=0, lengths=[1, 2], batch_size=2)


def test_group_by_length_takes_lengths_from_the_dataset() -> None:
    from mpq_plugin.search.trainer import _DataStream, sample_lengths

    texts = [list(range(n)) for n in (5, 1, 9, 2, 7, 3, 8, 4)]
    assert sample_lengths(texts) == [5, 1, 9, 2, 7, 3, 8, 4]
    loader = DataLoader(TensorDataset(torch.randn(8, 3), torch.zeros(8)), batch_size=2, shuffle=True)
    assert sample_lengths(loader.dataset) == [3] * 8  # first field's length
    with pytest.raises(ValueError, match="lengths"):
        sample_lengths([(1, 0), (2, 0)])  # ints have no length
    ds = TensorDataset(torch.arange(8.0), torch.zeros(8))
    ds.lengths = [5, 1, 9, 2, 7, 3, 8, 4]
    s = _DataStream(DataLoader(ds, batch_size=2, shuffle=True, drop_last=True), seed=0, group_by_length=True)
    batches = [s.batch_at(i)[0].long().tolist() for i in range(4)]
    assert sorted(x for b in batches for x in b) == list(range(8))
    # one mega-batch (50 * 2 >= 8): sorted by length then cut, so each batch pairs neighbours in length
    assert _length_spread([x for b in batches for x in b], ds.lengths, 2) == 5  # (9,8) (7,5) (4,3) (2,1)

def test_data_order_does_not_touch_global_rng(tmp_path) -> None:
    train, _ = make_data()
    torch.manual_seed(5)
    before = torch.get_rng_state()
    from mpq_plugin.search.trainer import _DataStream

    s = _DataStream(train, seed=0)
    for step in (0, 1, 7, 3):
        s.batch_at(step)
    assert torch.equal(before, torch.get_rng_state())


# -- failures ------------------------------------------------------------------------------------------
def test_nan_loss_stops_with_clear_message_and_keeps_checkpoint(tmp_path) -> None:
    train, val = make_data()
    calls = {"n": 0}

    def nan_at_step_5(out, y):
        calls["n"] += 1
        loss = F.cross_entropy(out, y)
        return loss * float("nan") if calls["n"] == 1 + 5 else loss

    cfg = fit_config(tmp_path, checkpoint_every=2)
    with pytest.raises(TrainingDiverged) as e:
        fit(make_model(), train, val, mpq_config(), cfg, loss_fn=nan_at_step_5)
    msg = str(e.value)
    assert "step 5/12" in msg and "search phase" in msg and "last finite loss" in msg and "at step 4" in msg
    assert "lower lr" in msg and "left as it was" in msg
    assert load_checkpoint(tmp_path)["step"] == 4, "a diverged step must not be saved"


def test_empty_train_loader(tmp_path) -> None:
    empty = DataLoader(TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), batch_size=4)
    _, val = make_data()
    with pytest.raises(ValueError, match="train_loader yields no batches"):
        fit(make_model(), empty, val, mpq_config(), fit_config(tmp_path))
    small = DataLoader(TensorDataset(torch.zeros(3, 1, 8, 8), torch.zeros(3, dtype=torch.long)), batch_size=4,
                       drop_last=True)
    with pytest.raises(ValueError, match="3 samples, batch_size=4, drop_last=True"):
        fit(make_model(), small, val, mpq_config(), fit_config(tmp_path))


def test_empty_val_loader(tmp_path) -> None:
    train, _ = make_data()
    empty = DataLoader(TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), batch_size=4)
    with pytest.raises(ValueError, match="val_loader yields no batches"):
        fit(make_model(), train, empty, mpq_config(), fit_config(tmp_path))
    with pytest.raises(ValueError, match="val_loader yields no batches"):
        evaluate(make_model(), [])


@pytest.mark.filterwarnings("ignore:Using a target size")
def test_outputs_that_do_not_fit_the_loss(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(20, 1, 8, 8, generator=g), torch.randint(0, 7, (20,), generator=g))
    train = DataLoader(ds, batch_size=10)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"outputs of shape \(10, 4\).*targets of shape \(10,\).*num_classes"):
        fit(Net(classes=4), train, None, mpq_config(), fit_config(tmp_path))
    with pytest.raises(ValueError, match="do not match the loss"):
        fit(Net(classes=4), train, None, mpq_config(), fit_config(tmp_path), loss_fn=F.mse_loss)


def test_infeasible_budget_names_minimum(tmp_path) -> None:
    train, val = make_data()
    cfg = mpq_plugin.MPQConfig(method="lsq", weight_bits=4, act_bits=8, budget=mpq_plugin.Budget(weight_kb=0.01))
    with pytest.raises(ValueError, match="minimum achievable"):
        fit(make_model(), train, val, cfg, fit_config(tmp_path))


def test_bad_batches_and_loaders(tmp_path) -> None:
    _, val = make_data()
    with pytest.raises(TypeError, match="DataLoader"):
        fit(make_model(), [(torch.zeros(2, 1, 8, 8), torch.zeros(2))], val, mpq_config(), fit_config(tmp_path))
    single = DataLoader(TensorDataset(torch.zeros(4, 1, 8, 8)), batch_size=2)
    with pytest.raises(ValueError, match=r"\(inputs, targets\)"):
        fit(make_model(), single, val, mpq_config(), fit_config(tmp_path))


def test_kd_needs_a_float_teacher_for_a_quantized_model(tmp_path) -> None:
    train, val = make_data()
    m = mpq_plugin.quantize_(make_model(), mpq_config(), example_inputs=(torch.zeros(2, 1, 8, 8),))
    with pytest.raises(ValueError, match="teacher"):
        fit(m, train, val, mpq_config(), fit_config(tmp_path, kd=True))


@pytest.mark.parametrize("kw,err,msg", [
    ({"lr": "0.1"}, TypeError, "FitConfig.lr must be a number"),
    ({"search_steps": 2.5}, TypeError, "search_steps must be an integer or null"),
    ({"kd": 1}, TypeError, "kd must be true or false"),
    ({"optimizer": "rmsprop"}, ValueError, r"allowed: \['adam', 'sgd'\]"),
    ({"lr": 0.0}, ValueError, "lr=0.0 must be > 0"),
    ({"kd_alpha": 2.0}, ValueError, r"kd_alpha=2.0 must be in \[0, 1\]"),
    ({"finetune_steps": -1}, ValueError, "finetune_steps=-1 must be >= 0"),
])
def test_fit_config_validation(kw, err, msg) -> None:
    with pytest.raises(err, match=msg):
        FitConfig(**kw)


def test_fit_config_from_dict_rejects_unknown_keys() -> None:
    assert FitConfig.from_dict({"lr": 0.5}).lr == 0.5
    with pytest.raises(ValueError, match=r"unknown FitConfig key\(s\) \['learning_rate'\]; allowed: .*'lr'"):
        FitConfig.from_dict({"learning_rate": 0.5})


def test_checkpoint_options_need_run_dir() -> None:
    train, val = make_data()
    with pytest.raises(ValueError, match="run_dir"):
        fit(make_model(), train, val, mpq_config(), FitConfig(search_steps=1, finetune_steps=1, kd=False,
                                                              checkpoint_every=1))


def test_ebr_default_follows_method() -> None:
    from mpq_plugin.search.trainer import _resolve_ebr

    assert _resolve_ebr(FitConfig(), "sdq") == 0.1
    assert _resolve_ebr(FitConfig(), "lsq") == 0.0
    assert _resolve_ebr(FitConfig(ebr_lambda=0.3), "csq") == 0.3


def test_fit_trains_and_reports_cost(tmp_path) -> None:
    train, val = make_data()
    before = evaluate(make_model(), val)["loss"]
    res = fit(make_model(), train, val, mpq_config(), fit_config(tmp_path).replace(search_steps=15,
                                                                                  finetune_steps=15))
    assert res.metrics["val_loss"] < before
    assert res.metrics["avg_weight_bits"] == 4.0 and res.plan.avg_weight_bits() == 4.0
    assert set(res.metrics["layers"]) == {"conv", "fc"}
    assert res.search_seconds > 0 and res.finetune_seconds > 0


def test_bit_parameters_get_their_own_learning_rate(tmp_path) -> None:
    train, val = make_data()
    cfg = fit_config(tmp_path, bit_lr=0.5, quantizer_lr_mult=0.1, weight_decay=1e-4)
    fit(make_model(), train, val, mpq_config("sdq"), cfg, stop_at_step=1)
    groups = load_checkpoint(tmp_path)["optimizer"]["param_groups"]
    assert [g["initial_lr"] for g in groups] == [0.01, pytest.approx(0.001), 0.5]
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0, 0.0]
    model = mpq_plugin.quantize_(make_model(), mpq_config("sdq"), example_inputs=(torch.zeros(2, 1, 8, 8),))
    n_bits = sum(len(m.bit_parameters()) for m in model.modules() if hasattr(m, "bit_parameters"))
    assert len(groups[2]["params"]) == n_bits > 0


def test_interrupt_inside_a_step_saves_nothing(tmp_path) -> None:
    """A KeyboardInterrupt that stops a step midway must not overwrite the last good checkpoint."""
    train, val = make_data()
    calls = {"n": 0}

    def loss_raising_at_step_5(out, y):
        calls["n"] += 1
        if calls["n"] == 1 + 5:
            raise KeyboardInterrupt
        return F.cross_entropy(out, y)

    with pytest.raises(KeyboardInterrupt):
        fit(make_model(), train, val, mpq_config(), fit_config(tmp_path, checkpoint_every=2),
            loss_fn=loss_raising_at_step_5)
    assert load_checkpoint(tmp_path)["step"] == 4
    full = fit(make_model(), train, val, mpq_config(), fit_config(tmp_path / "a"))
    res = fit(make_model(), train, val, mpq_config(), fit_config(tmp_path, checkpoint_every=2), resume=True)
    assert res.losses == full.losses


def test_make_adam_is_fused_on_cpu_and_matches_the_default_adam():
    from mpq_plugin.search.trainer import make_adam

    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(33, 7)), torch.nn.Parameter(torch.randn(5))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    start = [p.detach().clone() for p in a]
    fused = make_adam([{"params": a[:1], "lr": 1e-2}, {"params": a[1:], "lr": 1e-3}], lr=1e-2, weight_decay=0.1)
    plain = torch.optim.Adam([{"params": b[:1], "lr": 1e-2}, {"params": b[1:], "lr": 1e-3}], lr=1e-2,
                             weight_decay=0.1, foreach=True)
    assert fused.defaults["fused"] is True and plain.defaults["fused"] is not True
    for _ in range(5):
        g = [torch.randn_like(p) for p in a]
        for ps, opt in ((a, fused), (b, plain)):
            for p, gi in zip(ps, g):
                p.grad = gi.clone()
            opt.step()
    for p, q, p0 in zip(a, b, start):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert (p - p0).abs().min() > 0  # every element moved


def test_make_adam_falls_back_where_fused_is_not_supported():
    from mpq_plugin.search.trainer import make_adam

    meta = torch.nn.Parameter(torch.zeros(3, device="meta"))
    assert make_adam([meta], lr=1e-3).defaults["fused"] is None
