"""Interleaved ratio timing shared by the step-level benchmarks (protocol: environment.md §4).

Every variant runs once per round, the order rotated each round, after warm-up rounds; the
result keeps per-variant min/median/max, the median of per-round ratios and the ratio of min
times against a reference variant, and the foreign CPU load during timing (system-wide busy
CPU minus this process's own, in cores; above ~0.2 the run is contaminated). The low-level
helpers are those of :mod:`benchmarks.kernels`.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch
try:
    from tqdm import tqdm
except ImportError:  # a bare GPU machine with torch and triton only: no progress bar
    def tqdm(it, **_):  # type: ignore[no-redef]
        return it

from benchmarks.kernels import _busy_jiffies as busy_jiffies
from benchmarks.kernels import _own_cpu as own_cpu
from benchmarks.kernels import _timed as timed

__all__ = ["busy_jiffies", "own_cpu", "timed", "run_interleaved"]


def run_interleaved(variants: Dict[str, Callable[[], object]], reference: str, rounds: int = 7,
                    warmup: int = 2, device: Optional[torch.device] = None, desc: str = "") -> dict:
    """Time ``variants`` in rotated interleaved rounds; ratios against ``variants[reference]``.

    Returns ``{"rounds", "warmup", "foreign_load_cores", "wall_s", "variants": {name: {"min_ms",
    "median_ms", "max_ms", "x_ref_median", "x_ref_min"}}}``.
    """
    device = device or torch.device("cpu")
    names = list(variants)
    times: Dict[str, List[float]] = {k: [] for k in names}
    hz = os.sysconf("SC_CLK_TCK")
    busy0, own0, wall0 = busy_jiffies(), own_cpu(), time.perf_counter()
    for r in tqdm(range(warmup + rounds), desc=desc or "rounds", leave=False):
        order = names[r % len(names):] + names[: r % len(names)]
        for k in order:
            t = timed(variants[k], device)
            if r >= warmup:
                times[k].append(t)
    wall = time.perf_counter() - wall0
    foreign = max(0.0, ((busy_jiffies() - busy0) / hz - (own_cpu() - own0)) / wall)
    rows = {}
    ref = times[reference]
    for k in names:
        rows[k] = {"min_ms": 1e3 * min(times[k]), "median_ms": 1e3 * statistics.median(times[k]),
                   "max_ms": 1e3 * max(times[k]),
                   "x_ref_median": statistics.median(a / b for a, b in zip(times[k], ref)),
                   "x_ref_min": min(times[k]) / min(ref)}
    return {"rounds": rounds, "warmup": warmup, "reference": reference, "foreign_load_cores": round(foreign, 3),
            "wall_s": round(wall, 1), "threads": torch.get_num_threads(), "variants": rows}
