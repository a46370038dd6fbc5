"""``mpq results --jobs N``: (task, seed) units in their own processes, longest first, merged by one
writer; failed units are reported and keep their part; ``--resume`` skips merged units."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List

import pytest

from mpq_plugin import cli
from mpq_plugin.experiments import TASKS
from mpq_plugin.experiments.common import ResultRow, load_task_json, save_task_json
from mpq_plugin.experiments.parallel import SEED_MINUTES, merge_part, part_dir, plan_units, run_units, unit_done

from tests.test_experiments_resume import CALLS, fake_task  # noqa: F401 - the fake task of the resume tests

#: a child process: writes the part file of one (task, seed) unit as ``mpq results`` would, or fails
CHILD = """
import sys
from mpq_plugin.experiments.common import ResultRow, save_task_json
task, seed, out, budgets, fail = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5] == "1"
if fail:
    sys.exit(3)
budgets = [float(b) for b in budgets.split(",")]
rows = [ResultRow(task, "float", None, seed, "accuracy", 1.0, 32.0, 10.0)]
rows += [ResultRow(task, "sdq", b, seed, "accuracy", b + seed / 10, b, b) for b in budgets]
save_task_json(f"{out}/results/{task}.json", task, rows,
               {"quick": False, "settings": {"steps": 30}, "done": [[b, seed] for b in budgets]}, 2.0, env={})
"""


def child_command(fail: List[tuple]):
    def command(task: str, seed: int, part_out: Path) -> List[str]:
        return [sys.executable, "-c", CHILD, task, str(seed), str(part_out), "2,3", "1" if (task, seed) in fail else "0"]
    return command


def test_plan_units_runs_the_longest_tasks_first() -> None:
    units = plan_units({"mtcnn-faces": [0, 1], "minilm-sentiment": [0, 1], "unknown-task": [0]})
    assert SEED_MINUTES["minilm-sentiment"] > SEED_MINUTES["mtcnn-faces"]
    assert units == [("minilm-sentiment", 0), ("unknown-task", 0), ("minilm-sentiment", 1),
                     ("mtcnn-faces", 0), ("mtcnn-faces", 1)]


def test_merge_part_unions_units_and_replaces_remeasured_rows(tmp_path) -> None:
    dest, part = tmp_path / "t.json", tmp_path / "part.json"
    cfg = {"quick": False, "settings": {"steps": 30}}
    save_task_json(part, "t", [ResultRow("t", "sdq", 2.0, 0, "accuracy", 0.5, 2.0, 1.0)],
                   {**cfg, "done": [[2.0, 0]]}, 5.0, env={})
    merge_part(dest, part, [2.0], [0, 1], fresh=True)
    save_task_json(part, "t", [ResultRow("t", "sdq", 2.0, 1, "accuracy", 0.7, 2.0, 1.0)],
                   {**cfg, "done": [[2.0, 1]]}, 7.0, env={})
    merge_part(dest, part, [2.0], [0, 1], fresh=False)
    data = load_task_json(dest)
    assert sorted((r.seed, r.value) for r in data["rows"]) == [(0, 0.5), (1, 0.7)]
    assert data["config"]["done"] == [[2.0, 0], [2.0, 1]] and data["config"]["complete"] is True
    assert data["config"]["seeds"] == [0, 1] and data["wall_s"] == 12.0
    assert unit_done(dest, [2.0], 1) and not unit_done(dest, [2.0, 3.0], 1)
    merge_part(dest, part, [2.0], [0, 1], fresh=True)  # a fresh run forgets the old file
    assert [r.seed for r in load_task_json(dest)["rows"]] == [1]
    assert load_task_json(dest)["config"]["complete"] is False


def test_run_units_merges_each_unit_and_reports_failures(tmp_path) -> None:
    stale = part_dir(tmp_path, "b", 0) / "results" / "b.json"
    stale.parent.mkdir(parents=True)
    stale.write_text("{}")  # a part left by an older run: removed, not merged
    units = [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    failed = run_units(units, child_command([("b", 1)]), tmp_path, [2.0, 3.0], {"a": [0, 1], "b": [0, 1]},
                       jobs=2, resume=False)
    assert failed == ["b"]
    a = load_task_json(tmp_path / "results" / "a.json")
    assert a["config"]["complete"] is True and len(a["rows"]) == 6
    b = load_task_json(tmp_path / "results" / "b.json")
    assert b["config"]["complete"] is False and {r.seed for r in b["rows"]} == {0}
    assert not part_dir(tmp_path, "a", 0).exists()  # merged parts are removed

    # --resume: only the failed unit runs again
    log = tmp_path / "started.txt"

    def logged(task: str, seed: int, part_out: Path) -> List[str]:
        with log.open("a") as f:
            f.write(f"{task}{seed}\n")
        return child_command([])(task, seed, part_out)

    assert run_units(units, logged, tmp_path, [2.0, 3.0], {"a": [0, 1], "b": [0, 1]}, jobs=2, resume=True) == []
    assert log.read_text().split() == ["b1"]
    assert load_task_json(tmp_path / "results" / "b.json")["config"]["complete"] is True
    assert not (tmp_path / "results" / ".parts").exists()


def test_only_seed_runs_one_seed(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(TASKS, "fake", "tests.test_experiments_resume:fake_task")
    CALLS.clear()
    argv = ["results", "--tasks", "fake", "--out", str(tmp_path), "--budget", "2", "3", "--no-report"]
    assert cli.main(argv + ["--only-seed", "2"]) == 0
    assert CALLS == [(2.0, 2), (3.0, 2)]
    assert cli.main(argv + ["--only-seed", "-1"]) == 2


def test_vision_seeds_share_the_seed0_float_model() -> None:
    from mpq_plugin.experiments.vision import run_mnist

    rows = [r for s in (1, 0) for r in run_mnist(budgets=[3.0], seeds=[s], quick=True, methods=["float"])]
    assert [r.method for r in rows] == ["float", "float"]
    assert rows[0].value == rows[1].value and rows[0].value > 0.5  # trained once, with seed 0
    assert rows[0].total_s == rows[1].total_s > 0
    json.dumps([r.to_dict() for r in rows])
