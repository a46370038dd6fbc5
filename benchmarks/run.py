"""``make bench``: run every available benchmark in this one process, in order.

Kernel ratios go to ``benchmarks/results/kernels.{json,md}``, QAT-step ratios to
``qat_step.{json,md}``, packed-linear ratios to ``packed.{json,md}``; the SQNR table is printed.
``python -m benchmarks.run [names...] [--quick]``: a subset, and ``--quick`` (smaller batches,
weights and fewer rounds) for the QAT-step and packed benchmarks on a busy machine.
"""
from __future__ import annotations

import logging
import sys
from typing import Callable, Dict, List

from benchmarks import kernels, packed, qat_step, sqnr


def _benchmarks(quick: bool) -> Dict[str, Callable[[], object]]:
    extra = ["--quick"] if quick else []
    return {"kernels": lambda: kernels.main([]), "sqnr": sqnr.main,
            "qat_step": lambda: qat_step.main(extra), "packed": lambda: packed.main(extra)}


def main(argv: List[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = list(argv or [])
    quick = "--quick" in argv
    names = [a for a in argv if a != "--quick"]
    benchmarks = _benchmarks(quick)
    unknown = [n for n in names if n not in benchmarks]
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; choose from {list(benchmarks)}")
    failed = []
    for name in names or list(benchmarks):
        print(f"\n=== {name} ===", flush=True)
        try:
            benchmarks[name]()
        except Exception:  # one broken benchmark must not hide the others' figures
            logging.exception("benchmark %s failed", name)
            failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
