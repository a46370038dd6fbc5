"""Executes examples/inc_mpq.ipynb (INC script -> one-line change -> autotune -> report) with nbclient."""
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("neural_compressor.torch.quantization")

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "inc_mpq.ipynb"


def test_inc_notebook_runs_and_reports_the_autotune_trajectory():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    t0 = time.perf_counter()
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    wall = time.perf_counter() - t0
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                     if o.get("output_type") == "stream")
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    for needle in ("float accuracy", "RTN 4-bit accuracy", "mpq accuracy", "learned_range by name",
                   "trial budget", "chosen: budget"):
        assert needle in text, f"{needle!r} missing from the notebook's output"
    print(text)
    print(f"notebook wall time {wall:.1f}s")
