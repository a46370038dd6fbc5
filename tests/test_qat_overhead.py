"""QAT step overhead (issue 8): cheap dispatch, activation-sized tensors on the compiled path,
and ``torch.compile(model)`` of a quantized model: graph-break free, no recompiles across SDQ
sampling and schedule changes, and exact after loading a checkpoint."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import mpq_plugin
from mpq_plugin.core.affine import fake_quantize as reference
from mpq_plugin.core.affine import float_range, int_range
from mpq_plugin.kernels import dispatch
from mpq_plugin.nn.layers import quant_layers
from mpq_plugin.registry import get_method


def test_env_lookup_is_cached_but_follows_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    x, s = torch.randn(dispatch.COMPILE_MIN_NUMEL), torch.tensor(0.1)
    monkeypatch.setenv(dispatch.ENV, "eager")
    assert dispatch.select(x, s, 0.0, -8.0, 7.0) == "eager"
    assert dispatch.select(x, s, 0.0, -8.0, 7.0) == "eager"  # cached value
    monkeypatch.setenv(dispatch.ENV, "compiled")
    assert dispatch.select(torch.randn(8), s, 0.0, -8.0, 7.0) == "compiled"
    monkeypatch.setenv(dispatch.ENV, "bogus")
    for _ in range(2):  # an invalid value is never cached: it raises on every call
        with pytest.raises(ValueError, match="MPQ_KERNELS='bogus'"):
            dispatch.requested()
    monkeypatch.delenv(dispatch.ENV)
    assert dispatch.requested() == "auto"


def test_activation_sized_tensors_compile_but_csq_synthesis_stays_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(dispatch.ENV, raising=False)
    n = dispatch.COMPILE_MIN_NUMEL  # e.g. one ResNet-20 activation at batch 4, or BERT's at batch 4
    x, s = torch.randn(n), torch.tensor(0.1)
    assert n <= 4 * 16 * 32 * 32
    assert dispatch.select_op("fake_quantize", x, s, 0.0, -8.0, 7.0, "half_even") == "compiled"
    assert dispatch.select_op("pact_quantize", x, s, 0.0, 7.0, 7.0) == "compiled"
    p = torch.randn(n // 4, 4)
    masks, temp = torch.ones(4), torch.tensor(1.0)
    # CSQ's compiled synthesis matches eager to float tolerance only: not below OP_COMPILE_MIN_NUMEL
    assert dispatch.select_op("bitplane_weight", p, p, masks, s, temp) == "eager"
    big = torch.randn(dispatch.OP_COMPILE_MIN_NUMEL["bitplane_weight"] // 4, 4)
    assert dispatch.select_op("bitplane_weight", big, big, masks, s, temp) == "compiled"


def test_compiled_path_at_the_new_threshold_is_bit_identical(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(dispatch.ENV, raising=False)
    torch.manual_seed(0)
    x0 = torch.randn(dispatch.COMPILE_MIN_NUMEL) * 3
    s0 = torch.tensor(0.07)
    outs, grads = [], []
    for fn in (dispatch.fake_quantize, reference):
        x, s = x0.clone().requires_grad_(), s0.clone().requires_grad_()
        y = fn(x, s, 0.0, -8.0, 7.0)
        (y * torch.linspace(-1, 1, y.numel())).sum().backward()
        outs.append(y.detach())
        grads.append((x.grad, s.grad))
    assert dispatch.select(x0, s0, 0.0, -8.0, 7.0) == "compiled"
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])  # a reduction: summation order may differ


def _quantized_net(method: str) -> tuple:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    x = torch.randn(2, 3, 8, 8)
    searches = get_method(method).quantizer_cls.searches_bits
    cfg = mpq_plugin.MPQConfig(method=method, weight_bits=(2, 8) if searches else 4, act_bits=8)
    return mpq_plugin.quantize_(net, cfg, example_inputs=(x,)), x


@pytest.mark.parametrize("method", mpq_plugin.list_methods())
def test_compiled_model_does_not_recompile_across_steps(method: str) -> None:
    """SDQ's per-step sampling and the schedules set by ``set_progress`` (CSQ's temperature, SDQ's
    Gumbel temperature) live in tensors: no new graph after the first steps."""
    torch._dynamo.reset()
    counters.clear()
    net, x = _quantized_net(method)
    compiled = torch.compile(net, backend="eager")  # dynamo only: what recompiles is decided there
    for _ in range(2):
        compiled(x).sum().backward()
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0
    for i in range(4):
        for _, layer in quant_layers(net):
            for q in (layer.weight_quantizer, layer.input_quantizer):
                if q is not None:
                    q.set_progress(0.2 * (i + 1))
        out = compiled(x)
        if method != "sdq":  # SDQ samples a bit-width per call
            torch.testing.assert_close(out, net(x))
        out.sum().backward()
    assert counters["stats"]["unique_graphs"] == graphs
    torch._dynamo.reset()


def test_float_range_of_int_bits_equals_the_tensor_formula() -> None:
    """``float_range`` computes integer bits in plain Python (foldable by torch.compile); the
    values must be those of ``int_range``'s tensor formula."""
    for bits in range(1, 17):
        for signed in (False, True):
            qmin, qmax = int_range(bits, signed)
            assert float_range(bits, signed) == (float(qmin), float(qmax))
            assert float_range(torch.tensor(bits), signed) == (float(qmin), float(qmax))


def _quantizers(net: nn.Module) -> list:
    return [q for _, layer in quant_layers(net) for q in (layer.weight_quantizer, layer.input_quantizer)
            if q is not None]


@pytest.mark.parametrize("method", mpq_plugin.list_methods())
def test_compiled_model_has_no_graph_breaks(method: str) -> None:
    """Quantizers read host state (initialized, signedness, bits_fixed, SDQ's level) from Python
    mirrors while dynamo traces: the whole forward is one graph."""
    torch._dynamo.reset()
    counters.clear()
    net, x = _quantized_net(method)
    torch.compile(net, backend="eager")(x).sum().backward()
    breaks, graphs = sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert (breaks, graphs) == (0, 1), dict(counters["graph_break"])


def _decay_or_fix(net: nn.Module, method: str, change: str) -> None:
    if change == "decay":  # SDQ: beta below the threshold, set_progress moves the layer down one candidate
        wq = net[0].weight_quantizer
        with torch.no_grad():
            wq.beta.fill_(0.01)
        wq.set_progress(0.5)
    else:
        for q in _quantizers(net):
            q.fix_bits()


def _load_like_transformers(net: nn.Module, state: dict) -> None:
    """transformers' loader assigns each tensor with ``setattr`` (no ``load_state_dict``)."""
    for key, value in state.items():
        prefix, _, name = key.rpartition(".")
        module = net.get_submodule(prefix)
        if name in module._buffers:
            setattr(module, name, value.clone())
        else:
            getattr(module, name).data.copy_(value)


@pytest.mark.parametrize("method,change,load", [(m, "fix_bits", "load_state_dict") for m in mpq_plugin.list_methods()]
                         + [("sdq", "decay", "load_state_dict"), ("sdq", "decay", "setattr")])
def test_loaded_state_gives_the_same_outputs_eagerly_and_compiled(method: str, change: str, load: str) -> None:
    """The host mirrors follow a loaded checkpoint: a fresh model compiled right after loading (no
    eager call in between) computes what the saved model computes."""
    torch._dynamo.reset()
    counters.clear()
    net, x = _quantized_net(method)
    _decay_or_fix(net, method, change)
    fresh, _ = _quantized_net(method)
    hard = [q.hard_bit_width() for q in _quantizers(net)]
    if change == "decay":
        assert not torch.equal(hard[0], fresh[0].weight_quantizer.hard_bit_width())  # the test can fail
    if load == "setattr":
        _load_like_transformers(fresh, net.state_dict())
    else:
        fresh.load_state_dict(net.state_dict())
    compiled = torch.compile(fresh, backend="eager")
    outs = []
    for model in (compiled, fresh, net):  # compiled first: it sees only what loading set
        torch.manual_seed(1)  # SDQ samples its pair in training mode
        outs.append(model(x))
    breaks = sum(counters["graph_break"].values())
    torch._dynamo.reset()
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[2])
    assert [q.hard_bit_width() for q in _quantizers(fresh)] == hard
    assert breaks == 0


def test_compiled_path_does_not_recompile_per_weight_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights are parameters, whose shapes dynamo keeps static: each new weight shape used to be
    a new graph, until a model with many shapes (MiniLM: 3, times per-channel steps) hit dynamo's
    recompile limit. Passed as views they get dynamic shapes after the first change."""
    from mpq_plugin.kernels import compiled

    monkeypatch.setenv(dispatch.ENV, "compiled")
    torch._dynamo.reset()
    compiled._CACHE.clear()
    counters.clear()
    for rows in (256, 384, 512, 640, 768, 1024):
        w = nn.Parameter(torch.randn(rows, 128))
        s = nn.Parameter(torch.full((rows, 1), 0.05))
        y = dispatch.fake_quantize(w, s, 0.0, -8.0, 7.0)
        y.sum().backward()
        assert w.grad is not None and s.grad is not None
        assert torch.equal(y, reference(w, s, 0.0, -8.0, 7.0))
    assert counters["stats"]["unique_graphs"] <= 2  # the first shape, then one shape-generic graph
    torch._dynamo.reset()
    compiled._CACHE.clear()
