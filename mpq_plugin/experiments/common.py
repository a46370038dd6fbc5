"""The result row every task emits, and the method keys the tables and plots use."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

# key -> how the row was produced; "float" is the unquantized reference of the same task
METHODS: Dict[str, str] = {
    "float": "float model, no quantization",
    "sdq": "SDQ search + EBR/KD finetune",
    "learned_range": "learned range, U3 parametrization (d, q_max)",
    "learned_range-U1": "learned range, U1 parametrization (b, d)",
    "learned_range-U2": "learned range, U2 parametrization (b, q_max)",
    "csq": "CSQ bi-level continuous sparsification",
    "lsq": "uniform LSQ QAT at the largest uniform bit-width within the budget",
    "rtn": "round-to-nearest PTQ at the largest uniform bit-width within the budget",
    "hawq": "HAWQ-V3-style Hessian-trace ILP allocation, then LSQ QAT",
}


@dataclass
class ResultRow:
    """One (task, method, budget, seed) measurement.

    Attributes:
        task: a key of :data:`mpq_plugin.experiments.TASKS`.
        method: a key of :data:`METHODS`.
        budget_bits: the average-weight-bit budget (``None`` for ``float``).
        seed: the seed of data order and initialization.
        metric: what ``value`` measures (``accuracy``, ``cosine``, ``agreement``, ...); higher is better.
        value: the metric on the task's held-out set.
        avg_weight_bits / weight_kb: the achieved cost of the frozen model (32 / float KB for ``float``).
        search_s / total_s: wall seconds of the bit search and of the whole run (float training excluded).
        plan: ``{layer: weight_bits}`` of the frozen model, for per-layer charts (``None`` for ``float``).
        extra: anything task-specific (a second metric, act bits, step counts, errors).
    """

    task: str
    method: str
    budget_bits: Optional[float]
    seed: int
    metric: str
    value: float
    avg_weight_bits: float
    weight_kb: float
    search_s: float = 0.0
    total_s: float = 0.0
    plan: Optional[Dict[str, int]] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown result method {self.method!r}; use one of {sorted(METHODS)}")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ResultRow":
        return cls(**d)


def task_env(threads: Optional[int] = None) -> Dict[str, Any]:
    """Versions and thread count that a result file records (torch imported only here)."""
    import platform

    import torch

    return {"torch": torch.__version__, "threads": int(threads or torch.get_num_threads()),
            "python": platform.python_version()}


def save_task_json(path: Any, task: str, rows: List[ResultRow], config: Dict[str, Any], wall_s: float,
                   env: Optional[Dict[str, Any]] = None) -> Path:
    """Write ``{"task", "rows", "config", "wall_s", "env"}`` to ``path`` (parents created); returns the path.

    ``rows`` must all belong to ``task``: a mismatch raises ``ValueError`` naming the row.
    """
    bad = [r for r in rows if r.task != task]
    if bad:
        raise ValueError(f"row {bad[0].method}/{bad[0].budget_bits} has task {bad[0].task!r}, not {task!r}; "
                         "write one file per task")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    data = {"task": task, "rows": [r.to_dict() for r in rows], "config": dict(config), "wall_s": float(wall_s),
            "env": env if env is not None else task_env()}
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(p)
    return p


def load_task_json(path: Any) -> Dict[str, Any]:
    """Read a file written by :func:`save_task_json`; ``rows`` come back as :class:`ResultRow`.

    Raises:
        ValueError: the file is not a task result (missing ``task``/``rows``).
    """
    p = Path(path)
    data = json.loads(p.read_text())
    if not isinstance(data, dict) or "task" not in data or "rows" not in data:
        raise ValueError(f"{p} is not a task result file: it needs 'task' and 'rows' (see save_task_json)")
    data["rows"] = [ResultRow.from_dict(r) for r in data["rows"]]
    data.setdefault("config", {})
    data.setdefault("wall_s", None)
    data.setdefault("env", {})
    return data
