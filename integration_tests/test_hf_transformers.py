"""transformers integration through the real host API (offline): registration, from_pretrained with
MpqConfig on tiny BERT/GPT-2/Llama/ViT checkpoints, QAT, save_pretrained -> from_pretrained with
identical outputs, Trainer + MPQTrainer, and the bad inputs of the issue."""
from __future__ import annotations

import importlib
import json
import os
import runpy

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING  # noqa: E402

import mpq_plugin  # noqa: E402
from mpq_plugin.hf import MpqConfig, MpqHfQuantizer, QuantGPT2Conv1D  # noqa: E402
from mpq_plugin.nn.layers import QuantLinear, quant_layers  # noqa: E402
from mpq_plugin.search import MPQSearch  # noqa: E402

pytestmark = pytest.mark.integration
torch.set_num_threads(1)


def _bert(tmp_path, num_labels=2):
    torch.manual_seed(0)
    m = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=2, intermediate_size=64, num_labels=num_labels,
                                                 max_position_embeddings=32))
    d = tmp_path / "bert_fp"
    m.save_pretrained(d)
    return d, m.eval()


def _cfg(method: str, **kw) -> MpqConfig:
    if method == "lsq":
        kw.setdefault("weight_bits", 4)
    else:
        kw.setdefault("budget", 4.0)
    return MpqConfig(method=method, **kw)


def _ids(n=4, t=8, vocab=100):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (n, t), generator=g)


def _qat(model, x, labels=None, steps=3):
    """A few QAT steps with MPQSearch; returns the frozen plan."""
    search = MPQSearch(model, total_steps=steps)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(steps):
        out = model(x, labels=labels) if labels is not None else model(x)
        task = out.loss if labels is not None else out.logits.float().pow(2).mean()
        (task + search.penalty()).backward()
        opt.step()
        opt.zero_grad()
        search.step()
    plan = search.freeze(strict=False)
    model.eval()
    return plan


# -- registration -----------------------------------------------------------------------------------
def test_registration_is_idempotent():
    import mpq_plugin.hf as hf
    import mpq_plugin.integrations.transformers as T

    assert AUTO_QUANTIZATION_CONFIG_MAPPING["mpq"] is T.MpqConfig
    assert AUTO_QUANTIZER_MAPPING["mpq"] is T.MpqHfQuantizer
    T.register()
    T.register()
    importlib.import_module("mpq_plugin.hf")
    saved = AUTO_QUANTIZATION_CONFIG_MAPPING["mpq"], AUTO_QUANTIZER_MAPPING["mpq"]
    try:  # executing the module body a second time (a reload) must not raise either
        again = runpy.run_path(T.__file__, run_name=T.__name__)
        assert AUTO_QUANTIZATION_CONFIG_MAPPING["mpq"] is again["MpqConfig"]
        assert AUTO_QUANTIZER_MAPPING["mpq"] is again["MpqHfQuantizer"]
    finally:
        AUTO_QUANTIZATION_CONFIG_MAPPING["mpq"], AUTO_QUANTIZER_MAPPING["mpq"] = saved
    assert hf.MpqConfig is T.MpqConfig


def test_foreign_registration_is_refused():
    import mpq_plugin.integrations.transformers as T

    class Other(transformers.utils.quantization_config.QuantizationConfigMixin):
        pass

    saved = AUTO_QUANTIZATION_CONFIG_MAPPING["mpq"]
    AUTO_QUANTIZATION_CONFIG_MAPPING["mpq"] = Other
    try:
        with pytest.raises(ValueError, match="already registered"):
            T.register()
    finally:
        AUTO_QUANTIZATION_CONFIG_MAPPING["mpq"] = saved


def test_config_round_trip_and_validation():
    c = MpqConfig(method="sdq", budget=3.5, weight_bits=(2, 6), options={"candidates": (2, 4, 6)},
                  layer_overrides={".*query": {"weight_bits": (4, 6)}},
                  modules_to_not_convert=["classifier"])
    d = c.to_dict()
    json.dumps(d)  # JSON-serializable
    c2 = MpqConfig.from_dict(d)
    assert c2.to_dict() == d
    assert c.to_mpq_config().budget == mpq_plugin.Budget(avg_weight_bits=3.5)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        MpqConfig(method="nope")
    with pytest.raises(ValueError, match="unknown option"):
        MpqConfig(method="sdq", options={"bogus": 1})
    with pytest.raises(ValueError, match="unknown MpqConfig argument"):
        MpqConfig(method="sdq", bugdet=3)


# -- BERT: from_pretrained -> QAT -> save -> reload ---------------------------------------------------
@pytest.mark.parametrize("method", ["sdq", "learned_range", "csq", "lsq"])
def test_bert_qat_save_reload_identical(tmp_path, method):
    fp_dir, fp = _bert(tmp_path)
    qcfg = _cfg(method, modules_to_not_convert=["classifier"])
    m = AutoModelForSequenceClassification.from_pretrained(fp_dir, quantization_config=qcfg)
    assert isinstance(m.hf_quantizer, MpqHfQuantizer) and not m.hf_quantizer.pre_quantized
    names = [n for n, _ in quant_layers(m)]
    assert len(names) == 13 and "classifier" not in names  # 2 x 6 encoder linears + pooler
    assert not any(isinstance(mod, QuantLinear) for n, mod in m.named_modules() if n == "classifier")
    # parameters are shared with the float layout: same float weights, keys unchanged
    assert torch.equal(m.bert.encoder.layer[0].attention.self.query.weight,
                       fp.bert.encoder.layer[0].attention.self.query.weight)
    for _, layer in quant_layers(m):  # quantizers were initialized from the loaded weights
        assert bool(layer.weight_quantizer.initialized)
        assert all(torch.isfinite(p).all() for p in layer.weight_quantizer.parameters())
    x, y = _ids(), torch.tensor([0, 1, 0, 1])
    before = {k: v.detach().clone() for k, v in m.state_dict().items() if "weight_quantizer" in k}
    plan = _qat(m, x, y)
    changed = sum(not torch.equal(before[k], v) for k, v in m.state_dict().items() if k in before)
    assert changed > 0, "QAT did not update any quantizer tensor"
    assert set(plan) == set(names)

    out_dir = tmp_path / "bert_mpq"
    m.save_pretrained(out_dir)
    assert sorted(os.listdir(out_dir)) == ["config.json", "model.safetensors"]  # no pickles
    qc = json.loads((out_dir / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "mpq" and qc["method"] == method
    assert qc["bit_plan"]["frozen"] is True
    assert {k: v["weight_bits"] for k, v in qc["bit_plan"]["layers"].items()} == \
        {k: v.weight_bits for k, v in plan.layers.items()}
    keys = load_file(out_dir / "model.safetensors").keys()
    assert any(k.endswith("attention.self.query.weight_quantizer.initialized") for k in keys)

    r = AutoModelForSequenceClassification.from_pretrained(out_dir)
    assert isinstance(r.hf_quantizer, MpqHfQuantizer) and r.hf_quantizer.pre_quantized
    assert [n for n, _ in quant_layers(r)] == names
    assert [p.requires_grad for p in r.parameters()] == [p.requires_grad for p in m.parameters()]
    with torch.no_grad():
        assert torch.equal(r(x).logits, m(x).logits)
    assert mpq_plugin.freeze(r).to_dict() == mpq_plugin.freeze(m).to_dict()


def test_bert_reload_mid_search_identical(tmp_path):
    """Saving before freeze keeps the search state (betas, levels) and the same eval outputs."""
    fp_dir, _ = _bert(tmp_path)
    m = AutoModelForSequenceClassification.from_pretrained(fp_dir, quantization_config=_cfg("sdq"))
    search = MPQSearch(m, total_steps=10)
    m.train()
    x = _ids()
    (m(x).logits.pow(2).mean() + search.penalty()).backward()
    m.eval()
    m.save_pretrained(tmp_path / "mid")
    qc = json.loads((tmp_path / "mid" / "config.json").read_text())["quantization_config"]
    assert qc["bit_plan"]["frozen"] is False
    r = AutoModelForSequenceClassification.from_pretrained(tmp_path / "mid")
    with torch.no_grad():
        assert torch.equal(r(x).logits, m(x).logits)


def test_default_skip_and_overrides(tmp_path):
    fp_dir, _ = _bert(tmp_path)
    m = AutoModelForSequenceClassification.from_pretrained(
        fp_dir, quantization_config=MpqConfig(method="sdq", budget=4.0,
                                              layer_overrides={r".*attention\.self\.query": {"weight_bits": 8}},
                                              exclude=[r".*intermediate\.dense"]))
    names = [n for n, _ in quant_layers(m)]
    assert not any("pooler" in n or "classifier" in n for n in names)  # defaults skip heads and poolers
    assert not any("intermediate" in n for n in names)
    q = m.bert.encoder.layer[0].attention.self.query.weight_quantizer
    assert q.spec.bits == (8, 8)


def test_embeddings_optional(tmp_path):
    fp_dir, _ = _bert(tmp_path)
    m = AutoModelForSequenceClassification.from_pretrained(
        fp_dir, quantization_config=MpqConfig(method="sdq", budget=4.0, quantize_embeddings=True))
    names = [n for n, _ in quant_layers(m)]
    assert "bert.embeddings.word_embeddings" in names
    with torch.no_grad():
        assert torch.isfinite(m(_ids()).logits).all()


# -- other families ----------------------------------------------------------------------------------
def _gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                      bos_token_id=0, eos_token_id=0))


def _llama():
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                        bos_token_id=0, eos_token_id=0))


def _vit():
    return ViTForImageClassification(ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, intermediate_size=64, num_labels=3))


@pytest.mark.parametrize("family,build,auto,n_layers", [
    ("gpt2", _gpt2, AutoModelForCausalLM, 8),
    ("llama", _llama, AutoModelForCausalLM, 14),
    ("vit", _vit, AutoModelForImageClassification, 12),
])
def test_families_round_trip(tmp_path, family, build, auto, n_layers):
    torch.manual_seed(0)
    d = tmp_path / family
    build().save_pretrained(d)
    x = torch.randn(2, 3, 16, 16) if family == "vit" else _ids(2, 8, 64)
    m = auto.from_pretrained(d, quantization_config=MpqConfig(method="sdq", budget=4.0))
    names = [n for n, _ in quant_layers(m)]
    assert len(names) == n_layers
    assert not any("lm_head" in n or "classifier" in n or "embed" in n for n in names)
    if family == "gpt2":
        c_attn = m.transformer.h[0].attn.c_attn
        assert isinstance(c_attn, QuantGPT2Conv1D)
        assert c_attn.weight_quantizer.spec.axis == 1 and c_attn.weight_quantizer.spec.channels == 96
    _qat(m, x)
    m.save_pretrained(tmp_path / f"{family}_mpq")
    r = auto.from_pretrained(tmp_path / f"{family}_mpq")
    with torch.no_grad():
        assert torch.equal(r(x).logits, m(x).logits)


def test_gpt2_conv1d_matches_float_at_high_bits(tmp_path):
    """The quantized Conv1D computes x @ W + b like the float one (8-bit weights: small error)."""
    torch.manual_seed(0)
    fp = _gpt2().eval()
    fp.save_pretrained(tmp_path / "g")
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "g", quantization_config=MpqConfig(method="lsq", weight_bits=8))
    x = _ids(2, 8, 64)
    with torch.no_grad():
        a, b = fp(x).logits, m(x).logits
    assert 0 < (a - b).abs().max() < 0.05 * a.abs().max()


# -- Trainer -----------------------------------------------------------------------------------------
def test_trainer_with_search(tmp_path):
    from torch.utils.data import Dataset
    from transformers import TrainingArguments

    from mpq_plugin.hf import MPQTrainer

    class DS(Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {"input_ids": torch.randint(0, 100, (8,), generator=g), "labels": torch.tensor(i % 2)}

    fp_dir, _ = _bert(tmp_path)
    m = AutoModelForSequenceClassification.from_pretrained(
        fp_dir, quantization_config=MpqConfig(method="sdq", budget=3.0, modules_to_not_convert=["classifier"]))
    search = MPQSearch(m, total_steps=4)
    seen = []
    orig = search.penalty

    def spy():
        p = orig()
        seen.append(p.requires_grad)
        return p

    search.penalty = spy
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, bf16=True, use_cpu=True, report_to=[],
                             logging_steps=100, save_strategy="no", learning_rate=1e-3, disable_tqdm=True)
    trainer = MPQTrainer(model=m, args=args, train_dataset=DS(), mpq_search=search, freeze_at_end=True)
    before = m.bert.encoder.layer[0].attention.self.query.weight_quantizer.steps.detach().clone()
    trainer.train()
    assert search.step_count == 4  # one search step per optimizer step, not per micro-batch
    assert len(seen) == 8 and any(seen)  # the penalty entered the loss of every micro-batch
    assert search.frozen and trainer.mpq_plan is not None
    assert not torch.equal(before, m.bert.encoder.layer[0].attention.self.query.weight_quantizer.steps)
    trainer.save_model(str(tmp_path / "saved"))
    r = AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved")
    m.eval()
    x = _ids()
    sd_r, sd_m = r.state_dict(), m.state_dict()
    assert sd_r.keys() == sd_m.keys() and all(torch.equal(sd_r[k], sd_m[k]) for k in sd_m)
    with torch.no_grad():  # accelerate patched m.forward with bf16 autocast: call the class's fp32 forward
        assert torch.equal(r(x).logits, type(m).forward(m, input_ids=x).logits)


class _LabelledIds(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"input_ids": torch.randint(0, 100, (8,), generator=g), "labels": torch.tensor(i % 2)}


def _sdq_trainer(tmp_path, steps, **kw):
    from transformers import TrainingArguments

    from mpq_plugin.hf import MPQTrainer

    fp_dir, _ = _bert(tmp_path)
    m = AutoModelForSequenceClassification.from_pretrained(
        fp_dir, quantization_config=MpqConfig(method="sdq", budget=3.0, modules_to_not_convert=["classifier"]))
    search = MPQSearch(m, total_steps=steps)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=4,
                             use_cpu=True, report_to=[], logging_steps=1000, save_strategy="no", learning_rate=5e-5,
                             weight_decay=0.01, disable_tqdm=True, lr_scheduler_type="constant", seed=0)
    return m, search, MPQTrainer(model=m, args=args, train_dataset=_LabelledIds(), mpq_search=search, **kw)


def test_trainer_bit_lr_param_groups(tmp_path):
    m, _, trainer = _sdq_trainer(tmp_path, 2, mpq_bit_lr=0.05, mpq_quantizer_lr_mult=20.0)
    opt = trainer.create_optimizer()
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"weights", "weights_no_decay", "quantizer", "bits"}
    quantizers = [layer.weight_quantizer for _, layer in quant_layers(m)]
    betas = {id(p) for q in quantizers for p in q.bit_parameters()}
    qparams = {id(p) for q in quantizers for p in q.parameters()} - betas
    assert {id(p) for p in groups["bits"]["params"]} == betas and len(betas) == len(quantizers)
    assert {id(p) for p in groups["quantizer"]["params"]} == qparams
    assert groups["bits"]["lr"] == 0.05 and groups["bits"]["weight_decay"] == 0.0
    assert groups["quantizer"]["lr"] == pytest.approx(5e-5 * 20) and groups["quantizer"]["weight_decay"] == 0.0
    assert groups["weights"]["lr"] == 5e-5 and groups["weights"]["weight_decay"] == 0.01
    no_decay = {id(p) for p in groups["weights_no_decay"]["params"]}
    assert id(m.bert.encoder.layer[0].attention.self.query.bias) in no_decay
    assert id(m.bert.encoder.layer[0].attention.self.query.weight) in {id(p) for p in groups["weights"]["params"]}
    n_trainable = sum(1 for p in m.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in opt.param_groups) == n_trainable  # every parameter exactly once
    with pytest.raises(ValueError, match="mpq_bit_lr"):
        _sdq_trainer(tmp_path, 2, mpq_bit_lr=0.0)


@pytest.mark.parametrize("bit_lr", [None, 0.1])
def test_trainer_bit_lr_moves_sdq_bits(tmp_path, bit_lr):
    """With the weight learning rate alone SDQ's betas barely move in 20 steps; with mpq_bit_lr they
    cross the decay threshold and the bit-widths fall toward the budget."""
    m, search, trainer = _sdq_trainer(tmp_path, 20, mpq_bit_lr=bit_lr)
    quantizers = [layer.weight_quantizer for _, layer in quant_layers(m)]
    before = [float(q.bit_width().detach()) for q in quantizers]
    torch.manual_seed(0)
    trainer.train()
    after = [float(q.bit_width().detach()) for q in quantizers]
    moved = sum(abs(a - b) > 0.5 for a, b in zip(after, before))
    if bit_lr is None:
        assert moved == 0, (before, after)
    else:
        assert moved == len(quantizers) and all(a < b for a, b in zip(after, before)), (before, after)


# -- q/k/v bit sharing --------------------------------------------------------------------------------
@pytest.mark.parametrize("method", [m for m in mpq_plugin.list_methods() if m != "lsq"])
def test_share_qkv_bits_freeze_save_reload(tmp_path, method):
    from mpq_plugin.adapters.hf import qkv_groups
    from mpq_plugin.hf import current_bit_plan
    from mpq_plugin.nn.sharing import bit_leader, bit_state_names

    fp_dir, fp = _bert(tmp_path)
    x = _ids()
    for share in (False, True):
        m = AutoModelForSequenceClassification.from_pretrained(
            fp_dir, quantization_config=_cfg(method, share_qkv_bits=share))
        groups = qkv_groups(m)
        assert groups == qkv_groups(fp) and len(groups) == 2  # found on the quantized model too
        for g in groups:  # three different repairs: unshared layers keep them, a shared group keeps the last
            for name, b in zip(g, (3, 6, 4)):
                m.get_submodule(name).weight_quantizer.force_bits(b)
        now = current_bit_plan(m)
        assert [now[n].weight_bits for n in groups[0]] == ([3, 6, 4] if not share else [4, 4, 4])
    leader, follower = (m.get_submodule(n).weight_quantizer for n in groups[1][:2])
    assert bit_leader(follower) is leader
    plan = _qat(m, x, labels=torch.tensor([0, 1, 0, 1]), steps=3)
    for g in groups:
        assert len({plan[n].weight_bits for n in g}) == 1, plan.to_dict()
    assert plan.avg_weight_bits() <= 4.0 + 1e-6
    m.save_pretrained(tmp_path / "q")
    stored = load_file(str(tmp_path / "q" / "model.safetensors"))
    names = bit_state_names(leader)
    assert all(f"{groups[0][0]}.weight_quantizer.{n}" in stored for n in names)
    assert not any(f"{g[i]}.weight_quantizer.{n}" in stored for g in groups for i in (1, 2) for n in names)
    r = AutoModelForSequenceClassification.from_pretrained(tmp_path / "q")
    assert r.config.quantization_config.share_qkv_bits is True
    assert bit_leader(r.get_submodule(groups[0][2]).weight_quantizer) is r.get_submodule(groups[0][0]).weight_quantizer
    assert current_bit_plan(r).to_dict() == plan.to_dict()
    with torch.no_grad():
        assert torch.equal(r(x).logits, m(x).logits)


def test_share_qkv_bits_refuses_mismatched_ranges(tmp_path):
    fp_dir, _ = _bert(tmp_path)
    cfg = MpqConfig(method="sdq", budget=4.0, share_qkv_bits=True,
                    layer_overrides={r".*attention\.self\.key": {"weight_bits": [3, 6]}})
    with pytest.raises(ValueError, match="same method, role, bit range"):
        AutoModelForSequenceClassification.from_pretrained(fp_dir, quantization_config=cfg)
    with pytest.raises(ValueError, match="share_qkv_bits"):
        MpqConfig(method="sdq", share_qkv_bits="yes")


# -- bad input ---------------------------------------------------------------------------------------
def test_modules_to_not_convert_must_name_a_module(tmp_path):
    fp_dir, _ = _bert(tmp_path)
    with pytest.raises(ValueError, match="match no module"):
        AutoModelForSequenceClassification.from_pretrained(
            fp_dir, quantization_config=MpqConfig(method="sdq", budget=4.0, modules_to_not_convert=["clasifier"]))


def _saved_mpq(tmp_path):
    fp_dir, _ = _bert(tmp_path)
    m = AutoModelForSequenceClassification.from_pretrained(fp_dir, quantization_config=_cfg("sdq"))
    _qat(m, _ids(), torch.tensor([0, 1, 0, 1]), steps=2)
    out = tmp_path / "mpq"
    m.save_pretrained(out)
    return out


def test_bitplan_mismatch_is_refused(tmp_path):
    out = _saved_mpq(tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    layers = cfg["quantization_config"]["bit_plan"]["layers"]
    first = sorted(layers)[0]
    layers[first]["weight_bits"] = 1 if layers[first]["weight_bits"] != 1 else 2
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match the saved quantizer state"):
        AutoModelForSequenceClassification.from_pretrained(out)
    layers.pop(first)
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="nothing was loaded"):
        AutoModelForSequenceClassification.from_pretrained(out)


def test_missing_quantizer_tensor_is_refused(tmp_path):
    out = _saved_mpq(tmp_path)
    sd = load_file(out / "model.safetensors")
    victim = next(k for k in sd if k.endswith("weight_quantizer.steps"))
    del sd[victim]
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="quantizer tensor"):
        AutoModelForSequenceClassification.from_pretrained(out)


def test_loading_without_registration_says_what_to_install(tmp_path):
    """Without mpq registered transformers skips the quantization (its own warning) and loads the
    float weights; config.json names what to install."""
    out = _saved_mpq(tmp_path)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "pip install mpq_plugin" in qc["requires"] and "import mpq_plugin.hf" in qc["requires"]
    saved = AUTO_QUANTIZATION_CONFIG_MAPPING.pop("mpq"), AUTO_QUANTIZER_MAPPING.pop("mpq")
    try:
        r = AutoModelForSequenceClassification.from_pretrained(out)
        assert not list(quant_layers(r))
    finally:
        AUTO_QUANTIZATION_CONFIG_MAPPING["mpq"], AUTO_QUANTIZER_MAPPING["mpq"] = saved


# -- adapter rules -----------------------------------------------------------------------------------
def test_adapter_families_and_qkv_groups(tmp_path):
    from mpq_plugin.adapters import hf as rules

    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64))
    gpt2, llama, vit = _gpt2(), _llama(), _vit()
    assert [rules.detect_family(m) for m in (bert, gpt2, llama, vit)] == ["bert", "gpt2", "llama", "vit"]
    assert rules.qkv_groups(bert)[0] == ("bert.encoder.layer.0.attention.self.query",
                                         "bert.encoder.layer.0.attention.self.key",
                                         "bert.encoder.layer.0.attention.self.value")
    assert rules.qkv_groups(gpt2)[0] == ("transformer.h.0.attn.c_attn",)  # fused projection
    assert len(rules.qkv_groups(llama)) == 2 and all(len(g) == 3 for g in rules.qkv_groups(llama))
    kinds = rules.quantizable_modules(gpt2)
    assert set(kinds.values()) == {"conv1d"} and "lm_head" not in kinds
    with_emb = rules.quantizable_modules(vit, quantize_embeddings=True)
    assert with_emb["vit.embeddings.patch_embeddings.projection"] == "conv"
    assert "vit.embeddings.patch_embeddings.projection" not in rules.quantizable_modules(vit)
    with pytest.raises(ValueError, match="unknown model family"):
        rules.quantizable_modules(bert, family="t5")
    with pytest.raises(ValueError, match="match no module"):
        rules.resolve_skip(bert, ["nonexistent_head"])


def test_activation_quantizers_calibrate_and_reload(tmp_path):
    from mpq_plugin.hf import calibrate

    fp_dir, _ = _bert(tmp_path)
    m = AutoModelForSequenceClassification.from_pretrained(
        fp_dir, quantization_config=MpqConfig(method="sdq", budget=4.0, act_bits=8))
    aqs = [layer.input_quantizer for _, layer in quant_layers(m)]
    assert all(a is not None and not bool(a.initialized) for a in aqs)
    x = _ids()
    m.train()
    calibrate(m, {"input_ids": x, "labels": torch.tensor([0, 1, 0, 1])})
    assert all(bool(a.initialized) for a in aqs) and m.training  # the caller's mode is restored
    plan = _qat(m, x, torch.tensor([0, 1, 0, 1]), steps=2)
    assert all(lb.act_bits == 8 for lb in plan.layers.values())
    m.save_pretrained(tmp_path / "act")
    r = AutoModelForSequenceClassification.from_pretrained(tmp_path / "act")
    with torch.no_grad():
        assert torch.equal(r(x).logits, m(x).logits)
