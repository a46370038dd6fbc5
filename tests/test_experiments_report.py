"""docs/results.md from synthetic result rows: cells, mean/spread math, missing tasks, plots, JSON round trip."""
import math
import statistics

import pytest

from mpq_plugin.experiments.common import ResultRow, load_task_json, save_task_json
from mpq_plugin.experiments.report import (READING, build_report, format_cell, headline, mean_spread, summarize,
                                           task_table)

TASK = "mnist5k-cnn"


def _rows(task=TASK, metric="accuracy"):
    rows = [ResultRow(task, "float", None, s, metric, 0.95, 32.0, 24.0, total_s=3.0, extra={"val_loss": 0.2})
            for s in range(3)]
    vals = {"sdq": {2.0: [0.80, 0.84, 0.82], 3.0: [0.90, 0.92, 0.94]},
            "lsq": {2.0: [0.70, 0.71, 0.72], 3.0: [0.91, 0.91, 0.91]},
            "rtn": {2.0: [0.10, 0.10, 0.10], 3.0: [0.30, 0.30, 0.30]}}
    for m, by_b in vals.items():
        for b, vs in by_b.items():
            for s, v in enumerate(vs):
                rows.append(ResultRow(task, m, b, s, metric, v, b - 0.01 * s, b * 2.0, search_s=1.0 + s,
                                      total_s=2.0 + s, plan={"conv": int(b) + 1, "fc": int(b) - 1},
                                      extra={"val_loss": 1.0 - v}))
    return rows


def test_mean_spread_is_sample_std_and_ignores_nan():
    vals = [0.9, 0.92, 0.97]
    m, s = mean_spread(vals + [float("nan")])
    assert m == pytest.approx(statistics.mean(vals))
    assert s == pytest.approx(statistics.stdev(vals))
    assert mean_spread([0.5]) == (0.5, 0.0)
    assert all(math.isnan(x) for x in mean_spread([]))


def test_summarize_and_cells():
    rows = _rows()
    rows.append(ResultRow(TASK, "sdq", 3.0, 3, "accuracy", float("nan"), float("nan"), float("nan"),
                          extra={"error": "missed the budget"}))
    cells = summarize(rows)
    c = cells[("sdq", 3.0)]
    assert (c.n, c.failed) == (3, 1)
    assert c.mean == pytest.approx(0.92) and c.spread == pytest.approx(0.02)
    assert c.bits == pytest.approx(2.99) and c.search_s == pytest.approx(2.0)
    assert format_cell(c, "accuracy") == "92.0 ± 2.0 (2.99) [1 failed]"
    assert format_cell(cells[("lsq", 3.0)], "cosine") == "0.910 ± 0.000 (2.99)"


def test_table_and_headline():
    rows = _rows()
    table = task_table(rows)
    lines = table.strip().splitlines()
    assert lines[0] == "| method | 2 bits | 3 bits | search s | total s |"
    sdq = next(l for l in lines if l.startswith("| sdq "))
    assert "82.0 ± 2.0 (1.99)" in sdq and "92.0 ± 2.0 (2.99)" in sdq
    assert [l.split("|")[1].strip() for l in lines[2:5]] == ["sdq", "lsq", "rtn"]  # METHODS order
    assert "float (32 bit, 24.0 KB)" in lines[-1] and "95.0 ± 0.0" in lines[-1]
    h = headline(TASK, rows)
    assert len(h) == 2
    assert "2 bits" in h[0] and "`sdq` 82.0" in h[0] and "`lsq` 71.0" in h[0] and "wins" in h[0]
    assert "3 bits" in h[1] and "ties" in h[1] and "RTN PTQ 30.0" in h[1]
    assert "held-out loss: `sdq` 0.0800 vs `lsq` 0.0900" in h[1]  # a tie names the lower loss
    one_seed = [r for r in rows if r.seed == rows[0].seed or r.method == "float"]
    h1 = headline(TASK, one_seed)
    assert any("one seed: no spread, not a verdict" in line for line in h1)
    assert not any("wins" in line or "loses" in line for line in h1)


def test_json_round_trip_and_task_mismatch(tmp_path):
    rows = _rows()
    p = save_task_json(tmp_path / "r" / f"{TASK}.json", TASK, rows, {"quick": True}, 12.5)
    data = load_task_json(p)
    assert data["rows"] == rows and data["wall_s"] == 12.5 and data["config"] == {"quick": True}
    assert "torch" in data["env"] and "threads" in data["env"]
    with pytest.raises(ValueError, match="one file per task"):
        save_task_json(tmp_path / "x.json", "other", rows, {}, 1.0)
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a task result"):
        load_task_json(tmp_path / "bad.json")


def test_build_report_with_missing_tasks_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    rdir = tmp_path / "results"
    save_task_json(rdir / f"{TASK}.json", TASK, _rows(), {"quick": False}, 600.0)
    frows = _rows("minilm-fidelity", "cosine")
    save_task_json(rdir / "minilm-fidelity.json", "minilm-fidelity", frows, {}, 60.0)
    (rdir / "junk.json").write_text("{}")  # skipped with a warning, not fatal
    (rdir / READING).write_text("Hand-written reading: SDQ wins at 2 bits.\n")
    md = build_report(tmp_path).read_text()
    assert "## mnist5k-cnn" in md and "## minilm-fidelity" in md
    assert md.index("## mnist5k-cnn") < md.index("## minilm-fidelity")  # TASKS order
    assert "Missing tasks" in md and "mtcnn-faces" in md and "minilm-sentiment" in md
    assert "0.820 ± 0.020 (1.99)" in md  # cosine is not shown as a percentage
    assert "Hand-written reading: SDQ wins at 2 bits." in md
    assert "wall time 10.0 min" in md
    for name in (f"{TASK}_pareto.png", f"{TASK}_bits.png", "minilm-fidelity_pareto.png"):
        png = rdir / name
        assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
        assert f"results/{name}" in md


def test_build_report_empty(tmp_path):
    md = build_report(tmp_path, plots=False).read_text()
    assert "Missing tasks" in md and "No written reading yet" in md


def test_single_seed_shows_no_spread():
    rows = [r for r in _rows() if r.seed == 0]
    c = summarize(rows)[("sdq", 3.0)]
    assert format_cell(c, "accuracy") == "90.0 ± – (3.00)"
    assert "95.0 ± –" in task_table(rows)
