"""Executes examples/fpga_export.ipynb (demo model -> freeze -> integer bundle -> integer executor ->
QONNX -> qonnx execution) with nbclient, on a kernel of this interpreter."""
import json
import re
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("qonnx")

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "fpga_export.ipynb"
LIMIT_S = 60


def _kernel_manager(tmp_path: Path):
    """A kernel of *this* interpreter (the venv's), whatever kernelspecs the machine has registered."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec = tmp_path / "kernels" / "mpq-venv"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "mpq venv", "language": "python"}))
    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")], ensure_native_kernel=False)
    return KernelManager(kernel_name="mpq-venv", kernel_spec_manager=ksm)


def test_fpga_export_notebook_is_exact_end_to_end(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    t0 = time.perf_counter()
    client = nbclient.NotebookClient(nb, timeout=300, km=_kernel_manager(tmp_path),
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()
    wall = time.perf_counter() - t0
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                     if o.get("output_type") == "stream")
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    print(text)
    print(f"notebook wall time {wall:.1f}s")
    assert "| layer | op | fan-in |" in text and "| features.0 | quant_conv2d |" in text
    assert "| fc | quant_linear |" in text
    bits = float(re.search(r"avg weight bits ([0-9.]+)", text).group(1))
    assert bits <= 3.0 + 1e-6
    n = int(re.search(r"integer executor: (\d+) samples", text).group(1))
    assert f"code mismatches 0, argmax agreement {n}/{n}" in text
    assert "128/128 samples equal PyTorch exactly; argmax equal to the integer executor on 128/128" in text
    assert wall < LIMIT_S, f"the notebook took {wall:.0f}s (limit {LIMIT_S}s)"
