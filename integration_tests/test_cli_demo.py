"""`mpq demo --quick` through the installed console script: the table, report.json and PNGs."""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mpq_plugin
from mpq_plugin.registry import get_method
from mpq_plugin.reporting import PLOTS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUICK_LIMIT_S = 120  # the bound for `mpq demo --quick` on 2 cores
# Asserted on the command's CPU time (it runs on one thread), which other jobs sharing the
# machine do not inflate the way they inflate wall time; the wall time is reported too.


def _mpq() -> str:
    exe = Path(sys.executable).parent / "mpq"
    if exe.is_file():
        return str(exe)
    found = shutil.which("mpq")
    if found is None:
        pytest.fail("the `mpq` console script is not installed: run `pip install -e .` in the repository")
    return found


def run_quick_demo(run_dir: Path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([_mpq(), "demo", "--quick", "--run-dir", str(run_dir)], capture_output=True,
                          text=True, env=env, timeout=600)
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.perf_counter() - t0
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir, proc.stdout, proc.stderr, (wall, cpu)


def test_quick_demo_end_to_end(tmp_path) -> None:
    """One test (one demo run, also under pytest-xdist): table, report.json, plots, `mpq report`."""
    demo = run_quick_demo(tmp_path)
    check_table(demo)
    check_report_fields(demo)
    check_plots_and_report_command(demo)
    check_export(demo)


def check_table(quick_demo) -> None:
    _, out, _, (wall, cpu) = quick_demo
    header = next(l for l in out.splitlines() if l.startswith("budget"))
    for col in ("method", "avg W bits", "weight KB", "act bits", "acc %", "float %", "vs LSQ", "vs HAWQ",
                "search s", "total s", "search/QAT"):
        assert col in header
    labels = {l.split()[1] for l in out.splitlines() if l.startswith("3b ")}
    searching = {m for m in mpq_plugin.list_methods() if get_method(m).quantizer_cls.searches_bits}
    assert searching <= labels, f"missing methods in the table: {searching - labels}"
    assert {"lsq-3b", "hawq", "rtn-3b"} <= labels
    assert cpu < QUICK_LIMIT_S, f"mpq demo --quick used {cpu:.0f}s of CPU ({wall:.0f}s wall; limit {QUICK_LIMIT_S}s)"


def check_report_fields(quick_demo) -> None:
    run_dir, _, _, _ = quick_demo
    report = json.loads((run_dir / "report.json").read_text())
    assert report["complete"] and report["kind"] == "demo" and report["data"]["name"] == "sklearn"
    assert 0.8 < report["float"]["accuracy"] <= 1.0
    rows = report["rows"]
    assert {r["kind"] for r in rows} == {"searched", "uniform", "hawq", "rtn"}
    for r in rows:
        assert r["budget"] == {"avg_weight_bits": 3.0}
        if r["error"]:
            assert r["kind"] == "searched", f"baseline {r['label']} failed: {r['error']}"
            continue
        for key in ("method", "achieved", "act_bits", "accuracy", "float_accuracy", "baselines", "layers",
                    "search_seconds", "finetune_seconds", "total_seconds"):
            assert key in r, (r["label"], key)
        assert r["achieved"]["avg_weight_bits"] <= 3.0 + 1e-6, r["label"]
        assert set(r["baselines"]) == {"lsq", "hawq", "rtn"}
        assert r["layers"]
        assert all({"weight_bits", "weight_kb", "weight_params"} <= set(l) for l in r["layers"].values())
        assert sum(l["weight_kb"] for l in r["layers"].values()) == pytest.approx(r["achieved"]["weight_kb"])
        if r["kind"] in ("searched", "uniform", "hawq"):
            assert r["search_seconds"] > 0 and r["finetune_seconds"] > 0
    searched = [r for r in rows if r["kind"] == "searched" and not r["error"]]
    assert searched, "every searched method failed"
    assert all(r["history"] and "avg_weight_bits" in r["history"][-1] for r in searched)
    lsq = next(r for r in rows if r["kind"] == "uniform")
    assert lsq["accuracy"] > 0.5 and lsq["achieved"]["avg_weight_bits"] == 3.0


def check_plots_and_report_command(quick_demo) -> None:
    run_dir, out, _, _ = quick_demo
    stamps = {}
    for name in PLOTS:
        data = (run_dir / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, name
        stamps[name] = (run_dir / name).stat().st_mtime_ns
        (run_dir / name).unlink()
    proc = subprocess.run([_mpq(), "report", str(run_dir)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    table = [l for l in out.splitlines() if l.startswith(("budget", "3b "))]
    assert [l for l in proc.stdout.splitlines() if l.startswith(("budget", "3b "))] == table
    for name in PLOTS:
        assert (run_dir / name).read_bytes()[:8] == PNG_MAGIC, f"{name} was not re-rendered"


def check_export(quick_demo) -> None:
    """The demo ends by exporting the best searched plan; every consumer agrees with PyTorch."""
    run_dir, out, _, _ = quick_demo
    report = json.loads((run_dir / "report.json").read_text())
    dep = report["deployable"]
    searched = [r for r in report["rows"] if r["kind"] == "searched" and not r["error"]]
    assert dep["source"] == max(searched, key=lambda r: r["accuracy"])["label"]
    assert dep["accuracy"] > 0.8 and dep["avg_weight_bits"] <= 3.0 + 1e-6
    assert "export of the best searched plan" in out
    summary = json.loads((run_dir / "export" / "export.json").read_text())
    f = summary["formats"]
    assert f["int"]["samples"] == 256
    assert sum(f["int"]["code_mismatch_samples"].values()) == 0 and f["int"]["argmax_agreement"] == 256
    assert f["qonnx"]["exact_samples"] == 256 and f["onnx"]["exact_samples"] == 256  # power-of-two scales
    widths = {r["layer"]: r["weight"] for r in f["int"]["width_table"]}
    source = next(r for r in searched if r["label"] == dep["source"])
    assert widths == {n: f"s{l['weight_bits']}" for n, l in source["layers"].items()}
    assert all(r["requant"] in ("shift", "float input") for r in f["int"]["width_table"])
    # `mpq export` redoes one format from the stored model, in another directory
    proc = subprocess.run([_mpq(), "export", str(run_dir), "--format", "qonnx", "--out", str(run_dir / "again")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "256/256 samples equal PyTorch exactly" in proc.stdout
    assert (run_dir / "again" / "model.qonnx.onnx").read_bytes() == (run_dir / "export" / "model.qonnx.onnx").read_bytes()


def test_ctrl_c_then_resume_matches_an_uninterrupted_run(tmp_path) -> None:
    """SIGINT to a running `mpq search` leaves checkpoints; `--resume` finishes with the same results."""
    import signal

    import yaml

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "examples/configs/demo_search.yaml").read_text())
    cfg["model"]["kwargs"] = {"num_classes": 10, "channels": [4, 8]}
    cfg["float_training"]["steps"] = 30
    cfg["training"].update(search_steps=150, finetune_steps=30, checkpoint_every=20)
    cfg["baselines"] = ["lsq"]

    def write(name: str) -> str:
        c = dict(cfg, run_dir=str(tmp_path / name))
        p = tmp_path / f"{name}.yaml"
        p.write_text(yaml.safe_dump(c))
        return str(p)

    full = subprocess.run([_mpq(), "search", "--config", write("full"), "--threads", "1"], capture_output=True,
                          text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]

    cfg_b = write("cut")
    ck = tmp_path / "cut" / "runs" / "sdq_avg_weight_bits3" / "checkpoint.pt"
    proc = subprocess.Popen([_mpq(), "search", "--config", cfg_b, "--threads", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not ck.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted; raise search_steps"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "--resume" in err and "checkpoint saved" in err
    resumed = subprocess.run([_mpq(), "search", "--config", cfg_b, "--threads", "1", "--resume"],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = json.loads((tmp_path / "full" / "report.json").read_text())
    b = json.loads((tmp_path / "cut" / "report.json").read_text())
    assert [(r["label"], r["accuracy"], r["achieved"]) for r in b["rows"]] == \
        [(r["label"], r["accuracy"], r["achieved"]) for r in a["rows"]]
