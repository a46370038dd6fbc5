"""accelerate with an mpq model from ``from_pretrained(..., quantization_config=MpqConfig(...))``: a QAT
loop with ``Accelerator.prepare`` (bf16 autocast on CPU, gradient accumulation) driving MPQSearch, and
2-process DDP (torchrun, gloo) keeping bit-width parameters and decisions identical on every rank."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

pytestmark = pytest.mark.integration

# The same loop runs in-process (world 1) and under torchrun (world 2); it prints one JSON line.
LOOP = textwrap.dedent('''
    import json, os, sys
    import torch
    from accelerate import Accelerator
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification
    from mpq_plugin.hf import MpqConfig, current_bit_plan
    from mpq_plugin.nn.layers import quant_layers
    from mpq_plugin.search import MPQSearch

    def main(fp_dir, out_json, method="sdq", micro_batches=8, accum=2, share=False):
        torch.set_num_threads(1)
        acc = Accelerator(mixed_precision="bf16", gradient_accumulation_steps=accum, cpu=True)
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(
            fp_dir, quantization_config=MpqConfig(method=method, budget=3.0, modules_to_not_convert=["classifier"],
                                                  share_qkv_bits=share))
        steps = micro_batches // accum
        search = MPQSearch(model, total_steps=steps)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-3)
        g = torch.Generator().manual_seed(100 + acc.process_index)  # different data on each rank
        data = [(torch.randint(0, 100, (4, 8), generator=g), torch.randint(0, 2, (4,), generator=g))
                for _ in range(micro_batches)]
        model, opt = acc.prepare(model, opt)
        model.train()
        dtypes = set()
        for x, y in data:
            with acc.accumulate(model):
                out = model(input_ids=x, labels=y)
                dtypes.add(str(out.logits.dtype))
                acc.backward(out.loss + search.penalty())
                opt.step()
                opt.zero_grad()
            if acc.sync_gradients:
                search.step()
        plan = search.freeze(strict=False)
        base = acc.unwrap_model(model)
        flat = torch.cat([p.detach().float().flatten() for n, p in base.named_parameters()
                          if "weight_quantizer" in n])
        res = {"rank": acc.process_index, "world": acc.num_processes, "search_steps": search.step_count,
               "wrapped": type(model).__name__, "plan": {k: v.weight_bits for k, v in plan.layers.items()},
               "avg_bits": plan.avg_weight_bits(), "qparams_sum": float(flat.double().sum()),
               "qparams": flat.tolist()[:64], "dtypes": sorted(dtypes)}
        if acc.num_processes > 1:
            gathered = [None] * acc.num_processes
            torch.distributed.all_gather_object(gathered, (res["plan"], flat.tolist()))
            res["plans_identical"] = all(p == gathered[0][0] for p, _ in gathered)
            res["qparams_identical"] = all(q == gathered[0][1] for _, q in gathered)
        if acc.is_main_process:
            with open(out_json, "w") as f:
                json.dump(res, f)
        acc.wait_for_everyone()

    if __name__ == "__main__":
        main(sys.argv[1], sys.argv[2])
''')


@pytest.fixture()
def bert_dir(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    m = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=2, intermediate_size=64, num_labels=2,
                                                 max_position_embeddings=32))
    m.save_pretrained(tmp_path / "fp")
    return tmp_path / "fp"


def _loop_module(tmp_path):
    path = tmp_path / "mpq_accel_loop.py"
    path.write_text(LOOP)
    return path


@pytest.mark.parametrize("method, share", [("sdq", False), ("learned_range", False), ("sdq", True)])
def test_accelerate_loop_bf16_accumulation(tmp_path, bert_dir, method, share):
    from accelerate.state import AcceleratorState

    import runpy

    ns = runpy.run_path(str(_loop_module(tmp_path)), run_name="loop")
    AcceleratorState._reset_state(True)
    try:
        ns["main"](str(bert_dir), str(tmp_path / "r.json"), method=method, share=share)
    finally:
        AcceleratorState._reset_state(True)
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["world"] == 1
    assert res["search_steps"] == 4  # 8 micro-batches / accumulation 2
    assert res["dtypes"] == ["torch.float32"]  # accelerate casts bf16-autocast outputs back to fp32
    assert len(res["plan"]) == 13
    assert res["avg_bits"] <= 8.0
    if share:  # one width per attention block
        for block in (0, 1):
            p = f"bert.encoder.layer.{block}.attention.self."
            assert res["plan"][p + "query"] == res["plan"][p + "key"] == res["plan"][p + "value"]


def test_torchrun_two_processes_identical_bits(tmp_path, bert_dir):
    script = _loop_module(tmp_path)
    out = tmp_path / "ddp.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(29500 + os.getpid() % 1000), str(script), str(bert_dir), str(out)],
                          env=env, capture_output=True, text=True, timeout=170)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["world"] == 2 and res["wrapped"] == "DistributedDataParallel"
    assert res["search_steps"] == 4
    assert res["plans_identical"] and res["qparams_identical"]
    assert wall < 60, f"2-process run took {wall:.1f} s"
