"""Executes examples/torch_ao_qat.ipynb and examples/torchao_qat.ipynb (a user's QAT script -> the
one-line change -> search, freeze, finetune -> convert_mpq -> report) with nbclient."""
import re

import pytest

from notebook_runner import run_notebook

pytestmark = pytest.mark.integration
pytest.importorskip("torchao")


def _value(text: str, pattern: str) -> float:
    m = re.search(pattern, text)
    assert m, f"{pattern!r} missing from the notebook's output"
    return float(m.group(1))


@pytest.mark.parametrize("name", ["torch_ao_qat.ipynb", "torchao_qat.ipynb"])
def test_qat_notebook_runs_converts_exactly_and_reports(name):
    _, text, wall = run_notebook(name)
    print(text)
    print(f"{name}: wall time {wall:.1f}s")
    assert "convert_mpq identical to the frozen fake-quant model: True" in text
    assert _value(text, r"mpq accuracy ([0-9.]+)") > 0.8
    assert _value(text, r"avg weight bits ([0-9.]+)") <= 3.0 + 1e-6
    assert "| layer | type |" in text and "| model | test accuracy |" in text
    if name == "torch_ao_qat.ipynb":
        assert "torch.ao convert_fx warned: True" in text
    else:
        assert re.search(r"apply_torchao_weights \[.*'fc1'.*\]: identical True", text)
    assert wall < 60
