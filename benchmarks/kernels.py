"""Kernel-level fake-quant benchmark: every method's weight quantizer (4 bits), fwd and fwd+bwd,
eager and compiled (and Triton on CUDA), as ratios to ``clone()`` and ``add(out=)``.

Quantizers: LSQ per-tensor (``lsq``) and per-channel over 256 rows (``lsqpc``), SDQ's sampled
4/3-bit pair (``sdq``), learned-range U3 (``lr``, pow2 step) and P3 (``lrpow2``), CSQ's bit-plane
synthesis with 3 magnitude planes (``csq``; it reads ``2 x 3`` logits per output element).

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
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

from benchmarks.output import write_results
from mpq_plugin.kernels import compiled, dispatch
from mpq_plugin.kernels import reference as R

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
    xg = x.clone().requires_grad_()

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
        "aten_per_tensor_fwd": lambda: torch.fake_quantize_per_tensor_affine(x, 0.1, 8, 0, 15),
        "aten_per_tensor_fwdbwd": aten_fb,
        "torch_learnable_fwd": lambda: _no_grad(lfq, x),
        "torch_learnable_fwdbwd": lfq_fb,
    }
    for tag, (op, args, grad_idx) in _method_cases(x).items():
        v.update(_op_variants(tag, op, args, grad_idx, g, device))
    return v


def _method_cases(x: torch.Tensor) -> Dict[str, tuple]:
    """tag -> (op, args, indices of the differentiable args) for each method's 4-bit weight quantizer."""
    n, dev = x.numel(), x.device
    rows = 256 if n % 256 == 0 else 1
    t = lambda v: torch.tensor(v, device=dev)  # noqa: E731
    return {
        "lsq": ("fake_quantize", [x, t(0.1), 0.0, QMIN, QMAX, "half_even"], (0, 1)),
        "lsqpc": ("fake_quantize", [x.view(rows, -1), torch.full((rows, 1), 0.1, device=dev), 0.0, QMIN, QMAX,
                                    "half_even"], (0, 1)),
        "sdq": ("sdq_select", [x, t(True), t(0.7), t(0.1), t(0.2), QMIN, QMAX, -4.0, 3.0, "half_even"], (0, 2, 3, 4)),
        "lr": ("uniform_fake_quant", [x, t(0.125), t(0.875), True, "half_away", "paper"], (0, 1, 2)),
        "lrpow2": ("pow2_fake_quant", [x, t(2.0**-6), t(2.0), True, False], (0, 1, 2)),
        "csq": ("bitplane_weight", [torch.randn(n, 3, device=dev) * 0.1, torch.randn(n, 3, device=dev) * 0.1,
                                    torch.rand(3, device=dev), t(0.8), t(3.0)], (0, 1, 2, 3)),
    }


def _op_variants(tag: str, op: str, args: list, grad_idx: tuple, g: torch.Tensor,
                 device: torch.device) -> Dict[str, Callable[[], object]]:
    """``{eager,compiled[,triton]}_{tag}_{fwd,fwdbwd}`` for one op."""
    leaves = [a.detach().clone().requires_grad_(i in grad_idx)
              if isinstance(a, torch.Tensor) and a.is_floating_point() else a for i, a in enumerate(args)]
    wrt = [leaves[i] for i in grad_idx]
    gy = g.view(args[0].shape[:-1] if op == "bitplane_weight" else args[0].shape)
    paths = {"eager": getattr(R, op), "compiled": lambda *a: compiled.run(op, *a)}
    if device.type == "cuda" and dispatch.triton_available() and dispatch.op_triton_supports(op, tuple(args)):
        paths["triton"] = dispatch._triton_fn(op)
    out: Dict[str, Callable[[], object]] = {}
    for path, fn in paths.items():
        def fwd(fn=fn):
            with torch.no_grad():
                return fn(*args)

        def fb(fn=fn):
            return torch.autograd.grad(fn(*leaves), wrt, gy)

        out[f"{path}_{tag}_fwd"], out[f"{path}_{tag}_fwdbwd"] = fwd, fb
    return out


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


TAGS = ("lsq", "lsqpc", "sdq", "lr", "lrpow2", "csq")
TARGET = 3.0  # issue 8: every quantizer's fwd+bwd within 3x clone() on CPU


def summary(res: dict) -> List[str]:
    """Per-quantizer table: median ratio to clone() of each path, and whether fwd+bwd meets the target."""
    lines = []
    for s in res["sizes"]:
        v = s["variants"]
        paths = [p for p in ("eager", "compiled", "triton") if f"{p}_lsq_fwd" in v]
        head = " | ".join(f"{p} fwd | {p} fwd+bwd" for p in paths)
        lines += [f"### {s['numel']:,} elements: / clone() (foreign load {s['foreign_load_cores']} cores)", "",
                  f"| quantizer | {head} | best fwd+bwd <= {TARGET:g}x |", "|---" * (2 * len(paths) + 2) + "|"]
        for tag in TAGS:
            cells, best = [], float("inf")
            for p in paths:
                f, fb = v[f"{p}_{tag}_fwd"]["x_clone_median"], v[f"{p}_{tag}_fwdbwd"]["x_clone_median"]
                cells += [f"{f:.2f}", f"{fb:.2f}"]
                best = min(best, fb)
            lines.append(f"| {tag} | " + " | ".join(cells) + f" | {'yes' if best <= TARGET else 'no'} ({best:.2f}) |")
        lines.append("")
    return lines


def to_markdown(res: dict) -> str:
    lines = [f"# Fake-quant kernels: time ratios ({res['torch']}, {res['threads']} threads, {res['device']})", "",
             "Median of per-round ratios (ratio of min times in parentheses); protocol in "
             "`benchmarks/kernels.py`. Foreign load above ~0.2 cores means contaminated.", "",
             "## Summary: each method's 4-bit weight quantizer", ""] + summary(res) + ["## All variants", ""]
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
    return write_results(a.out, "kernels", res, to_markdown(res))


if __name__ == "__main__":
    main()
