"""Executes examples/inc_mpq.ipynb (INC script -> one-line change -> autotune -> report) with nbclient."""
import pytest

from notebook_runner import run_notebook

pytest.importorskip("neural_compressor.torch.quantization")


def test_inc_notebook_runs_and_reports_the_autotune_trajectory():
    _, text, wall = run_notebook("inc_mpq.ipynb")
    for needle in ("float accuracy", "RTN 4-bit accuracy", "mpq accuracy", "learned_range by name",
                   "trial budget", "chosen: budget"):
        assert needle in text, f"{needle!r} missing from the notebook's output"
    print(text)
    print(f"notebook wall time {wall:.1f}s")
