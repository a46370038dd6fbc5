"""Kernel paths against the eager reference: Triton (interpreter, in a subprocess), compiled, dispatch."""
from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

from mpq_plugin.core.affine import fake_quantize as reference
from mpq_plugin.core.affine import int_range
from mpq_plugin.kernels import compiled, dispatch
from tests.triton_interpret import run_interpreted

triton_missing = not dispatch.triton_available()

# Runs in a fresh process: TRITON_INTERPRET must be set before triton decorates the kernels.
_TRITON_SCRIPT = r"""
import json, torch
from mpq_plugin.core.affine import fake_quantize as ref
from mpq_plugin.kernels import dispatch
from mpq_plugin.kernels.triton_lsq import fake_quantize as tq
torch.manual_seed(0)
out = []
ties = torch.tensor([0.25, -0.25, 0.75, -0.75, 0.05, -0.05, 0.0, -0.0, 100.0, -100.0, 0.35, -0.35])
for rounding in ("half_even", "half_away"):
    for z, qmin, qmax in ((0.0, -8.0, 7.0), (0.0, 0.0, 15.0), (3.0, 0.0, 15.0), (0.0, -2.0, 1.0)):
        x = torch.cat([ties, torch.randn(3001) * 1.5])   # odd size: a partial last block
        g = torch.randn_like(x)
        s = torch.tensor(0.1, requires_grad=True)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = ref(x1, s, z, qmin, qmax, rounding), tq(x2, s, z, qmin, qmax, rounding)
        gx1, gs1 = torch.autograd.grad(y1, (x1, s), g)
        gx2, gs2 = torch.autograd.grad(y2, (x2, s), g)
        out.append(dict(case=[rounding, z, qmin, qmax],
                        fwd_bits=torch.equal(y1.view(torch.int32), y2.view(torch.int32)),
                        gx_bits=torch.equal(gx1.view(torch.int32), gx2.view(torch.int32)),
                        gs=[gs1.item(), gs2.item()], clamped=int((y1.abs() >= qmax * 0.1 - 1e-6).sum()),
                        gs_shape=list(gs2.shape)))
# a forced Triton dispatch on a CPU tensor runs the interpreted kernel through the entry point
x = torch.randn(2048, requires_grad=True)
out.append(dict(selected=dispatch.select(x, torch.tensor(0.1), 0.0, -8.0, 7.0, force="triton"),
                per_channel=dispatch.select(x.view(2, -1), torch.full((2, 1), 0.1), 0.0, -8.0, 7.0,
                                            force="triton"),
                per_element=dispatch.select(x.view(2, -1), torch.full((2, 1024), 0.1), 0.0, -8.0, 7.0,
                                            force="triton")))
print("RESULT" + json.dumps(out))
"""


@pytest.mark.skipif(triton_missing, reason="triton not installed")
def test_triton_kernel_interpreted_matches_reference() -> None:
    *cases, sel = run_interpreted(_TRITON_SCRIPT, timeout=300)
    assert len(cases) == 8
    for c in cases:
        assert c["fwd_bits"], f"forward not bit-exact for {c['case']}"
        assert c["gx_bits"], f"grad_x not bit-exact for {c['case']}"
        ref_gs, tri_gs = c["gs"]
        assert tri_gs == pytest.approx(ref_gs, rel=1e-5, abs=1e-3), c["case"]
        assert c["gs_shape"] == []
    assert any(c["clamped"] > 0 for c in cases)  # the clamp branch of both gradients was exercised
    assert sel == {"selected": "triton", "per_channel": "triton", "per_element": "compiled"}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)


@pytest.mark.parametrize("per_channel", [False, True])
def test_compiled_matches_eager_bit_for_bit_without_recompiles(per_channel: bool) -> None:
    torch._dynamo.reset()
    compiled.reset()
    torch.manual_seed(0)
    x = torch.randn(16, 64) * 2
    g = torch.randn_like(x)
    step = torch.full((16, 1) if per_channel else (), 0.1)
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    seen = set()
    for bits in (8, 4, 3, 2):
        qmin, qmax = int_range(torch.tensor(float(bits)), signed=True)
        outs = []
        for fn in (reference, compiled.fake_quantize):
            xi, si = x.clone().requires_grad_(), step.clone().requires_grad_()
            y = fn(xi, si, 0.0, qmin, qmax)
            outs.append((y, *torch.autograd.grad(y, (xi, si), g)))
        (y0, gx0, gs0), (y1, gx1, gs1) = outs
        assert torch.equal(_bits(y0), _bits(y1)), bits
        assert torch.equal(_bits(gx0), _bits(gx1)), bits
        torch.testing.assert_close(gs1, gs0, rtol=1e-5, atol=1e-4)
        seen.add(y1.unique().numel())
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
    assert graphs == 1, f"{graphs} graphs compiled for 4 bit-widths"
    assert len(seen) == 4  # the bit-width really changed


def test_compiled_accepts_float_bounds_as_tensors() -> None:
    x = torch.randn(300)
    s = torch.tensor(0.05)
    assert torch.equal(_bits(compiled.fake_quantize(x, s, 2.0, 0.0, 15.0)), _bits(reference(x, s, 2.0, 0.0, 15.0)))


def test_dispatch_auto_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(dispatch.ENV, raising=False)
    s = torch.tensor(0.1)
    assert dispatch.requested() == "auto"
    assert dispatch.select(torch.randn(64), s, 0.0, -8.0, 7.0) == "eager"  # small CPU tensor
    big = torch.empty(dispatch.COMPILE_MIN_NUMEL)
    assert dispatch.select(big, s, 0.0, -8.0, 7.0) == "compiled"
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    cuda_like = torch.empty(64, device="meta")  # not CUDA: never triton in auto mode
    assert dispatch.select(cuda_like, s, 0.0, -8.0, 7.0) == "eager"


def test_dispatch_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    s = torch.tensor(0.1)
    big = torch.empty(dispatch.COMPILE_MIN_NUMEL)
    monkeypatch.setenv(dispatch.ENV, "eager")
    assert dispatch.select(big, s, 0.0, -8.0, 7.0) == "eager"
    monkeypatch.setenv(dispatch.ENV, " Compiled ")
    assert dispatch.select(torch.randn(8), s, 0.0, -8.0, 7.0) == "compiled"
    monkeypatch.setenv(dispatch.ENV, "triton")
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    with pytest.raises(ValueError, match="triton is not installed"):
        dispatch.select(torch.randn(8), s, 0.0, -8.0, 7.0)


def test_dispatch_unknown_value_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dispatch.ENV, "cuda")
    with pytest.raises(ValueError, match=r"MPQ_KERNELS='cuda'.*triton.*compiled.*eager"):
        dispatch.fake_quantize(torch.randn(8), torch.tensor(0.1), 0.0, -8.0, 7.0)


def test_dispatch_stays_eager_while_tracing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dispatch.ENV, "compiled")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert dispatch.select(torch.randn(8), torch.tensor(0.1), 0.0, -8.0, 7.0) == "eager"


def test_dispatch_logs_each_path_once(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(dispatch.ENV, "eager")
    monkeypatch.setattr(dispatch, "_logged", set())
    x, s = torch.randn(32), torch.tensor(0.1)
    with caplog.at_level(logging.INFO, logger=dispatch.__name__):
        for _ in range(3):
            y = dispatch.fake_quantize(x, s, 0.0, -8.0, 7.0)
    assert torch.equal(y, reference(x, s, 0.0, -8.0, 7.0))
    msgs = [r.getMessage() for r in caplog.records if "kernels" in r.getMessage()]
    assert len(msgs) == 1 and "eager" in msgs[0]


def test_import_does_not_import_triton() -> None:
    code = "import sys, mpq_plugin, mpq_plugin.kernels; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
