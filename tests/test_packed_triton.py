"""Triton packed-linear kernel (interpreter, in a subprocess) against the torch reference."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

# Runs in a fresh process: TRITON_INTERPRET must be set before triton decorates the kernels.
_SCRIPT = r"""
import torch
import mpq_plugin
from mpq_plugin.kernels import packed_dispatch, packed_ref, triton_packed
from mpq_plugin.nn.packed import convert_to_packed_

g = torch.Generator().manual_seed(0)
n_checked = 0
for bits in range(1, 9):
    for qmin, zp_kind in ((-(2 ** (bits - 1)), "zero"), (0, "half")):
        for per_channel in (True, False):
            N, K = 37, 75  # not multiples of the blocks, K not a multiple of 32 // bits
            codes = torch.randint(qmin, qmin + 2 ** bits, (N, K), generator=g)
            packed = packed_ref.pack_rows(codes, bits, qmin)
            shape = (N,) if per_channel else ()
            scale = torch.rand(shape, generator=g) * 0.1 + 0.01
            zp = torch.full(shape, 0.5) if zp_kind == "half" else torch.zeros(shape)
            # exact codes: identity input gives W^T with one nonzero IEEE product per output
            eye = torch.eye(K)
            w_t = triton_packed.packed_linear(eye, packed, bits, K, qmin, zp, scale)
            w_ref = packed_ref.dequantize_packed(packed, bits, K, qmin, zp, scale)
            assert torch.equal(w_t, w_ref.t()), (bits, qmin, per_channel)
            for M in (1, 5, 20):
                x = torch.randn(M, K, generator=g)
                bias = torch.randn(N, generator=g) if M != 5 else None
                y_t = triton_packed.packed_linear(x, packed, bits, K, qmin, zp, scale, bias)
                y_r = packed_ref.packed_linear(x, packed, bits, K, qmin, zp, scale, bias)
                bound = 1e-5 * (x.abs() @ w_ref.abs().t()) + 1e-6  # float32 summation-order error
                assert ((y_t - y_r).abs() <= bound).all(), (bits, qmin, per_channel, M)
                n_checked += 1

# through the layer: MPQ_KERNELS=triton routes PackedLinear to the kernel
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(40, 24), torch.nn.ReLU(), torch.nn.Linear(24, 6))
x = torch.randn(3, 40)
cfg = mpq_plugin.MPQConfig(method="lsq", weight_bits=3, act_bits=8, per_channel=True)
mpq_plugin.quantize_(model, cfg, example_inputs=(x,))
mpq_plugin.freeze(model)
model.eval()
with torch.no_grad():
    y_fq = model(x)
convert_to_packed_(model)
assert packed_dispatch.select(x) == "triton"
with torch.no_grad():
    torch.testing.assert_close(model(x), y_fq, rtol=1e-5, atol=1e-5)
print("OK", n_checked)
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_packed_kernel_interpreted_matches_reference() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", MPQ_KERNELS="triton")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True,
                          timeout=900, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK 96" in proc.stdout
