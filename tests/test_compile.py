"""Core functions compile with torch.compile, and a changing bit-width never recompiles."""
from __future__ import annotations

import torch

from mpq_plugin.core.affine import fake_quantize, int_range


def test_changing_bit_width_does_not_recompile() -> None:
    torch._dynamo.reset()
    compiles = {"n": 0}

    def counting_backend(gm, example_inputs):
        compiles["n"] += 1
        return gm.forward  # no inductor: keeps the test fast, still exercises dynamo guards

    fq = torch.compile(fake_quantize, backend=counting_backend, dynamic=False)
    x = torch.randn(64, 32)
    s = torch.tensor(0.1)
    outs = []
    for bits in (8, 4, 3, 2):
        qmin, qmax = int_range(torch.tensor(float(bits)), signed=True)
        outs.append(fq(x, s, 0.0, qmin, qmax))
        assert torch.equal(outs[-1], fake_quantize(x, s, 0.0, qmin, qmax))
    assert compiles["n"] == 1, f"recompiled {compiles['n']} times for 4 bit-widths"
    assert len({o.unique().numel() for o in outs}) == 4  # the bit-width really changed
