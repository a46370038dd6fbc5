"""Packed low-bit linear vs the float linear of the same shape, at batch 1, 16 and 128.

CPU variants: ``float32`` ``F.linear`` (reference), the packed reference (unpack + dequantize +
``F.linear``) at 3, 4 and 8 bits, and the compiled packed path at 4 bits (one fused unpack +
dequantize pass, then ``F.linear``). On a CUDA machine with triton: ``float16`` ``F.linear``
(reference) and the fused Triton kernel at 3, 4 and 8 bits with float16 inputs. Weights are
per-channel, ``size x size``. Protocol as :mod:`benchmarks.timing` (rotated interleaved rounds,
median of per-round ratios, ratio of min times, foreign CPU load); the compile / JIT first call is
timed apart. Memory is the weight only (float vs packed words + scales + zero points).

Run: ``python -m benchmarks.packed [--size 4096] [--batches 1 16 128] [--rounds 7] [--quick]``.
Writes ``benchmarks/results/packed.json`` and ``packed.md``.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from benchmarks.output import write_results
from benchmarks.timing import run_interleaved, timed
from mpq_plugin.kernels import packed_dispatch, packed_ref

RESULTS = Path(__file__).resolve().parent / "results"
GPU_TARGET = 2.5  # issue 8: packed 4-bit >= 2.5x faster than fp16 at batch 1 (GPU)


def _packed(size: int, bits: int, device: torch.device):
    g = torch.Generator().manual_seed(bits)
    qmin = -(2 ** (bits - 1))
    codes = torch.randint(qmin, -qmin, (size, size), generator=g)
    packed = packed_ref.pack_rows(codes, bits, qmin).to(device)
    scale = (torch.rand(size, generator=g) * 0.01 + 0.001).to(device)
    return packed, qmin, torch.zeros(size, device=device), scale


def _variants(size: int, batch: int, device: torch.device) -> Dict[str, Callable[[], object]]:
    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    x = torch.randn(batch, size, device=device, dtype=dtype)
    w = torch.randn(size, size, device=device, dtype=dtype)
    ref = "float16" if cuda else "float32"
    v: Dict[str, Callable[[], object]] = {ref: lambda: F.linear(x, w)}
    for bits in (3, 4, 8):
        p, qmin, zp, s = _packed(size, bits, device)
        if cuda:
            tp = packed_dispatch._triton().packed_linear
            v[f"triton_{bits}bit"] = (lambda p=p, qmin=qmin, zp=zp, s=s, bits=bits:
                                      tp(x, p, bits, size, qmin, zp, s))
        else:
            v[f"reference_{bits}bit"] = (lambda p=p, qmin=qmin, zp=zp, s=s, bits=bits:
                                         packed_ref.packed_linear(x, p, bits, size, qmin, zp, s))
            if bits == 4:
                v["compiled_4bit"] = (lambda p=p, qmin=qmin, zp=zp, s=s:
                                      packed_dispatch._compiled_linear(x, p, 4, size, qmin, zp, s))
    return v


def _no_grad(fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return fn()
    return run


def bench(size: int, batch: int, rounds: int, device: torch.device) -> dict:
    variants = {k: _no_grad(f) for k, f in _variants(size, batch, device).items()}
    first = {k: round(timed(f, device), 3) for k, f in variants.items()
             if k.startswith(("compiled", "triton"))}  # compile / JIT, kept apart
    res = run_interleaved(variants, next(iter(variants)), rounds=rounds, device=device, desc=f"b{batch}")
    res.update(size=size, batch=batch, first_call_s=first)
    return res


def to_markdown(res: dict) -> str:
    lines = [f"# Packed linear vs float linear ({res['torch']}, {res['threads']} threads, {res['device']}"
             f"{', QUICK' if res['quick'] else ''})", "",
             f"Weight {res['size']}x{res['size']}, per-channel scales. Median of per-round ratios of time "
             "to the float layer's time (ratio of min times in parentheses); below 1 is faster. Foreign "
             "load above ~0.2 cores means contaminated. Weight memory: " +
             ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in res["weight_bytes"].items()) + ".", ""]
    if res["device"] == "cpu":
        lines += [f"No GPU on this machine: the GPU target (packed 4-bit >= {GPU_TARGET}x faster than "
                  "fp16 at batch 1) is not measured here.", ""]
    for r in res["runs"]:
        lines += [f"## batch {r['batch']} (foreign load {r['foreign_load_cores']} cores; first calls: "
                  + (", ".join(f"{k} {v:.2f} s" for k, v in r["first_call_s"].items()) or "none") + ")", "",
                  "| variant | median ms | / float |", "|---|---|---|"]
        for k, v in r["variants"].items():
            lines.append(f"| {k} | {v['median_ms']:.3f} | {v['x_ref_median']:.2f} ({v['x_ref_min']:.2f}) |")
        lines.append("")
    return "\n".join(lines)


def main(argv: List[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 128])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="1024x1024 weights and 3 rounds")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    size = 1024 if a.quick and a.size == 4096 else a.size
    rounds = 3 if a.quick and a.rounds == 7 else a.rounds
    device = torch.device("cuda" if torch.cuda.is_available() and packed_dispatch.triton_available() else "cpu")
    wbytes = {"float32": size * size * 4, "float16": size * size * 2}
    wbytes.update({f"{b}-bit packed": packed_ref.packed_words(size, b) * size * 4 + 2 * size * 4 for b in (3, 4, 8)})
    res = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": device.type, "quick": a.quick,
           "size": size, "weight_bytes": wbytes, "runs": [bench(size, b, rounds, device) for b in a.batches]}
    return write_results(a.out, "packed", res, to_markdown(res))


if __name__ == "__main__":
    main()
