"""``mpq results --resume``: pairs already stored are skipped, each new pair is saved at once,
an interrupted run continues where it stopped, and files of other settings are refused."""
from __future__ import annotations

from typing import List, Optional, Sequence

import pytest

from mpq_plugin import cli
from mpq_plugin.experiments import TASKS
from mpq_plugin.experiments.common import ResultRow, load_task_json, save_task_json
from mpq_plugin.experiments.resume import merge_rows, pending, run_resumable

CALLS: List[tuple] = []
FAIL_AT: List[tuple] = []


def fake_task(budgets: Sequence[float], seeds: Sequence[int], quick: bool = False,
              methods: Optional[Sequence[str]] = None) -> List[ResultRow]:
    """A stand-in task: one float row per seed and one sdq row per (budget, seed); value = b + s/10."""
    rows = []
    for s in seeds:
        rows.append(ResultRow("fake", "float", None, s, "accuracy", 1.0, 32.0, 10.0))
        for b in budgets:
            if (b, s) in FAIL_AT:
                raise KeyboardInterrupt  # the machine goes away mid-run
            CALLS.append((b, s))
            rows.append(ResultRow("fake", "sdq", b, s, "accuracy", b + s / 10, b, b * 10 / 32))
    return rows


def settings(quick: bool = False) -> dict:
    return {"steps": 3 if quick else 30}


@pytest.fixture(autouse=True)
def _fake(monkeypatch: pytest.MonkeyPatch) -> None:
    CALLS.clear()
    FAIL_AT.clear()
    monkeypatch.setitem(TASKS, "fake", f"{__name__}:fake_task")


def test_pending_and_merge() -> None:
    assert pending([[4, 0]], [2.0, 4.0], [0, 1]) == [(2.0, 0), (2.0, 1), (4.0, 1)]
    old = fake_task([4.0], [0])
    new = [ResultRow("fake", "sdq", 4.0, 0, "accuracy", 0.5, 4.0, 1.0)] + fake_task([2.0], [0])
    merged = merge_rows(old, new)
    assert [(r.method, r.budget_bits, r.value) for r in merged] == [
        ("sdq", 4.0, 0.5), ("float", None, 1.0), ("sdq", 2.0, 2.0)]


def test_resume_skips_done_pairs_and_saves_each(tmp_path) -> None:
    path = tmp_path / "results" / "fake.json"
    FAIL_AT.append((3.0, 1))
    with pytest.raises(KeyboardInterrupt):
        run_resumable("fake", fake_task, path, [2.0, 3.0], [0, 1], False, {"quick": False}, {})
    stored = load_task_json(path)
    assert stored["config"]["done"] == [[2.0, 0], [3.0, 0], [2.0, 1]]  # saved before the interruption
    assert stored["config"]["complete"] is False
    FAIL_AT.clear()
    CALLS.clear()
    run_resumable("fake", fake_task, path, [2.0, 3.0], [0, 1], False, {"quick": False}, {})
    assert CALLS == [(3.0, 1)]  # only the missing pair ran
    data = load_task_json(path)
    assert data["config"]["complete"] is True
    keys = sorted((r.method, r.budget_bits or 0.0, r.seed) for r in data["rows"])
    assert keys == sorted([("float", 0.0, 0), ("float", 0.0, 1)] +
                          [("sdq", b, s) for b in (2.0, 3.0) for s in (0, 1)])


def test_resume_of_a_plain_file_treats_its_pairs_as_done(tmp_path) -> None:
    path = tmp_path / "fake.json"
    save_task_json(path, "fake", fake_task([4.0], [0]), {"quick": False, "budgets": [4.0], "seeds": [0]}, 1.0)
    run_resumable("fake", fake_task, path, [3.0, 4.0], [0], False, {"quick": False}, {})
    assert CALLS == [(4.0, 0), (3.0, 0)]  # the first from building the stored file, then only 3 bits
    data = load_task_json(path)
    assert data["config"]["budgets"] == [3.0, 4.0] and data["wall_s"] > 1.0


def test_resume_refuses_other_settings(tmp_path) -> None:
    path = tmp_path / "fake.json"
    save_task_json(path, "fake", fake_task([4.0], [0]), {"quick": True, "done": [[4.0, 0]]}, 1.0)
    with pytest.raises(ValueError, match="quick=True.*without --resume"):
        run_resumable("fake", fake_task, path, [3.0], [0], False, {"quick": False}, {})


def test_cli_resume_runs_only_missing_pairs(tmp_path) -> None:
    argv = ["results", "--tasks", "fake", "--out", str(tmp_path), "--budget", "2", "3", "--seeds", "1",
            "--resume", "--no-report"]
    assert cli.main(argv) == 0
    assert CALLS == [(2.0, 0), (3.0, 0)]
    CALLS.clear()
    assert cli.main(argv[:7] + ["4", *argv[8:]]) == 0  # budgets 2 4: only 4 is new
    assert CALLS == [(4.0, 0)]
    data = load_task_json(tmp_path / "results" / "fake.json")
    assert data["config"]["settings"] == {"steps": 30}
    assert sorted(r.budget_bits for r in data["rows"] if r.method == "sdq") == [2.0, 3.0, 4.0]


def test_cli_default_seeds_come_per_task(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mpq_plugin.experiments import DEFAULT_SEEDS

    assert set(DEFAULT_SEEDS.values()) == {3} and set(DEFAULT_SEEDS) == set(TASKS) - {"fake"}
    argv = ["results", "--tasks", "fake", "--out", str(tmp_path), "--budget", "2", "--no-report"]
    assert cli.main(argv) == 0
    assert CALLS == [(2.0, 0), (2.0, 1), (2.0, 2)]  # a task not listed: 3 seeds
    CALLS.clear()
    monkeypatch.setitem(DEFAULT_SEEDS, "fake", 1)
    assert cli.main(argv) == 0
    assert CALLS == [(2.0, 0)]
