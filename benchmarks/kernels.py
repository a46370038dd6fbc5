"""Kernel-level fake-quant benchmark: LSQ fwd and fwd+bwd as ratios to ``clone()`` and ``add(out=)``.

Protocol (``/work/shared/design/environment.md`` §4): one process, every variant once per round
with the order rotated each round, 2 warm-up + 11 timed rounds; report the median of per-round
ratios and the ratio of min times, never absolute times across runs. Compile time is measured
apart (first call). Foreign CPU load during timing is recorded; above ~0.2 cores treat the run as
contaminated. Same-run baselines: ``torch.fake_quantize_per_tensor_affine`` and torch.ao's
``_LearnableFakeQuantize`` (LSQ). On a CUDA machine with triton the Triton path is added.

Run: ``python -m benchmarks.kernels [--sizes 4194304 16777216] [--rounds 11]``.
Writes ``benchmarks/results/kernels.json`` and ``kernels.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

from mpq_plugin.core.affine import fake_quantize as eager_fq
from mpq_plugin.kernels import compiled, dispatch

RESULTS = Path(__file__).resolve().parent / "results"
QMIN, QMAX = -8.0, 7.0  # 4-bit signed, per-tensor step 0.1 (torch baselines: 0..15, zero point 8)


def _busy_jiffies() -> int:
    with open("/proc/stat") as f:
        v = [int(t) for t in f.readline().split()[1:]]
    return sum(v) - v[3] - v[4]  # all but idle and iowait


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def _variants(n: int, device: torch.device) -> Dict[str, Callable[[], object]]:
    x = torch.randn(n, device=device)
    g = torch.randn(n, device=device)
    out = torch.empty_like(x)
    step = torch.tensor(0.1, device=device, requires_grad=True)
    xg = x.clone().requires_grad_()

    def fwd(fn):
        def run():
            with torch.no_grad():
                return fn(x, step, 0.0, QMIN, QMAX)
        return run

    def fb(fn):
        def run():
            y = fn(xg, step, 0.0, QMIN, QMAX)
            return torch.autograd.grad(y, (xg, step), g)
        return run

    from torch.ao.quantization import MovingAverageMinMaxObserver
    from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize

    lfq = _LearnableFakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=15,
                                 use_grad_scaling=True).to(device)
    with torch.no_grad():
        lfq(x)  # observer sets the initial scale / zero point
    lfq.enable_param_learning()

    def lfq_fb():
        y = lfq(xg)
        return torch.autograd.grad(y, (xg, lfq.scale, lfq.zero_point), g)

    def aten_fb():
        y = torch.fake_quantize_per_tensor_affine(xg, 0.1, 8, 0, 15)
        return torch.autograd.grad(y, (xg,), g)

    v: Dict[str, Callable[[], object]] = {
        "clone": lambda: x.clone(),
        "add_out": lambda: torch.add(x, 0, out=out),
        "eager_lsq_fwd": fwd(eager_fq),
        "eager_lsq_fwdbwd": fb(eager_fq),
        "compiled_lsq_fwd": fwd(compiled.fake_quantize),
        "compiled_lsq_fwdbwd": fb(compiled.fake_quantize),
        "aten_per_tensor_fwd": lambda: torch.fake_quantize_per_tensor_affine(x, 0.1, 8, 0, 15),
        "aten_per_tensor_fwdbwd": aten_fb,
        "torch_learnable_fwd": lambda: _no_grad(lfq, x),
        "torch_learnable_fwdbwd": lfq_fb,
    }
    if device.type == "cuda" and dispatch.triton_available():
        tq = dispatch._triton_module().fake_quantize
        v["triton_lsq_fwd"] = fwd(tq)
        v["triton_lsq_fwdbwd"] = fb(tq)
    return v


def _no_grad(m, x):
    with torch.no_grad():
        return m(x)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def bench_size(n: int, device: torch.device, rounds: int = 11, warmup: int = 2) -> dict:
    variants = _variants(n, device)
    compile_s = {}
    for name in [k for k in variants if k.startswith(("compiled", "triton"))]:
        compile_s[name] = _timed(variants[name], device)  # first call: compile / JIT, kept apart
    names = list(variants)
    times: Dict[str, List[float]] = {k: [] for k in names}
    hz = os.sysconf("SC_CLK_TCK")
    busy0, own0, wall0 = _busy_jiffies(), _own_cpu(), time.perf_counter()
    for r in range(warmup + rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for k in order:
            t = _timed(variants[k], device)
            if r >= warmup:
                times[k].append(t)
    wall = time.perf_counter() - wall0
    foreign = max(0.0, ((_busy_jiffies() - busy0) / hz - (_own_cpu() - own0)) / wall)
    rows = {}
    for k in names:
        row = {"median_ms": 1e3 * statistics.median(times[k])}
        for ref in ("clone", "add_out"):
            row[f"x_{ref}_median"] = statistics.median(a / b for a, b in zip(times[k], times[ref]))
            row[f"x_{ref}_min"] = min(times[k]) / min(times[ref])
        rows[k] = row
    return {"numel": n, "device": str(device), "rounds": rounds, "warmup": warmup,
            "foreign_load_cores": round(foreign, 3), "first_call_s": compile_s, "variants": rows}


def to_markdown(res: dict) -> str:
    lines = [f"# Fake-quant kernels: time ratios ({res['torch']}, {res['threads']} threads, {res['device']})", "",
             "Median of per-round ratios (ratio of min times in parentheses); protocol in "
             "`benchmarks/kernels.py`. Foreign load above ~0.2 cores means contaminated.", ""]
    for s in res["sizes"]:
        lines += [f"## {s['numel']:,} elements (foreign load {s['foreign_load_cores']} cores; "
                  f"first calls: " + ", ".join(f"{k} {v:.1f} s" for k, v in s["first_call_s"].items()) + ")", "",
                  "| variant | median ms | / clone | / add(out=) |", "|---|---|---|---|"]
        for k, r in s["variants"].items():
            lines.append(f"| {k} | {r['median_ms']:.2f} | {r['x_clone_median']:.2f} ({r['x_clone_min']:.2f}) "
                         f"| {r['x_add_out_median']:.2f} ({r['x_add_out_min']:.2f}) |")
        lines.append("")
    return "\n".join(lines)


def main(argv: List[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1 << 22, 1 << 24])
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    res = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device),
           "sizes": [bench_size(n, device, a.rounds) for n in a.sizes]}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "kernels.json").write_text(json.dumps(res, indent=2))
    md = to_markdown(res)
    (a.out / "kernels.md").write_text(md + "\n")
    print(md)
    return res


if __name__ == "__main__":
    main()
