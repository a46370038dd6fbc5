"""``mpq results --jobs N``: every (task, seed) in its own process, longest first, one writer.

A task's seeds are independent runs, so they are the unit of work: with whole tasks as units, two
long MiniLM tasks and two short vision tasks leave one core idle for most of the last half hour.
Units are started longest first (the classic LPT rule: the makespan is within 4/3 of the best).
Each child writes its own part file (``OUT/results/.parts/<task>-seed<S>/results/<task>.json``,
saved after every (budget, seed) pair, so ``--resume`` continues an interrupted unit), and only
this process merges finished parts into ``OUT/results/<task>.json``, so no two processes ever
write one file.
"""
from __future__ import annotations

import logging
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

from mpq_plugin.experiments.common import load_task_json, save_task_json
from mpq_plugin.experiments.resume import load_for_resume, merge_rows, pending, with_done

log = logging.getLogger("mpq_plugin.cli")  # the progress lines of `mpq results`, as in runner.py

Unit = Tuple[str, int]  # (task, seed)

#: wall minutes of one seed of each task (budgets 2/3/4, all methods, one thread, two jobs on 2
#: cores; measured by ``make results`` on 2026-12-07); used only to start the longest units first
SEED_MINUTES: Dict[str, float] = {"minilm-sentiment": 12.0, "minilm-fidelity": 11.2, "mnist5k-cnn": 5.7,
                                  "mtcnn-faces": 2.0}


def plan_units(seeds_of: Dict[str, Sequence[int]]) -> List[Unit]:
    """All (task, seed) units, longest task first (unknown tasks count as the longest)."""
    longest = max(SEED_MINUTES.values())
    units = [(t, int(s)) for t, seeds in seeds_of.items() for s in seeds]
    return sorted(units, key=lambda u: (-SEED_MINUTES.get(u[0], longest), u[1], u[0]))


def part_dir(out: Path, task: str, seed: int) -> Path:
    """Where the child running ``(task, seed)`` writes (its ``--out``)."""
    return Path(out) / "results" / ".parts" / f"{task}-seed{seed}"


def merge_part(dest: Path, part: Path, budgets: Sequence[float], seeds: Sequence[int], fresh: bool) -> Path:
    """Merge a child's task file ``part`` into ``dest``: its rows replace the same (method, budget,
    seed) rows, ``done`` and the budget/seed lists become unions, ``wall_s`` the sum of the units'.

    ``fresh``: start from nothing instead of ``dest`` (the first unit of a run without ``--resume``).
    ``complete`` says whether every pair of ``budgets x seeds`` is done.
    """
    new = load_task_json(part)
    rows, done, wall = ([], [], 0.0) if fresh else load_for_resume(dest, new["config"])
    pairs = {(float(b), int(s)) for b, s in [*done, *new["config"].get("done", [])]}
    return save_task_json(dest, new["task"], merge_rows(rows, new["rows"]),
                          with_done(new["config"], sorted(pairs), budgets, seeds),
                          wall + float(new["wall_s"] or 0.0), env=new["env"])


def unit_done(dest: Path, budgets: Sequence[float], seed: int) -> bool:
    """Whether ``dest`` already holds every budget of ``seed`` (``--resume`` skips the unit)."""
    if not dest.exists():
        return False
    stored = load_task_json(dest)["config"].get("done", [])
    return not pending(stored, budgets, [seed])


def run_units(units: Sequence[Unit], command: Callable[[str, int, Path], List[str]], out: Path,
              budgets: Sequence[float], seeds_of: Dict[str, Sequence[int]], jobs: int, resume: bool) -> List[str]:
    """Run ``command(task, seed, part_out)`` for each unit, ``jobs`` at a time, merging each finished
    unit into ``OUT/results/<task>.json`` at once; returns the tasks that had a failed unit.

    Without ``resume`` stale parts are removed first and each task's file is rebuilt from this
    run's units; with ``resume`` units already in the task file are skipped and a part left by an
    interrupted run is continued.
    """
    todo: List[Unit] = []
    for task, seed in units:
        dest = out / "results" / f"{task}.json"
        if resume and unit_done(dest, budgets, seed):
            log.info("%s seed %d: already in %s", task, seed, dest)
            continue
        if not resume:
            shutil.rmtree(part_dir(out, task, seed), ignore_errors=True)
        todo.append((task, seed))
    fresh = {task: not resume for task, _ in todo}
    running: List[Tuple[Unit, subprocess.Popen, float]] = []  # type: ignore[type-arg]
    failed: List[str] = []
    while todo or running:
        while todo and len(running) < jobs:
            task, seed = todo.pop(0)
            log.info("%s seed %d: started in its own process", task, seed)
            running.append(((task, seed), subprocess.Popen(command(task, seed, part_dir(out, task, seed))),
                            time.perf_counter()))
        time.sleep(0.5)
        for item in list(running):
            (task, seed), proc, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            part = part_dir(out, task, seed) / "results" / f"{task}.json"
            if proc.returncode != 0 or not part.exists():
                log.error("%s seed %d failed (exit code %s); its part stays in %s", task, seed, proc.returncode,
                          part.parent.parent)
                failed.append(task)
                continue
            merge_part(out / "results" / f"{task}.json", part, budgets, seeds_of[task], fresh[task])
            fresh[task] = False
            shutil.rmtree(part_dir(out, task, seed), ignore_errors=True)
            log.info("%s seed %d: done in %.1f min, merged", task, seed, (time.perf_counter() - t0) / 60)
    parts = out / "results" / ".parts"
    if parts.is_dir() and not any(parts.iterdir()):
        parts.rmdir()
    return sorted(set(failed))
