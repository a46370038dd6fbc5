"""`mpq export RUN_DIR` and the deployable model a demo run stores: save/rebuild bit for bit,
every format checked by its consumer, the demo's choice of the best plan, bad input."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from mpq_plugin import cli
from mpq_plugin.experiments.runner import _Runner
from mpq_plugin.api import freeze
from mpq_plugin.config import Budget
from mpq_plugin.datasets import load_digits_loaders
from mpq_plugin.export import deploy
from mpq_plugin.models import SmallCNN
from mpq_plugin.search.trainer import FitConfig

KW = {"num_classes": 10, "channels": [4, 8]}
BITS = {"features.0": 5, "features.3": 3, "fc": 4}


def _trained_like(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics and biases, so BN folding and bias export matter."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.6 - 0.3)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = SmallCNN(**KW)
    _trained_like(model)
    x = torch.randn(48, 1, 8, 8)
    deploy.quantize_deployable_(model, deploy.deployable_config(BITS), x[:16])
    freeze(model)
    d = tmp_path_factory.mktemp("run")
    deploy.save_deployable(model, d, model_name="small_cnn", model_kwargs=KW, samples=x, info={"source": "unit"})
    with torch.no_grad():
        torch.save(model(x), d / "expected.pt")
    return d


def test_deployable_config_fixes_each_layer_and_is_exportable() -> None:
    cfg = deploy.deployable_config(BITS)
    assert cfg.method == "learned_range" and cfg.weight_bits == (3, 5) and cfg.act_bits == (8, 8)
    assert cfg.options["rounding"] == "half_even" and cfg.options["pow2_step"]
    m = SmallCNN(**KW)
    deploy.quantize_deployable_(m, cfg, torch.randn(4, 1, 8, 8))
    plan = freeze(m)
    assert {n: plan[n].weight_bits for n in plan} == BITS
    assert plan["features.0"].act_bits == 8  # the network input is quantized
    assert not any(isinstance(x, torch.nn.BatchNorm2d) and not hasattr(x, "weight_quantizer")
                   for x in m.features), "BN is folded into the conv"
    with pytest.raises(ValueError, match="plan"):
        deploy.deployable_config({})


def test_rebuilt_model_is_bit_identical(run_dir: Path) -> None:
    model, rec = deploy.load_deployable(run_dir)
    with torch.no_grad():
        y = model(rec["samples"])
    assert torch.equal(y, torch.load(run_dir / "expected.pt"))
    assert rec["info"] == {"source": "unit"} and json.loads(rec["plan"])["layers"]["fc"]["weight_bits"] == 4


def test_export_run_every_format_agrees_with_pytorch(run_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("qonnx")
    pytest.importorskip("onnxruntime")
    s = deploy.export_run(run_dir, out_dir=tmp_path, samples=16)
    i = s["formats"]["int"]
    assert i["samples"] == 16 and sum(i["code_mismatch_samples"].values()) == 0 and i["argmax_agreement"] == 16
    assert [r["layer"] for r in i["width_table"]] == list(BITS)
    assert [r["weight"] for r in i["width_table"]] == [f"s{b}" for b in BITS.values()]
    for f in ("qonnx", "onnx"):
        assert s["formats"][f]["exact_samples"] == 16, s["formats"][f]  # power-of-two scales: exact
    assert (tmp_path / "int_bundle" / "manifest.json").is_file()
    assert (tmp_path / "model.qonnx.onnx").is_file() and (tmp_path / "model.qdq.onnx").is_file()
    assert set(json.loads((tmp_path / "export.json").read_text())["formats"]) == {"int", "qonnx", "onnx"}


def test_cli_export_one_format(run_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "o"
    assert cli.main(["export", str(run_dir), "--format", "int", "--out", str(out), "--samples", "8"]) == 0
    text = capsys.readouterr().out
    assert "code mismatches 0" in text and "features.3" in text and "acc bits" in text
    assert (out / "int_bundle").is_dir() and not (out / "model.qonnx.onnx").exists()


@pytest.mark.parametrize("args, msg", [
    (["export", "{missing}"], "does not exist"),
    (["export", "{empty}"], "mpq demo"),
    (["export", "{run}", "--samples", "0"], "--samples"),
])
def test_cli_export_bad_input_exit_2(args, msg, run_dir: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    args = [a.format(missing=tmp_path / "nope", empty=tmp_path / "empty", run=run_dir) for a in args]
    assert cli.main(args) == 2
    assert msg in capsys.readouterr().err


def test_cli_export_unknown_format_is_an_argparse_error(run_dir: Path) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["export", str(run_dir), "--format", "tflite"])
    assert e.value.code == 2
    with pytest.raises(ValueError, match="unknown export format"):
        deploy.export_run(run_dir, ["tflite"])


def test_save_deployable_needs_a_quantized_model(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="quantize_deployable_"):
        deploy.save_deployable(SmallCNN(**KW), tmp_path, model_name="small_cnn", model_kwargs=KW,
                               samples=torch.zeros(1, 1, 8, 8))


def test_demo_runner_stores_the_best_searched_plan(tmp_path: Path) -> None:
    """The demo's last step re-trains the most accurate searched row's plan and stores it."""
    train, val = load_digits_loaders(batch_size=64, seed=0)
    torch.manual_seed(0)
    float_model = SmallCNN(**KW).eval()
    exp = cli.Experiment(kind="demo", run_dir=tmp_path, seed=0, model_name="small_cnn",
                         model_factory=lambda: SmallCNN(**KW), data_name="sklearn", data_factory=lambda: (train, val),
                         float_checkpoint=None, float_steps=1, float_lr=1e-2,
                         groups=[(Budget(avg_weight_bits=3.0), [])],
                         fit_config=FitConfig(search_steps=1, finetune_steps=3, kd=True, progress_bar=None),
                         model_kwargs=KW)
    runner = _Runner(exp)

    def row(label, acc, bits, kind="searched", error=None):
        return {"label": label, "kind": kind, "error": error, "accuracy": acc, "act_bits": 8,
                "layers": {n: {"weight_bits": b} for n, b in bits.items()}}

    runner.rows = [row("sdq", 0.5, {"features.0": 2, "features.3": 2, "fc": 2}),
                   row("csq", 0.9, BITS),
                   row("lsq-3b", 0.99, {"features.0": 3, "features.3": 3, "fc": 3}, kind="uniform"),
                   row("broken", None, {}, error="missed the budget")]
    runner.deployable(copy.deepcopy(float_model), train, val)
    model, rec = deploy.load_deployable(tmp_path)
    assert rec["info"]["source"] == "csq" and rec["info"]["finetune_steps"] == 3
    plan = json.loads(rec["plan"])["layers"]
    assert {n: v["weight_bits"] for n, v in plan.items()} == BITS
    assert runner.report["deployable"]["accuracy"] == rec["info"]["accuracy"]
    assert rec["samples"].shape[0] == min(256, len(val.dataset))
