"""The `mpq` command: argument and config validation, `report`, `methods`, a tiny `search` run,
plus the report writer/plots and the shipped digits loaders."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import mpq_plugin
from mpq_plugin import cli
from mpq_plugin.datasets import load_digits_arrays, load_digits_loaders, stratified_split
from mpq_plugin.reporting import (
    PLOTS,
    downsample_history,
    format_table,
    read_report,
    render_report,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "configs" / "demo_search.yaml"


def tiny_config(tmp_path: Path, **changes) -> dict:
    cfg = yaml.safe_load(EXAMPLE.read_text())
    cfg["run_dir"] = str(tmp_path / "run")
    cfg["model"]["kwargs"] = {"num_classes": 10, "channels": [4, 8]}
    cfg["float_training"]["steps"] = 30
    cfg["training"].update(search_steps=6, finetune_steps=4, checkpoint_every=3)
    cfg["baselines"] = ["lsq", "rtn"]
    for k, v in changes.items():
        cfg[k] = v
    return cfg


def write_cfg(tmp_path: Path, cfg: dict) -> str:
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def run(args, capsys):
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


# -- config validation -------------------------------------------------------------------------------
def test_example_config_is_valid() -> None:
    exp = cli.experiment_from_config(yaml.safe_load(EXAMPLE.read_text()), source=str(EXAMPLE))
    (budget, configs), = exp.groups
    assert budget.avg_weight_bits == 3.0 and configs[0].method == "sdq"
    assert exp.fit_config.search_steps == 100 and exp.baselines == ("lsq", "hawq", "rtn")


@pytest.mark.parametrize("mutate,msg", [
    (lambda c: c.update(epochs=3), r"unknown key\(s\) \['epochs'\]; allowed: \['baselines', 'data'"),
    (lambda c: c["training"].update(learning_rate=0.1),
     r"training: unknown FitConfig key\(s\) \['learning_rate'\]; allowed: .*'lr'"),
    (lambda c: c["training"].update(lr="fast"), r"training: FitConfig.lr must be a number, got 'fast'"),
    (lambda c: c["training"].update(search_steps=2.5), r"search_steps must be an integer or null, got 2.5"),
    (lambda c: c["training"].update(seed=3), r"training.seed: set 'seed' at the top level"),
    (lambda c: c["quantization"].update(bits=4), r"quantization: unknown MPQConfig key\(s\) \['bits'\]"),
    (lambda c: c["quantization"].update(method="nope"), r"quantization: unknown method 'nope'; known methods: .*sdq"),
    (lambda c: c["quantization"].pop("budget"), r"quantization.budget is required"),
    (lambda c: c["quantization"].update(budget={"avg_weight_bits": 1.5}),
     r"below the minimum weight_bits=2; no bit assignment can meet it"),
    (lambda c: c["data"].update(batch_size="64"), r"data.batch_size must be an integer, got '64'"),
    (lambda c: c["data"].update(shuffle=True),
     r"data: unknown key\(s\) \['shuffle'\]; allowed: \['batch_size', 'kwargs', 'name', 'val_fraction'\]"),
    (lambda c: c["model"].update(name="vgg"),
     r"model.name \(built-in: \['small_cnn', 'resnet20', 'mobilenet_v2'\]\)='vgg'"),
    (lambda c: c.update(baselines=["lsq", "bsq"]), r"baselines: unknown \['bsq'\]; allowed: \['lsq', 'hawq', 'rtn'\]"),
    (lambda c: c.update(seed="0"), r"seed must be an integer, got '0'"),
    (lambda c: c["hawq"].update(candidates=[2, "4"]), r"hawq.candidates must be a list of integers"),
    (lambda c: c.pop("quantization"), r"the 'quantization' section is required"),
])
def test_bad_config_names_key_and_allowed_values(tmp_path, capsys, mutate, msg) -> None:
    cfg = tiny_config(tmp_path)
    mutate(cfg)
    code, _, err = run(["search", "--config", write_cfg(tmp_path, cfg)], capsys)
    assert code == 2
    assert err.startswith("mpq: error: ")
    import re

    assert re.search(msg, err), err


def test_config_file_problems(tmp_path, capsys) -> None:
    code, _, err = run(["search", "--config", str(tmp_path / "missing.yaml")], capsys)
    assert code == 2 and "does not exist" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    code, _, err = run(["search", "--config", str(bad)], capsys)
    assert code == 2 and "not valid YAML" in err
    bad.write_text("- a\n- b\n")
    code, _, err = run(["search", "--config", str(bad)], capsys)
    assert code == 2 and "must hold a mapping" in err


def empty_data(batch_size: int = 8):
    """A data factory for the config tests: loaders over no samples."""
    from torch.utils.data import DataLoader, TensorDataset

    ds = TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))
    return DataLoader(ds, batch_size=batch_size), DataLoader(ds, batch_size=batch_size)


@pytest.mark.parametrize("mutate,msg", [
    (lambda c: c.update(data={"name": "tests.test_cli:empty_data", "kwargs": {"batch_size": 4}}),
     r"the training data \(tests.test_cli:empty_data\) yields no batches"),
    (lambda c: c["model"].update(kwargs={"num_classes": 10, "in_channels": 3}),
     r"the model fails on the first training batch \(inputs of shape \(64, 1, 8, 8\)"),
    (lambda c: c["model"].update(kwargs={"num_classes": 4}),
     r"outputs of shape \(64, 4\).*targets of shape \(64,\)"),
    (lambda c: c["quantization"].update(budget={"weight_kb": 0.05}),
     r"budget weight_kb=0.05 is below the minimum achievable"),
])
def test_bad_data_model_or_budget_fail_before_training(tmp_path, capsys, mutate, msg) -> None:
    import re

    cfg = tiny_config(tmp_path)
    mutate(cfg)
    code, _, err = run(["search", "--config", write_cfg(tmp_path, cfg)], capsys)
    assert code == 2 and re.search(msg, err), err
    assert not (tmp_path / "run" / "float").exists(), "failed after training the float model"


def test_demo_budget_below_minimum_fails_before_training(tmp_path, capsys) -> None:
    code, _, err = run(["demo", "--quick", "--budget", "1.5", "--run-dir", str(tmp_path)], capsys)
    assert code == 2 and "below the minimum weight_bits=2" in err
    assert not (tmp_path / "report.json").exists()


@pytest.mark.parametrize("args", [["demo", "--budget", "0"], ["demo", "--budget", "x"],
                                  ["demo", "--methods", "nope"], ["demo", "--data", "cifar"], ["frobnicate"]])
def test_bad_arguments_exit_2(args, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(args)
    assert e.value.code == 2
    assert "usage: mpq" in capsys.readouterr().err


def test_methods_lists_every_registered_method(capsys) -> None:
    code, out, _ = run(["methods"], capsys)
    assert code == 0
    for m in mpq_plugin.list_methods():
        assert any(line.startswith(m + " ") for line in out.splitlines()), m
    assert "[fixed bits]" in out and "[searches bits]" in out


def test_interrupt_and_divergence_exit_codes(monkeypatch, tmp_path, capsys) -> None:
    from mpq_plugin.search.trainer import TrainingDiverged

    def interrupted(exp, plots=True):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_experiment", interrupted)
    code, _, err = run(["demo", "--quick", "--run-dir", str(tmp_path)], capsys)
    assert code == 130 and f"mpq demo --quick --run-dir {tmp_path} --resume" in err

    def diverged(exp, plots=True):
        raise TrainingDiverged("training diverged at step 3")

    monkeypatch.setattr(cli, "run_experiment", diverged)
    code, _, err = run(["demo", "--quick", "--run-dir", str(tmp_path)], capsys)
    assert code == 1 and "diverged at step 3" in err


# -- a tiny end-to-end search ------------------------------------------------------------------------------
def test_search_writes_report_plots_and_resumes(tmp_path, capsys) -> None:
    cfg_path = write_cfg(tmp_path, tiny_config(tmp_path))
    code, out, err = run(["search", "--config", cfg_path], capsys)
    assert code == 0, err
    run_dir = tmp_path / "run"
    report = read_report(run_dir)
    assert report["complete"] and report["kind"] == "search"
    assert [r["label"] for r in report["rows"]][0] == "sdq"
    kinds = {r["kind"] for r in report["rows"]}
    assert kinds == {"searched", "uniform", "rtn"}
    sdq = report["rows"][0]
    if sdq["error"] is None:
        assert set(sdq["layers"]) == {"features.0", "features.3", "fc"}
        assert sdq["achieved"]["avg_weight_bits"] <= 3.0 + 1e-9
        assert sdq["history"] and "bits/fc" in sdq["history"][0]
        assert sdq["search_seconds"] > 0 and sdq["finetune_seconds"] > 0
        assert sdq["baselines"]["lsq"] is not None and sdq["float_accuracy"] == report["float"]["accuracy"]
    for name in PLOTS:
        assert (run_dir / name).read_bytes()[:8] == PNG_MAGIC
    assert "avg W bits" in out and "lsq-3b" in out and "rtn-3b" in out
    assert (run_dir / "runs" / "sdq_avg_weight_bits3" / "checkpoint.pt").is_file()

    # --resume on a finished run reuses every saved result
    code, out2, _ = run(["search", "--config", cfg_path, "--resume"], capsys)
    assert code == 0
    again = read_report(run_dir)
    assert [r["accuracy"] for r in again["rows"]] == [r["accuracy"] for r in report["rows"]]
    assert again["float"]["train_seconds"] == 0.0, "the float model is reloaded, not retrained"


def test_report_command_rerenders(tmp_path, capsys) -> None:
    write_report(tmp_path, _fake_report())
    code, out, _ = run(["report", str(tmp_path)], capsys)
    assert code == 0
    assert "sdq" in out and "+1.0" in out and "failed: over budget" in out
    for name in PLOTS:
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    assert (tmp_path / "table.txt").read_text().strip() == out.strip()


def test_report_on_a_directory_without_report(tmp_path, capsys) -> None:
    code, _, err = run(["report", str(tmp_path)], capsys)
    assert code == 2 and "report.json does not exist" in err
    (tmp_path / "report.json").write_text("{broken")
    code, _, err = run(["report", str(tmp_path)], capsys)
    assert code == 2 and "not valid JSON" in err


# -- reporting ------------------------------------------------------------------------------------------------
def _fake_report() -> dict:
    hist = [{"step": float(i), "avg_weight_bits": 8 - i * 0.5, "bits/conv": 8 - i, "bits/fc": 8.0} for i in range(8)]
    layers = {"conv": {"weight_bits": 3, "act_bits": 8, "weight_params": 100, "weight_kb": 0.04},
              "fc": {"weight_bits": 4, "act_bits": 8, "weight_params": 50, "weight_kb": 0.02}}
    row = dict(budget={"avg_weight_bits": 3.0}, achieved={"avg_weight_bits": 3.33, "weight_kb": 0.06},
               act_bits=8, float_accuracy=0.9, layers=layers, search_seconds=1.0, total_seconds=2.0)
    return {"kind": "demo", "float": {"accuracy": 0.9, "weight_kb": 0.6}, "rows": [
        dict(row, label="sdq", method="sdq", kind="searched", accuracy=0.85, history=hist),
        dict(row, label="lsq-3b", method="lsq", kind="uniform", accuracy=0.84, history=[]),
        dict(row, label="hawq", method="lsq", kind="hawq", accuracy=0.86, history=[]),
        {"label": "csq", "method": "csq", "kind": "searched", "budget": {"avg_weight_bits": 3.0},
         "error": "over budget: avg_weight_bits 3.2 > 3", "layers": {}, "history": [], "achieved": {}},
    ]}


def test_format_table_deltas_and_errors() -> None:
    rep = _fake_report()
    table = format_table(rep)  # baselines are looked up from the rows at the same budget
    sdq = next(l for l in table.splitlines() if l.split()[1:2] == ["sdq"])
    cells = sdq.split()
    assert cells[5] == "85.00" and cells[6] == "90.00" and cells[7] == "+1.0" and cells[8] == "-1.0"
    assert "failed: over budget" in table
    assert "float model: accuracy 90.00%" in table


def test_write_report_is_json_with_non_finite_as_null(tmp_path) -> None:
    path = write_report(tmp_path, {"rows": [], "x": float("nan"), "t": torch.tensor(2.5), "n": np.int64(3)})
    data = json.loads(path.read_text())
    assert data["x"] is None and data["t"] == 2.5 and data["n"] == 3 and data["version"] == 1
    assert not list(tmp_path.glob(".*tmp"))


def test_downsample_history_keeps_last() -> None:
    h = [{"step": i} for i in range(1001)]
    d = downsample_history(h, 200)
    assert len(d) <= 201 and d[0]["step"] == 0 and d[-1]["step"] == 1000
    assert downsample_history(h[:5]) == h[:5]


def test_render_report_without_plots(tmp_path) -> None:
    write_report(tmp_path, _fake_report())
    table = render_report(tmp_path, plots=False)
    assert "sdq" in table and not (tmp_path / PLOTS[0]).exists()


# -- datasets ------------------------------------------------------------------------------------------------------
def test_sklearn_digits_loaders() -> None:
    train, val = load_digits_loaders(batch_size=32, seed=1)
    x, y = next(iter(train))
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    n_train, n_val = len(train.dataset), len(val.dataset)
    assert n_train + n_val == 1797 and abs(n_val - 0.2 * 1797) < 10
    xs = train.dataset.tensors[0]
    assert abs(float(xs.mean())) < 1e-4 and abs(float(xs.std()) - 1) < 1e-2  # standardized on train
    again = load_digits_loaders(batch_size=32, seed=1)[1].dataset.tensors[1]
    assert torch.equal(val.dataset.tensors[1], again), "split must be fixed by the seed"


def test_stratified_split_per_class() -> None:
    y = np.repeat(np.arange(4), [10, 20, 30, 40])
    tr, va = stratified_split(y, 0.25, seed=0)
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(100))
    assert np.bincount(y[va]).tolist() == [2, 5, 8, 10]  # round(0.25 * n_c); 2.5 -> 2 (banker's)
    with pytest.raises(ValueError, match="val_fraction"):
        stratified_split(y, 1.0, 0)


def test_mnist5k_arrays() -> None:
    x, y = load_digits_arrays("mnist5k")
    assert x.shape == (5000, 1, 28, 28) and x.max() <= 1.0 and np.bincount(y).tolist() == [500] * 10


def test_dataset_errors() -> None:
    with pytest.raises(ValueError, match=r"use one of \('sklearn', 'mnist5k'\)"):
        load_digits_arrays("cifar10")
    with pytest.raises(ValueError, match="batch_size"):
        load_digits_loaders(batch_size=0)


def test_demo_with_csq_only_and_no_baselines_runs(tmp_path) -> None:
    """A searched method's own options (CSQ's budget_ratio) must not leak into the LSQ config
    used to size the uniform baseline (regression)."""
    from mpq_plugin import cli

    code = cli.main(["demo", "--quick", "--methods", "csq", "--baselines", "--no-plots",
                     "--run-dir", str(tmp_path / "run")])
    assert code in (0, None)
    assert (tmp_path / "run" / "report.json").exists()
