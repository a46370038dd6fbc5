"""Done-means check of issue 7: bundle -> integer executor bit-exact on a small transformer block
(its Linear layers: the MLP sub-block and the q/k/v projection, per token on (batch, tokens, d)).

Attention itself (q @ k^T, softmax, @ v), LayerNorm, GELU and the residual adds have no integer
path in the export (single-chain graphs of Linear/Conv/ReLU/pooling only); docs/export.md."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import mpq_plugin
from mpq_plugin import MPQConfig
from mpq_plugin.export import IntegerExecutor, compare, read_bundle, to_integer_params

D, T, N = 64, 16, 512


def _block(kind: str, cfg: MPQConfig, seed: int):
    torch.manual_seed(seed)
    m = (nn.Sequential(nn.Linear(D, 4 * D), nn.ReLU(), nn.Linear(4 * D, D)) if kind == "mlp"
         else nn.Sequential(nn.Linear(D, 3 * D)))
    x = torch.randn(N, T, D) * torch.linspace(0.5, 2.0, D)  # uneven feature ranges, as after LayerNorm's gain
    mpq_plugin.quantize_(m, cfg, (x[:64],))
    mpq_plugin.freeze(m)
    return m.eval(), x


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", ["mlp", "qkv"])
def test_transformer_linear_layers_bit_exact(kind, seed, tmp_path):
    cfg = MPQConfig(method="learned_range", weight_bits=(2, 8), act_bits=(4, 8))
    m, x = _block(kind, cfg, seed)
    to_integer_params(m, tmp_path / "bundle")
    b = read_bundle(tmp_path / "bundle")
    assert IntegerExecutor(b).token_wise()
    a = compare(m, b, x)
    print(kind, seed, a)
    assert a.samples == N and a.total_mismatches == 0 and a.unexplained == 0  # every code of every token
    # the block's outputs are integer accumulators N; N * unit differs from PyTorch's float output by
    # the bias rounding only (<= 2^-9 output units), which can flip an argmax among 192 near-equal
    # q/k/v features (argmax of a projection means little; the codes above are the exact contract)
    assert a.argmax_agreement >= N - 2 and a.max_abs_logit_diff < 1e-4


@pytest.mark.parametrize("method", ["lsq", "sdq"])
def test_transformer_mlp_float_scales_ties_only(method):
    cfg = MPQConfig(method=method, weight_bits=4 if method == "lsq" else (2, 8), act_bits=8)
    m, x = _block("mlp", cfg, 0)
    a = compare(m, _plan(m), x)
    print(method, a)
    assert a.unexplained == 0 and max(a.code_mismatches.values()) <= 0.02 * N


def _plan(m):
    from mpq_plugin.export.plan import plan

    return plan(m)
