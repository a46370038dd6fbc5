"""``make bench``: run every available benchmark in this one process, in order.

Kernel ratios go to ``benchmarks/results/kernels.{json,md}``; the SQNR table is printed.
"""
from __future__ import annotations

import logging
import sys

from benchmarks import kernels, sqnr

BENCHMARKS = {"kernels": lambda: kernels.main([]), "sqnr": sqnr.main}


def main(names: list | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    failed = []
    for name in names or list(BENCHMARKS):
        print(f"\n=== {name} ===", flush=True)
        try:
            BENCHMARKS[name]()
        except Exception:  # one broken benchmark must not hide the others' figures
            logging.exception("benchmark %s failed", name)
            failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
