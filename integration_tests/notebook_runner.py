"""Run an example notebook with nbclient in the venv's ``python3`` kernel; shared by the notebook tests."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any, List, Tuple

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def ensure_python3_kernel() -> None:
    """Install the ``python3`` kernelspec into ``sys.prefix`` (this venv) when it is missing."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--sys-prefix", "--name", "python3"],
                       check=True, capture_output=True)


def run_notebook(name: str, timeout: int = 300) -> Tuple[Any, str, float]:
    """Execute ``examples/<name>`` in place (in memory); returns ``(notebook, stream text, wall s)``
    and fails the test on any error output."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    ensure_python3_kernel()
    path = EXAMPLES / name
    nb = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    wall = time.perf_counter() - t0
    outputs: List[dict] = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    errors = [o for o in outputs if o.get("output_type") == "error"]
    assert not errors, errors
    text = "\n".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    return nb, text, wall
