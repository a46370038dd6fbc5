"""Quantization error (SQNR, dB) of every registered method at fixed 2/4/8 bits on a Gaussian
weight tensor, right after initialization (no training). Prints a markdown table.

Run: ``python -m benchmarks.sqnr``.
"""
from __future__ import annotations

import torch
from torch import nn

import mpq_plugin
from mpq_plugin.registry import get_method


def sqnr_db(method: str, bits: int, w: torch.Tensor) -> float:
    model = nn.Sequential(nn.Linear(w.shape[1], w.shape[0], bias=False))
    model[0].weight.data.copy_(w)
    wb = bits if not get_method(method).quantizer_cls.searches_bits else (bits, bits)
    mpq_plugin.quantize_(model, mpq_plugin.MPQConfig(method=method, weight_bits=wb, act_bits=None))
    mpq_plugin.freeze(model)
    wq = model[0].quantized_weight().detach()
    return float(10 * torch.log10(w.pow(2).mean() / (wq - w).pow(2).mean()))


def main() -> None:
    torch.manual_seed(0)
    w = torch.randn(256, 512)
    print("| method | 2 bits | 4 bits | 8 bits |")
    print("|---|---|---|---|")
    for m in mpq_plugin.list_methods():
        row = [f"{sqnr_db(m, b, w):.2f}" for b in (2, 4, 8)]
        print(f"| {m} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
