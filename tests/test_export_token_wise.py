"""Integer executor on token-wise Linear chains (a transformer's MLP block and attention
projections) with ``(batch, tokens, features)`` inputs: code for code with PyTorch."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import mpq_plugin
from mpq_plugin import MPQConfig
from mpq_plugin.export import IntegerExecutor, WidthOverflowError, compare
from mpq_plugin.export.plan import plan

D, T = 16, 6


def mlp_block(cfg: MPQConfig, seed: int = 0, n: int = 64, d: int = D):
    """Transformer MLP sub-block ``Linear(d, 4d) -> ReLU -> Linear(4d, d)`` applied per token."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(d, 4 * d), nn.ReLU(), nn.Linear(4 * d, d))
    x = torch.randn(n, T, d)
    mpq_plugin.quantize_(m, cfg, (x[:16],))
    mpq_plugin.freeze(m)
    return m.eval(), x


@pytest.mark.parametrize("cfg, exact", [
    (MPQConfig(method="learned_range", weight_bits=(2, 8), act_bits=8), True),
    (MPQConfig(method="lsq", weight_bits=4, act_bits=8, per_channel=True), False),
], ids=["learned_range_pow2", "lsq_per_channel"])
def test_mlp_block_on_tokens_matches_pytorch(cfg, exact):
    m, x = mlp_block(cfg)
    b = plan(m)
    ex = IntegerExecutor(b)
    assert ex.token_wise()
    tr = ex.run(x.numpy())
    assert tr.output.shape == (64, T, D) and tr.output.dtype == np.int64
    assert tr.codes["2"].shape == (64, T, 4 * D)
    a = compare(m, b, x)
    assert a.unexplained == 0
    if exact:
        assert a.total_mismatches == 0 and a.argmax_agreement == 64
    else:
        assert a.total_mismatches <= 2 and a.argmax_agreement >= 62
    assert a.max_abs_logit_diff < 1e-4
    # each token alone gives the same integers (no mixing across tokens)
    one = ex.run(x[:, 3].numpy())
    assert np.array_equal(one.output, tr.output[:, 3])


def test_attention_projection_on_tokens():
    """A fused q/k/v projection ``Linear(d, 3d)``: one layer, (batch, tokens, d) -> (batch, tokens, 3d)."""
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(D, 3 * D))
    x = torch.randn(32, T, D)
    mpq_plugin.quantize_(m, MPQConfig(method="learned_range", weight_bits=(2, 8), act_bits=8), (x[:8],))
    mpq_plugin.freeze(m)
    a = compare(m.eval(), plan(m), x)
    assert a.total_mismatches == 0 and a.max_abs_logit_diff < 1e-5


def test_token_inputs_keep_overflow_checks():
    m, x = mlp_block(MPQConfig(method="learned_range", weight_bits=(2, 8), act_bits=8), n=4)
    b = plan(m)
    b.layers["2"]["accumulator"]["bits"] = 4
    with pytest.raises(WidthOverflowError, match="layer 2: accumulator"):
        IntegerExecutor(b).run(x.numpy())


def test_gelu_block_is_refused_by_name():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))
    x = torch.randn(8, T, D)
    mpq_plugin.quantize_(m, MPQConfig(method="lsq", weight_bits=4, act_bits=8), (x,))
    mpq_plugin.freeze(m)
    m(x)
    with pytest.raises(ValueError, match="GELU"):
        plan(m)


def test_convolutional_graph_is_not_token_wise():
    from tests.test_export_executor import build_cnn

    m, _ = build_cnn("learned_range", n=4)
    assert not IntegerExecutor(plan(m)).token_wise()
