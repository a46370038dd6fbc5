"""mpq_plugin's own convert (``convert_mpq``) for the torch.ao eager/FX and torchao ``quantize_``
flows, end to end with the real host APIs on sklearn digits: prepare, search to a budget, freeze,
finetune, convert; the converted model equals the frozen fake-quant model bit for bit; torchao
inference configs and the per-layer kernel table; bad input."""
from __future__ import annotations

import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from training_loop import train_steps

tq = pytest.importorskip("torch.ao.quantization")
pytest.importorskip("torchao")

import mpq_plugin  # noqa: E402
from mpq_plugin import Budget  # noqa: E402
from mpq_plugin.datasets import load_digits_arrays  # noqa: E402
from mpq_plugin.search import MPQSearch  # noqa: E402

pytestmark = [pytest.mark.integration,
              pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")]

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from torch.ao.quantization.quantize_fx import prepare_qat_fx
    from torchao.quantization import quantize_

    import mpq_plugin.ao as mao
    from mpq_plugin.integrations.ao_convert import DeployedConv2d, DeployedLinear, FrozenActivation, FrozenWeight
    from mpq_plugin.torchao import MPQQATConfig, is_quantizable

torch.set_num_threads(1)

SEARCH_STEPS, FINETUNE_STEPS = 140, 60  # 200 steps per flow


class TinyNet(nn.Module):
    """Conv-BN-ReLU, Conv-ReLU, two Linear layers: fused and unfused torch.ao modules, conv and
    linear layers for the kernel table."""

    def __init__(self, eager_stubs: bool = False) -> None:
        super().__init__()
        self.quant = tq.QuantStub() if eager_stubs else nn.Identity()
        self.dequant = tq.DeQuantStub() if eager_stubs else nn.Identity()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU()
        self.fc1, self.relu3, self.fc2 = nn.Linear(256, 32), nn.ReLU(), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(self.quant(x))))
        x = self.relu2(self.conv2(x))
        x = self.relu3(self.fc1(torch.flatten(x, 1)))
        return self.dequant(self.fc2(x))


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits_arrays()
    x, y = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8), torch.tensor(y).long()
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    tr, te = perm[:1400], perm[1400:]
    return x[tr], y[tr], x[te], y[te]


def _train(p: nn.Module, x, y, steps: int, search=None, opt=None, lr=1e-2):
    return train_steps(p, x, y, steps, search=search, lr=lr, opt=opt, set_train_mode=True)


def _acc(p: nn.Module, x, y) -> float:
    p.eval()
    with torch.no_grad():
        return float((p(x).argmax(1) == y).float().mean())


def _prepare(flow: str, method: str, x: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    if flow == "fx":
        mapping = tq.get_default_qat_qconfig_mapping("x86").set_global(mao.get_mpq_qat_qconfig(method=method))
        p = prepare_qat_fx(TinyNet().train(), mapping, example_inputs=(x[:2],))
        return mao.init_mpq_fake_quants(p, (x[:8],))
    if flow == "eager":
        m = TinyNet(eager_stubs=True).train()
        m.qconfig = mao.get_mpq_qat_qconfig(method=method)
        m = tq.fuse_modules_qat(m, [["conv1", "bn1", "relu1"], ["conv2", "relu2"], ["fc1", "relu3"]])
        p = tq.prepare_qat(m)
        return mao.init_mpq_fake_quants(p, (x[:8],))
    m = TinyNet().train()
    quantize_(m, MPQQATConfig(method=method), filter_fn=is_quantizable)
    mpq_plugin.api.calibrate(m, (x[:8],))
    return m


def _run(flow: str, method: str, digits, budget: float = 4.0):
    x, y, xt, yt = digits
    t0 = time.perf_counter()
    p = _prepare(flow, method, x)
    search = MPQSearch(p, budget=Budget(avg_weight_bits=budget), total_steps=SEARCH_STEPS)
    opt = _train(p, x, y, SEARCH_STEPS, search)
    plan = search.freeze()
    for group in opt.param_groups:
        group["lr"] = 5e-3
    _train(p, x, y, FINETUNE_STEPS, opt=opt)
    return p, plan, time.perf_counter() - t0


def _assert_exact(p: nn.Module, q: nn.Module, x: torch.Tensor) -> None:
    p.eval()
    with torch.no_grad():
        a, b = p(x), q(x)
    assert torch.equal(a, b), float((a - b).abs().max())


@pytest.mark.parametrize("flow,method", [("fx", "sdq"), ("eager", "learned_range"), ("torchao", "sdq"),
                                         ("torchao", "csq"), ("fx", "csq")])
def test_convert_is_exact_and_holds_learned_integers(flow, method, digits):
    x, y, xt, yt = digits
    p, plan, wall = _run(flow, method, digits)
    assert plan.cost["avg_weight_bits"] <= 4.0 + 1e-6
    q = mao.convert_mpq(p)
    assert q is not p and not q.training
    _assert_exact(p, q, xt)
    # no training fake-quant is left; every layer holds integer codes within its learned bits
    assert not any(isinstance(m, (mao.MPQFakeQuantize, mpq_plugin.nn.layers.QuantLayer)) for m in q.modules())
    assert not any(prm.requires_grad for prm in q.parameters())
    frozen = {n.rsplit(".weight_int", 1)[0].rsplit(".weight_fake_quant", 1)[0]: m
              for n, m in q.named_modules() if isinstance(m, FrozenWeight)}
    assert set(frozen) == set(plan.layers), (set(frozen), set(plan.layers))
    for name, fw in frozen.items():
        assert fw.learned_bits == plan.layers[name].weight_bits and fw.bits >= fw.learned_bits
        assert fw.codes.dtype == torch.int8
        lo, hi = -(2 ** (fw.bits - 1)), 2 ** (fw.bits - 1) - 1
        assert lo <= int(fw.codes.min()) and int(fw.codes.max()) <= hi
    acts = [m for m in q.modules() if isinstance(m, FrozenActivation)]
    assert acts and all(a.quant_max - a.quant_min + 1 <= 2 ** a.bits for a in acts)
    mods = dict(q.named_modules())
    if flow == "torchao":
        assert isinstance(mods["fc1"], DeployedLinear) and isinstance(mods["conv1"], DeployedConv2d)
        assert mods["fc1"].weight_bits == plan.layers["fc1"].weight_bits and mods["fc1"].act_bits == 8
    elif flow == "fx":
        assert isinstance(mods["fc2"], DeployedLinear)  # unfused QAT Linear -> plain float layer
        assert isinstance(mods["conv1"].weight_fake_quant, FrozenWeight)  # fused ConvBnReLU kept
    acc = _acc(q, xt, yt)
    print(f"\n{flow}/{method}: test accuracy {acc:.3f}, avg weight bits {plan.cost['avg_weight_bits']:.2f}, "
          f"bits {({n: lb.weight_bits for n, lb in plan.layers.items()})}, {wall:.1f}s")
    if method != "csq":  # CSQ's defaults start from a trained float model; 200 steps from scratch are too few
        assert acc > 0.8
    # the original keeps training: convert made a copy
    assert any(isinstance(m, mao.MPQFakeQuantize) for m in p.modules()) or any(
        isinstance(m, mpq_plugin.nn.layers.QuantLayer) for m in p.modules())


def test_torchao_inference_configs_and_kernel_table(digits):
    from torchao.quantization import FqnToConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig

    x, y, xt, yt = digits
    p, plan, _ = _run("torchao", "sdq", digits)
    q = mao.convert_mpq(p)
    fqn_cfg, table = mao.torchao_inference_configs(q)
    assert isinstance(fqn_cfg, FqnToConfig)
    rows = {r["layer"]: r for r in table}
    assert set(rows) == set(plan.layers)
    for name, r in rows.items():
        b = r["storage_bits"]  # the codes' width picks the kernel
        assert r["weight_bits"] == plan.layers[name].weight_bits
        if name.startswith("conv"):
            assert r["config"] is None and "no weight-only kernel for Conv2d" in r["fallback"]
        elif b == 8:
            assert isinstance(fqn_cfg.fqn_to_config[name], Int8WeightOnlyConfig) and r["fallback"] is None
        else:
            cfg = fqn_cfg.fqn_to_config[name]
            assert isinstance(cfg, IntxWeightOnlyConfig) and cfg.weight_dtype == getattr(torch, f"int{b}")
    md = mao.kernel_table_markdown(table)
    print("\n" + md)
    assert md.count("\n") == len(table) + 1
    # torchao tensors holding the learned codes and scales: bit-identical
    q2 = mao.convert_mpq(p)
    assert mao.apply_torchao_weights(q2) == ["fc1", "fc2"]
    assert type(q2.fc1.weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert torch.equal(q2.fc1.weight.qdata.to(torch.int64), q2.fc1.weight_int.codes.to(torch.int64))
    _assert_exact(p, q2, xt)
    # the configs apply with the real quantize_ and the kernels run (scales re-chosen by torchao)
    ref = q(xt)
    quantize_(q, fqn_cfg, filter_fn=None)
    assert type(q.fc1.weight).__name__ in ("Int8Tensor", "IntxUnpackedToInt8Tensor")
    with torch.no_grad():
        out = q(xt)
    diff = float((out - ref).abs().max())
    agree = float((out.argmax(1) == ref.argmax(1)).float().mean())
    print(f"torchao kernels vs convert_mpq: max |logit diff| {diff:.4f}, argmax agreement {agree:.3f}")
    assert agree > 0.95


def test_torch_ao_fx_table_marks_fused_modules_as_fallback(digits):
    x, y, xt, yt = digits
    p = _prepare("fx", "sdq", x)
    _train(p, x, y, 2)
    mpq_plugin.freeze(p)
    q = mao.convert_mpq(p)
    _assert_exact(p, q, xt)
    _, table = mao.torchao_inference_configs(q)
    rows = {r["layer"]: r for r in table}
    assert "ConvBnReLU2d" in rows["conv1"]["fallback"] and "LinearReLU" in rows["fc1"]["fallback"]
    assert rows["fc2"]["config"] is not None


# -- bad input ------------------------------------------------------------------------------------
def test_convert_before_freeze_is_refused(digits):
    x, y, _, _ = digits
    for flow in ("fx", "torchao"):
        p = _prepare(flow, "sdq", x)
        _train(p, x, y, 1)
        with pytest.raises(ValueError, match="not fixed.*freeze"):
            mao.convert_mpq(p)
    mpq_plugin.freeze(p)  # the torchao model: converts once frozen
    mao.convert_mpq(p)
    p = _prepare("fx", "sdq", x)
    _train(p, x, y, 1)
    mpq_plugin.freeze(p)
    p.apply(tq.disable_fake_quant)
    with pytest.raises(ValueError, match="fake-quant is disabled.*enable_fake_quant"):
        mao.convert_mpq(p)


def test_freeze_before_any_training_step_warns(digits):
    x, _, xt, _ = digits
    for flow in ("fx", "eager", "torchao"):
        p = _prepare(flow, "sdq", x)
        mpq_plugin.freeze(p)
        with pytest.warns(UserWarning, match="never ran a training step"):
            q = mao.convert_mpq(p)
        _assert_exact(p, q, xt)


def test_trained_model_does_not_warn(digits):
    x, y, _, _ = digits
    p = _prepare("torchao", "sdq", x)
    _train(p, x, y, 1)
    mpq_plugin.freeze(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        mao.convert_mpq(p)


def test_convert_refuses_pt2e_graphs_and_plain_models(digits):
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    from mpq_plugin.pt2e import MPQQuantizer, get_mpq_quantization_config, init_mpq_pt2e

    x = digits[0]
    ep = torch.export.export(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).train(), (x[:4],)).module()
    p = prepare_qat_pt2e(ep, MPQQuantizer().set_global(get_mpq_quantization_config(method="sdq")))
    init_mpq_pt2e(p, (x[:4],))
    with pytest.raises(ValueError, match="convert_mpq_pt2e"):
        mao.convert_mpq(p)
    with pytest.raises(ValueError, match="no mpq_plugin quantized layer"):
        mao.convert_mpq(nn.Sequential(nn.Linear(4, 4)))


class Branchy(nn.Module):
    """Data-dependent control flow: neither FX nor torch.export can trace it; eager mode can."""

    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.fc1, self.fc2 = nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(self.quant(torch.flatten(x, 1)))
        if h.mean() > 0:  # data-dependent branch
            h = torch.relu(h)
        return self.dequant(self.fc2(h))


def test_untraceable_model_points_to_the_eager_path(digits):
    from mpq_plugin.pt2e import export_for_mpq_qat

    x, y, xt, _ = digits
    mapping = tq.get_default_qat_qconfig_mapping("x86").set_global(mao.get_mpq_qat_qconfig(method="sdq"))
    with pytest.raises(ValueError, match="torch.fx cannot trace Branchy.*eager") as e:
        mao.prepare_mpq_qat_fx(Branchy().train(), mapping, example_inputs=(x[:2],))
    assert e.value.__cause__ is not None
    with pytest.raises(ValueError, match="torch.export cannot trace Branchy.*eager"):
        export_for_mpq_qat(Branchy().train(), (x[:4],))
    # the wrappers are the host calls for traceable models
    assert isinstance(mao.prepare_mpq_qat_fx(TinyNet().train(), mapping, example_inputs=(x[:2],)), torch.fx.GraphModule)
    ep = export_for_mpq_qat(TinyNet().train(), (x[:4],))
    assert ep(x[:7]).shape == (7, 10)  # dynamic batch
    # the eager path the message names works end to end
    torch.manual_seed(0)
    m = Branchy().train()
    m.qconfig = mao.get_mpq_qat_qconfig(method="sdq")
    p = mao.init_mpq_fake_quants(tq.prepare_qat(m), (x[:8],))
    _train(p, x, y, 20)
    mpq_plugin.freeze(p)
    _assert_exact(p, mao.convert_mpq(p), xt)


def test_host_eager_convert_warns_and_names_convert_mpq(digits):
    x, y, _, _ = digits
    p = _prepare("eager", "sdq", x)
    search = MPQSearch(p, budget=Budget(avg_weight_bits=3.0), total_steps=30)
    _train(p, x, y, 30, search)
    search.freeze()
    with pytest.warns(UserWarning, match=r"lose the learned -?\d+\.\.\d+ range.*mpq_plugin\.ao\.convert_mpq"):
        tq.convert(p.eval())
