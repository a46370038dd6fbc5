"""QAT training-step overhead: every method's step time / the float step, next to torch.ao QAT.

Models (built from code and configs, no downloads): ResNet-20 (batch 64, 3x32x32, 10 classes)
and a tiny BERT (``BertConfig`` hidden 128, 2 layers, 2 heads, FFN 512, batch 16, seq 64, 2
labels). A step is ``zero_grad``, forward, cross-entropy, backward, SGD with momentum (the budget
penalty of a search is not included). Variants, all in one process:

* ``float``: the reference;
* ``mpq_<method>`` for each of ``mpq_plugin.list_methods()``: native ``quantize_`` on every
  Conv/Linear, weights ``(2, 8)`` searched (4 bits for fixed-bit baselines), 8-bit activations;
* ``mpq_structure_only``: the ``lsq`` model with every quantizer replaced by identity (what the
  wrapping costs without fake quantization);
* ``torch_ao_qat``: ResNet ``prepare_qat_fx`` with ``get_default_qat_qconfig("x86")`` (eager
  ``prepare_qat`` if FX tracing fails); BERT eager ``prepare_qat`` with that qconfig on every
  ``nn.Linear`` (FX cannot trace ``BertForSequenceClassification``);
* ``torch_ao_disabled``: the same model with fake-quant and observers disabled.

With ``--compiled``, a second group, timed against its own reference ``compiled_float``:
``torch.compile(model)`` of the float model and of every ``mpq_<method>`` model (the dispatcher
returns the eager reference ops while tracing, so inductor fuses the quantizers into the model's
graph). Compile time (the first steps) is measured apart and excluded; dynamo's graph count and
graph breaks are recorded, and any graph compiled during the timed rounds (a recompile) is
reported as ``graphs_compiled_while_timing``.

Protocol (environment.md §4): rotated interleaved rounds, 2 warm-up + ``--rounds`` timed rounds;
median of per-round ratios and ratio of min times against ``float``; foreign CPU load recorded.

Run: ``python -m benchmarks.qat_step [--rounds 7] [--quick] [--compiled] [--models resnet20 bert]
[--methods lsq sdq]``.
Writes ``benchmarks/results/qat_step.json`` and ``qat_step.md``.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import logging
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

import mpq_plugin
from benchmarks.output import write_results
from benchmarks.timing import run_interleaved
from mpq_plugin.nn.layers import quant_layers
from mpq_plugin.registry import get_method

RESULTS = Path(__file__).resolve().parent / "results"
log = logging.getLogger(__name__)
TARGET = 1.2


def _resnet(quick: bool) -> Tuple[nn.Module, Tuple[torch.Tensor, ...], torch.Tensor]:
    from mpq_plugin.models import resnet20

    torch.manual_seed(0)
    batch = 16 if quick else 64
    return resnet20(), (torch.randn(batch, 3, 32, 32),), torch.randint(0, 10, (batch,))


def _bert(quick: bool) -> Tuple[nn.Module, Tuple[torch.Tensor, ...], torch.Tensor]:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512,
                     num_labels=2)
    model = BertForSequenceClassification(cfg)
    batch, seq = (4, 64) if quick else (16, 64)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    return model, (ids,), torch.randint(0, 2, (batch,))


def _logits(out: object) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out  # type: ignore[return-value]


def _step(model: nn.Module, inputs: Tuple[torch.Tensor, ...], target: torch.Tensor) -> Callable[[], None]:
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(_logits(model(*inputs)), target)
        loss.backward()
        opt.step()
    return run


def _mpq(model: nn.Module, method: str, inputs: Tuple[torch.Tensor, ...]) -> nn.Module:
    searches = get_method(method).quantizer_cls.searches_bits
    cfg = mpq_plugin.MPQConfig(method=method, weight_bits=(2, 8) if searches else 4, act_bits=8)
    return mpq_plugin.quantize_(model, cfg, example_inputs=inputs)


def _structure_only(model: nn.Module) -> nn.Module:
    for _, layer in quant_layers(model):
        for q in (layer.weight_quantizer, layer.input_quantizer):
            if q is not None:
                q.forward = lambda x: x  # instance attribute: nn.Module.__call__ runs it
    return model


def _torch_ao_resnet(model: nn.Module, inputs: Tuple[torch.Tensor, ...]) -> Tuple[nn.Module, str]:
    from torch.ao.quantization import QConfigMapping, get_default_qat_qconfig

    qconfig = get_default_qat_qconfig("x86")
    try:
        from torch.ao.quantization.quantize_fx import prepare_qat_fx

        return prepare_qat_fx(model.train(), QConfigMapping().set_global(qconfig), inputs), "prepare_qat_fx"
    except Exception as e:  # FX tracing limits: eager QAT is the documented alternative
        log.warning("prepare_qat_fx failed (%s); using eager prepare_qat", e)
        from torch.ao.quantization import prepare_qat

        model.qconfig = qconfig
        return prepare_qat(model.train()), "prepare_qat (eager)"


def _torch_ao_linear_only(model: nn.Module) -> Tuple[nn.Module, str]:
    from torch.ao.quantization import get_default_qat_qconfig, prepare_qat

    qconfig = get_default_qat_qconfig("x86")
    for m in model.modules():
        if type(m) is nn.Linear:
            m.qconfig = qconfig
    return prepare_qat(model.train()), "prepare_qat (eager, nn.Linear only)"


def _count_fake_quants(model: nn.Module) -> int:
    from torch.ao.quantization import FakeQuantizeBase

    return sum(isinstance(m, FakeQuantizeBase) for m in model.modules())


def _dynamo_stats() -> Tuple[int, int]:
    """(graphs compiled, graph breaks) so far in this process, from dynamo's counters."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"]), int(sum(counters["graph_break"].values()))


def compiled_group(models: Dict[str, nn.Module], inputs: Tuple[torch.Tensor, ...], target: torch.Tensor,
                   rounds: int, desc: str) -> dict:
    """``torch.compile`` each model, run 2 compile steps apart (timed), then time the group."""
    variants: Dict[str, Callable[[], None]] = {}
    compile_info: Dict[str, dict] = {}
    for k, m in models.items():
        g0, b0 = _dynamo_stats()
        step = _step(torch.compile(m), inputs, target)
        t0 = time.perf_counter()
        step()
        step()
        g1, b1 = _dynamo_stats()
        compile_info[f"compiled_{k}"] = {"compile_s": round(time.perf_counter() - t0, 1), "graphs": g1 - g0,
                                         "graph_breaks": b1 - b0}
        variants[f"compiled_{k}"] = step
    g0, _ = _dynamo_stats()
    res = run_interleaved(variants, "compiled_float", rounds=rounds, desc=f"{desc} compiled")
    res["graphs_compiled_while_timing"] = _dynamo_stats()[0] - g0
    for k, info in compile_info.items():
        res["variants"][k].update(info)
    return res


def bench_model(name: str, rounds: int, quick: bool, compiled: bool = False,
                methods: List[str] | None = None) -> dict:
    build = {"resnet20": _resnet, "bert": _bert}[name]
    base, inputs, target = build(quick)
    models: Dict[str, nn.Module] = {"float": copy.deepcopy(base)}
    for method in methods or mpq_plugin.list_methods():
        models[f"mpq_{method}"] = _mpq(copy.deepcopy(base), method, inputs)
    comp = {k: copy.deepcopy(m) for k, m in models.items()} if compiled else {}
    models["mpq_structure_only"] = _structure_only(_mpq(copy.deepcopy(base), "lsq", inputs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao deprecation notices
        ao, how = (_torch_ao_resnet(copy.deepcopy(base), inputs) if name == "resnet20"
                   else _torch_ao_linear_only(copy.deepcopy(base)))
        ao_off, _ = (_torch_ao_resnet(copy.deepcopy(base), inputs) if name == "resnet20"
                     else _torch_ao_linear_only(copy.deepcopy(base)))
        from torch.ao.quantization import disable_fake_quant, disable_observer

        ao_off.apply(disable_fake_quant)
        ao_off.apply(disable_observer)
    models["torch_ao_qat"], models["torch_ao_disabled"] = ao, ao_off
    variants = {k: _step(m, inputs, target) for k, m in models.items()}
    res = run_interleaved(variants, "float", rounds=rounds, desc=name)
    res.update(model=name, batch=int(target.shape[0]), torch_ao=how, torch_ao_fake_quants=_count_fake_quants(ao),
               mpq_layers=sum(1 for _ in quant_layers(models["mpq_structure_only"])))
    if compiled:
        res["compiled"] = compiled_group(comp, inputs, target, rounds, name)
    return res


def to_markdown(res: dict) -> str:
    lines = [f"# QAT step / float step ({res['torch']}, {res['threads']} threads{', QUICK' if res['quick'] else ''})",
             "", "Median of per-round ratios (ratio of min times in parentheses); protocol in "
             "`benchmarks/qat_step.py`. Foreign load above ~0.2 cores means contaminated: read the min "
             f"ratios. Target: every method <= {TARGET}.", ""]
    for m in res["models"]:
        lines += [f"## {m['model']} (batch {m['batch']}; {m['rounds']} rounds; foreign load "
                  f"{m['foreign_load_cores']} cores; torch.ao: {m['torch_ao']}, {m['torch_ao_fake_quants']} "
                  f"fake-quants; mpq: {m['mpq_layers']} quantized layers)", "",
                  "| variant | median ms | / float | target |", "|---|---|---|---|"]
        for k, r in m["variants"].items():
            ok = "" if not k.startswith("mpq_") or k == "mpq_structure_only" else \
                ("met" if r["x_ref_median"] <= TARGET else "missed")
            lines.append(f"| {k} | {r['median_ms']:.1f} | {r['x_ref_median']:.2f} ({r['x_ref_min']:.2f}) | {ok} |")
        lines.append("")
        c = m.get("compiled")
        if c:
            lines += [f"### {m['model']}, torch.compile(model) (foreign load {c['foreign_load_cores']} cores; "
                      f"graphs compiled while timing: {c['graphs_compiled_while_timing']})", "",
                      "| variant | median ms | / compiled float | target | compile s | graphs | graph breaks |",
                      "|---|---|---|---|---|---|---|"]
            for k, r in c["variants"].items():
                ok = "" if k == "compiled_float" else ("met" if r["x_ref_median"] <= TARGET else "missed")
                lines.append(f"| {k} | {r['median_ms']:.1f} | {r['x_ref_median']:.2f} ({r['x_ref_min']:.2f}) | {ok} "
                             f"| {r['compile_s']} | {r['graphs']} | {r['graph_breaks']} |")
            lines.append("")
    return "\n".join(lines)


def main(argv: List[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet20", "bert"], choices=["resnet20", "bert"])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="smaller batches (ResNet 16, BERT 4) and 3 rounds")
    p.add_argument("--compiled", action="store_true",
                   help="also time torch.compile(model) of float and every method (compile time excluded)")
    p.add_argument("--methods", nargs="+", default=None, help="methods to time (default: all registered)")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    rounds = 3 if a.quick and a.rounds == 7 else a.rounds
    models = list(a.models)
    if "bert" in models and importlib.util.find_spec("transformers") is None:
        logging.getLogger(__name__).warning("transformers is not installed: the BERT QAT step is skipped")
        models.remove("bert")
    res = {"torch": torch.__version__, "threads": torch.get_num_threads(), "quick": a.quick,
           "models": [bench_model(m, rounds, a.quick, a.compiled, a.methods) for m in models]}
    return write_results(a.out, "qat_step", res, to_markdown(res))


if __name__ == "__main__":
    main()
