"""Resumable task runs for ``mpq results --resume``: one (budget, seed) at a time, saved after each.

A full ``mpq results`` run takes most of an hour; an interruption (or a machine that is taken
away) must not lose the pairs already measured. With ``--resume`` a task's JSON is the record:
pairs listed in its ``config["done"]`` are skipped, each new pair runs in its own call of the task
function and is merged into the file at once (atomic write), so a rerun picks up where the last
one stopped. Rows are keyed by ``(method, budget, seed)``; a rerun of a pair replaces its rows.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from mpq_plugin.experiments.common import ResultRow, load_task_json, save_task_json

log = logging.getLogger(__name__)

Pair = Tuple[float, int]
#: config keys that must agree between a stored file and a resumed run
_SAME = ("quick", "settings")


def _key(r: ResultRow) -> Tuple[str, Optional[float], int]:
    return r.method, r.budget_bits, r.seed


def merge_rows(old: Sequence[ResultRow], new: Sequence[ResultRow]) -> List[ResultRow]:
    """``old`` with every row that ``new`` measures again replaced, then the rest of ``new``
    (one ``float`` row per seed: a later call's float row replaces the earlier one)."""
    fresh = {_key(r) for r in new}
    return [r for r in old if _key(r) not in fresh] + list(new)


def pending(done: Sequence[Sequence[float]], budgets: Sequence[float], seeds: Sequence[int]) -> List[Pair]:
    """The (budget, seed) pairs still to run, seed-major (a seed's float model is reused in-process)."""
    have = {(float(b), int(s)) for b, s in done}
    return [(float(b), int(s)) for s in seeds for b in budgets if (float(b), int(s)) not in have]


def load_for_resume(path: Path, config: Dict[str, Any]) -> Tuple[List[ResultRow], List[List[float]], float]:
    """Rows, done pairs and wall seconds of a stored task file, or empty ones when there is none.

    Raises:
        ValueError: the file was made with other settings (quick mode or step counts); mixing
            them would put incomparable rows in one table.
    """
    if not path.exists():
        return [], [], 0.0
    data = load_task_json(path)
    stored = data["config"]
    for k in _SAME:
        if k in stored and k in config and stored[k] != config[k]:
            raise ValueError(f"{path} was made with {k}={stored[k]!r}, this run uses {config[k]!r}: "
                             "move the file away or run without --resume")
    done = [list(p) for p in stored.get("done", [])]
    if not done and data["rows"]:  # a file from a run without --resume: every listed pair is done
        done = sorted({(r.budget_bits, r.seed) for r in data["rows"] if r.budget_bits is not None})
        done = [list(p) for p in done]
    return list(data["rows"]), done, float(data.get("wall_s") or 0.0)


def with_done(config: Dict[str, Any], done: Sequence[Sequence[float]], budgets: Sequence[float],
              seeds: Sequence[int]) -> Dict[str, Any]:
    """``config`` plus the bookkeeping of a resumable task file: ``budgets``/``seeds`` (the union of
    the asked and the measured ones), ``done`` (the measured pairs) and ``complete`` (every asked
    pair measured)."""
    return {**config, "budgets": sorted({float(b) for b in budgets} | {float(b) for b, _ in done}),
            "seeds": sorted({int(s) for s in seeds} | {int(s) for _, s in done}),
            "done": [list(p) for p in done], "complete": not pending(done, budgets, seeds)}


def run_resumable(task: str, run: Callable[..., List[ResultRow]], path: Path, budgets: Sequence[float],
                  seeds: Sequence[int], quick: bool, config: Dict[str, Any], env: Dict[str, Any]) -> Path:
    """Run the pairs of ``budgets x seeds`` that ``path`` does not hold yet, saving after each.

    ``run(budgets=[b], seeds=[s], quick=quick, methods=None)`` is the task function. The file's
    ``config["budgets"]``/``["seeds"]`` become the union of the stored and the asked ones, ``done``
    the pairs measured, ``complete`` whether every asked pair is done, ``wall_s`` the summed wall time.
    """
    rows, done, wall = load_for_resume(path, config)
    todo = pending(done, budgets, seeds)
    log.info("%s: %d pair(s) stored, %d to run", task, len(done), len(todo))
    for b, s in todo:
        t0 = time.perf_counter()
        rows = merge_rows(rows, run(budgets=[b], seeds=[s], quick=quick, methods=None))
        wall += time.perf_counter() - t0
        done.append([b, s])
        save_task_json(path, task, rows, with_done(config, done, budgets, seeds), wall, env=env)
        log.info("%s: budget %g seed %d saved (%.1f min)", task, b, s, (time.perf_counter() - t0) / 60)
    return path
