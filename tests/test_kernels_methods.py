"""Kernel paths of every method's quantizer against the eager reference.

Triton kernels run in the interpreter (``TRITON_INTERPRET=1``, in a subprocess); the compiled
path runs in-process; the methods are checked to route through the dispatcher.
"""
from __future__ import annotations


import pytest
import torch

from mpq_plugin.kernels import compiled, dispatch
from tests.triton_interpret import run_interpreted
from mpq_plugin.kernels import reference as R

triton_missing = not dispatch.triton_available()

# Runs in a fresh process: TRITON_INTERPRET must be set before triton decorates the kernels.
_TRITON_SCRIPT = r"""
import json, torch
from mpq_plugin.kernels import reference as R
from mpq_plugin.kernels.triton_lsq import fake_quantize as t_fq
from mpq_plugin.kernels.triton_sdq import sdq_select as t_sdq
from mpq_plugin.kernels.triton_learned_range import uniform_fake_quant as t_lr
from mpq_plugin.kernels.triton_csq import bitplane_weight as t_csq
torch.manual_seed(0)
out = []

def bits(t):
    return t.detach().contiguous().view(torch.int32)

def compare(name, f_ref, f_tri, inputs, grad_idx):
    res = []
    for f in (f_ref, f_tri):
        ins = [t.detach().clone().requires_grad_(i in grad_idx)
               if isinstance(t, torch.Tensor) and t.is_floating_point() else t for i, t in enumerate(inputs)]
        y = f(*ins)
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
        res.append((y, torch.autograd.grad(y, [ins[i] for i in grad_idx], gy)))
    (y0, g0), (y1, g1) = res
    out.append(dict(name=name, shape=list(y0.shape) == list(y1.shape),
                    fwd_bits=bool(torch.equal(bits(y0), bits(y1))),
                    fwd_close=bool(torch.allclose(y0, y1, rtol=1e-5, atol=1e-6)),
                    gx_equal=bool(torch.equal(g0[0], g1[0])),
                    gx_close=bool(torch.allclose(g0[0], g1[0], rtol=1e-4, atol=1e-6)),
                    params=[[a.flatten().tolist(), b.flatten().tolist()] for a, b in zip(g0[1:], g1[1:])],
                    pshape=all(a.shape == b.shape for a, b in zip(g0[1:], g1[1:]))))

ties = torch.tensor([0.25, -0.25, 0.75, -0.75, 0.05, -0.05, 0.0, -0.0, 100.0, -100.0, 0.35, -0.35])
for rounding in ("half_even", "half_away"):
    x = torch.cat([ties.repeat(3, 1), torch.randn(3, 1001) * 1.5], 1)  # odd rows: a partial last block
    s = torch.tensor([0.1, 0.05, 0.2]).reshape(3, 1)
    compare(f"lsq_axis0_{rounding}", R.fake_quantize, t_fq, [x, s, 0.0, -8.0, 7.0, rounding], (0, 1))
    xt = x.t().contiguous()
    compare(f"lsq_axis1_{rounding}", R.fake_quantize, t_fq, [xt, s.reshape(1, 3), 0.0, -8.0, 7.0, rounding], (0, 1))
    compare(f"lsq_zp_{rounding}", R.fake_quantize, t_fq, [x, s, 3.0, 0.0, 15.0, rounding], (0, 1))
    for zv in (True, False):
        for pc in (False, True):
            sh = s.clone() if pc else torch.tensor(0.1)
            args = [x, torch.tensor(zv), torch.tensor(0.7), sh, sh * 2.1, -8.0, 7.0, -4.0, 3.0, rounding]
            compare(f"sdq_z{zv}_pc{pc}_{rounding}", R.sdq_select, t_sdq, args, (0, 2, 3, 4))
    for signed in (True, False):
        for gv in ("paper", "code"):
            args = [x, torch.tensor(0.125), torch.tensor(0.9), signed, rounding, gv]
            compare(f"lr_{signed}_{gv}_{rounding}", R.uniform_fake_quant, t_lr, args, (0, 1, 2))
for planes in (3, 7):
    p, n = torch.randn(7, 130, planes) * 0.3, torch.randn(7, 130, planes) * 0.3
    args = [p, n, torch.rand(planes), torch.tensor(0.8), torch.tensor(3.0)]
    compare(f"csq_{planes}", R.bitplane_weight, t_csq, args, (0, 1, 2, 3))
print("RESULT" + json.dumps(out))
"""


@pytest.mark.skipif(triton_missing, reason="triton not installed")
def test_triton_method_kernels_interpreted_match_reference() -> None:
    cases = run_interpreted(_TRITON_SCRIPT, timeout=600)
    assert len(cases) == 2 * (3 + 4 + 4) + 2
    for c in cases:
        assert c["shape"] and c["pshape"], c["name"]
        if c["name"].startswith("csq"):  # BLAS plane sum and torch's sigmoid: float tolerance only
            assert c["fwd_close"] and c["gx_close"], c["name"]
        else:
            assert c["fwd_bits"], f"forward not bit-exact: {c['name']}"
            assert c["gx_equal"], f"grad_x differs: {c['name']}"
        for ref, tri in c["params"]:
            assert tri == pytest.approx(ref, rel=1e-4, abs=1e-4), c["name"]
        assert any(abs(v) > 0 for ref, _ in c["params"] for v in ref), c["name"]  # gradients really flowed


# -- compiled path --------------------------------------------------------------------------------
def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)


def _cases():
    torch.manual_seed(0)
    x = torch.randn(16, 40) * 2
    sc = torch.full((16, 1), 0.1)
    return {
        "sdq_select": ([x, torch.tensor(False), torch.tensor(0.7), sc, sc * 2, -8.0, 7.0, -4.0, 3.0, "half_even"],
                       (0, 2, 3, 4)),
        "sdq_interpolate": ([x, torch.tensor(0.3), sc, sc * 2, -8.0, 7.0, -4.0, 3.0, "half_away"], (0, 1, 2, 3)),
        "uniform_fake_quant": ([x, torch.tensor(0.125), torch.tensor(0.9), True, "half_away", "paper"], (0, 1, 2)),
        "pow2_fake_quant": ([x, torch.tensor(2.0**-4), torch.tensor(2.0), True, False], (0, 1, 2)),
        "bitplane_weight": ([torch.randn(16, 40, 3), torch.randn(16, 40, 3), torch.rand(3), torch.tensor(0.8),
                             torch.tensor(3.0)], (0, 1, 2, 3)),
        "pact_quantize": ([x, torch.tensor(2.0), -8.0, 7.0, 8.0], (0, 1)),
    }


def _fwd_bwd(fn, args, gi):
    ins = [a.detach().clone().requires_grad_(i in gi) if isinstance(a, torch.Tensor) and a.is_floating_point()
           else a for i, a in enumerate(args)]
    y = fn(*ins)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    return y, torch.autograd.grad(y, [ins[i] for i in gi], g)


@pytest.mark.parametrize("op", list(_cases()))
def test_compiled_matches_eager(op: str) -> None:
    args, gi = _cases()[op]
    y0, g0 = _fwd_bwd(getattr(R, op), args, gi)
    y1, g1 = _fwd_bwd(lambda *a: compiled.run(op, *a), args, gi)
    if op == "bitplane_weight":  # the plane sum is a BLAS product in eager, a loop when compiled
        torch.testing.assert_close(y1, y0, rtol=1e-6, atol=1e-7)
    else:
        assert torch.equal(y0, y1), op  # same values (compiled PACT may turn -0.0 into +0.0)
        if op != "pact_quantize":
            assert torch.equal(_bits(y0), _bits(y1)), op  # bit-exact, sign of zero included
        assert torch.equal(g0[0], g1[0]), op  # elementwise input gradient: exact
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-4)


def test_compiled_sdq_and_pact_do_not_recompile_when_bits_change() -> None:
    torch._dynamo.reset()
    compiled.reset()
    x = torch.randn(8, 32)
    sc = torch.full((8, 1), 0.05)
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    outs = []
    for b in (8, 5, 3):
        hi, lo = 2.0 ** (b - 1), 2.0 ** (b - 2)
        y = compiled.run("sdq_select", x, torch.tensor(True), torch.tensor(0.5), sc, sc, -hi, hi - 1, -lo, lo - 1,
                         "half_even")
        assert torch.equal(y, R.sdq_select(x, torch.tensor(True), torch.tensor(0.5), sc, sc, -hi, hi - 1, -lo,
                                           lo - 1, "half_even"))
        outs.append(y.unique().numel())
        a = torch.tensor(1.5)
        assert torch.equal(compiled.run("pact_quantize", x, a, -hi, hi - 1, hi), R.pact_quantize(x, a, -hi, hi - 1, hi))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
    assert graphs == 2, f"{graphs} graphs for 2 ops at 3 bit-widths"
    assert len(set(outs)) == 3  # the bit-width really changed


# -- dispatch -------------------------------------------------------------------------------------
def test_select_op_per_method(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(dispatch.ENV, raising=False)
    args = {op: a for op, (a, _) in _cases().items()}
    for op, a in args.items():
        assert dispatch.select_op(op, *a) == "eager", op  # small CPU tensors
    big = torch.empty(dispatch.COMPILE_MIN_NUMEL)
    assert dispatch.select_op("uniform_fake_quant", big, torch.tensor(0.1), torch.tensor(1.0), True) == "compiled"
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    monkeypatch.setenv(dispatch.ENV, "triton")
    want = {"sdq_select": "triton", "uniform_fake_quant": "triton", "bitplane_weight": "triton",
            "sdq_interpolate": "compiled", "pow2_fake_quant": "compiled", "pact_quantize": "compiled"}
    assert {op: dispatch.select_op(op, *a) for op, a in args.items()} == want
    x = torch.randn(4, 5)  # per-element step: no Triton kernel, falls back
    assert dispatch.select_op("uniform_fake_quant", x, torch.full_like(x, 0.1), torch.tensor(1.0), True) == "compiled"
    s = torch.tensor(0.1)
    assert dispatch.select(x, torch.full((4, 1), 0.1), 0.0, -8.0, 7.0) == "triton"  # per-channel LSQ
    assert dispatch.select(x, torch.full((4, 5), 0.1), 0.0, -8.0, 7.0) == "compiled"  # per-element
    assert dispatch.select(x, s, torch.tensor(0.0), -8.0, 7.0) == "compiled"  # tensor zero point


def test_channel_axis() -> None:
    x = torch.empty(4, 5, 6)
    assert dispatch.channel_axis(x, torch.empty(())) == -1
    assert dispatch.channel_axis(x, torch.empty(4, 1, 1)) == 0
    assert dispatch.channel_axis(x, torch.empty(1, 5, 1)) == 1
    assert dispatch.channel_axis(x, torch.empty(6)) == 2
    assert dispatch.channel_axis(x, torch.empty(4, 5, 1)) is None


# -- the methods route through the dispatcher, with unchanged results ----------------------------
def _quantizers():
    from mpq_plugin.methods.csq import CSQOptions, CSQQuantizer
    from mpq_plugin.methods.learned_range import LearnedRangeQuantizer
    from mpq_plugin.methods.lsq import LSQQuantizer
    from mpq_plugin.methods.sdq import SDQOptions, SDQQuantizer
    from mpq_plugin.nn.fake_quantizer import QuantizerSpec

    w = torch.randn(8, 30, generator=torch.Generator().manual_seed(0))
    spec = QuantizerSpec("weight", (2, 8), signed=True, shape=(8, 30))
    return w, {
        "lsq": (LSQQuantizer(QuantizerSpec("weight", (4, 4), signed=True, channels=8, axis=0)), "fake_quantize"),
        "sdq": (SDQQuantizer(QuantizerSpec("weight", (2, 4), signed=True, channels=8, axis=0),
                             SDQOptions(beta_init=0.6)), "sdq_select"),
        "learned_range": (LearnedRangeQuantizer(spec), "uniform_fake_quant"),
        "csq": (CSQQuantizer(spec, CSQOptions()), "bitplane_weight"),
        "csq_act": (CSQQuantizer(QuantizerSpec("act", (4, 4), signed=False), CSQOptions()), "pact_quantize"),
    }


@pytest.mark.parametrize("method", ["lsq", "sdq", "learned_range", "csq", "csq_act"])
def test_methods_route_through_dispatch_with_same_results(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    w, qs = _quantizers()
    q, op = qs[method]
    seen = []
    real = dispatch.select_op

    def spy(name, *a, **k):
        seen.append(name)
        return real(name, *a, **k)

    monkeypatch.setattr(dispatch, "select_op", spy)
    results = []
    for path in ("eager", "compiled"):
        monkeypatch.setenv(dispatch.ENV, path)
        torch.manual_seed(1)  # SDQ's Bernoulli sample
        q.zero_grad()
        y = q(w)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(2)))
        grads = {k: p.grad.clone() for k, p in q.named_parameters() if p.grad is not None}
        results.append((y.detach(), grads))
    assert op in seen
    (y0, g0), (y1, g1) = results
    if method == "csq":
        torch.testing.assert_close(y1, y0, rtol=1e-6, atol=1e-7)  # plane sum order (see docs/kernels.md)
    else:
        assert torch.equal(y0, y1), method
    assert g0.keys() == g1.keys() and g0, method
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-5, msg=f"{method}.{k}")


def test_bitplane_fused_form_matches_reference_gradients() -> None:
    from mpq_plugin.core.bitplane import bitplane_weight, bitplane_weight_fused

    g = torch.Generator().manual_seed(3)
    f64 = dict(generator=g, dtype=torch.float64)
    args = [torch.randn(5, 4, 3, **f64), torch.randn(5, 4, 3, **f64), torch.rand(3, **f64),
            torch.tensor(0.7, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)]
    y0, g0 = _fwd_bwd(bitplane_weight, args, (0, 1, 2, 3))
    y1, g1 = _fwd_bwd(bitplane_weight_fused, args, (0, 1, 2, 3))
    torch.testing.assert_close(y1, y0)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a)
    leaves = [a.clone().requires_grad_(i < 4) for i, a in enumerate(args)]
    assert torch.autograd.gradcheck(bitplane_weight_fused, leaves)


@pytest.mark.parametrize("signed,with_zero", [(True, False), (False, True), (True, True), (False, False)])
def test_pow2_fused_form_is_bit_exact(signed: bool, with_zero: bool) -> None:
    from mpq_plugin.core.range_quant import pow2_fake_quant, pow2_fake_quant_fused

    x = torch.cat([torch.randn(2000, generator=torch.Generator().manual_seed(4)) * 2,
                   torch.tensor([0.0, -0.0, 2.0, -2.0, 2.0**-6, -(2.0**-6) * 0.8, 2.0**-6 * 0.7])])
    args = [x, torch.tensor(2.0**-6), torch.tensor(2.0), signed, with_zero]
    y0, g0 = _fwd_bwd(pow2_fake_quant, args, (0, 1, 2))
    y1, g1 = _fwd_bwd(pow2_fake_quant_fused, args, (0, 1, 2))
    assert torch.equal(_bits(y0), _bits(y1))
    for a, b in zip(g0, g1):
        assert torch.equal(a, b)
    assert all(bool(t.abs().sum() > 0) for t in g0)  # every gradient path was exercised
