"""Compare the integer executor with the PyTorch fake-quant model, code for code.

The contract checked here (see ``docs/export.md``): for every sample, the integer codes of every
quantized layer's input (what its input quantizer produces in PyTorch, ``round(y / s)`` of the
fake-quant output ``y``) equal the executor's codes, and the float logits agree within a
tolerance (the executor's bias is rounded to accumulator units; PyTorch adds the float bias).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import numpy as np
import torch
from torch import nn

from mpq_plugin.export.executor import IntegerExecutor
from mpq_plugin.export.plan import Bundle
from mpq_plugin.nn.layers import quant_layers


def torch_codes(model: nn.Module, x: torch.Tensor) -> tuple:
    """``(logits, {layer: input codes})`` of the PyTorch model in eval mode."""
    codes: Dict[str, torch.Tensor] = {}
    hooks = []
    for name, layer in quant_layers(model):
        q = layer.input_quantizer
        if q is None:
            continue
        scale = q.freeze().scale.reshape(())

        def hook(mod, args, out, name=name, scale=scale):
            codes[name] = torch.round(out.detach() / scale).to(torch.int64)
        hooks.append(q.register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            y = model(x)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return y, codes


#: a requantization input this close (in code units) to a rounding tie is decided by float32
#: rounding in PyTorch when scales are not powers of two
TIE_TOLERANCE = 1e-4


@dataclass
class Agreement:
    """Per-sample agreement of the integer executor with PyTorch.

    ``code_mismatches``: per layer, samples with any differing input code. ``unexplained``:
    samples whose *first* differing layer has a differing code that is not within
    :data:`TIE_TOLERANCE` of a rounding tie (0 means every disagreement is PyTorch's float32
    rounding at a tie; with power-of-two scales there are none at all). ``max_abs_logit_diff``
    is over the samples whose codes all agree.
    """

    samples: int
    code_mismatches: Dict[str, int]
    unexplained: int
    max_abs_logit_diff: float
    argmax_agreement: int

    @property
    def total_mismatches(self) -> int:
        return sum(self.code_mismatches.values())


def compare(model: nn.Module, bundle: Bundle, x: torch.Tensor) -> Agreement:
    """Run both on ``x`` and count per-sample code mismatches per layer."""
    y, tc = torch_codes(model, x)
    tr = IntegerExecutor(bundle).run(x.detach().cpu().numpy())
    n = x.shape[0]
    mism: Dict[str, int] = {}
    settled = np.zeros(n, dtype=bool)  # sample already had a mismatch in an earlier layer
    unexplained = 0
    for name, c in tc.items():  # module order == execution order for chain models
        a, b = c.cpu().numpy(), tr.codes[name]
        diff = (a != b).reshape(n, -1)
        bad = diff.any(axis=1)
        mism[name] = int(bad.sum())
        first = bad & ~settled
        if first.any():
            pre = tr.requant_values.get(name)
            if pre is None:
                unexplained += int(first.sum())
            else:
                dist = np.abs(np.abs(pre - np.floor(pre)) - 0.5).reshape(n, -1)
                near = np.where(diff, dist <= TIE_TOLERANCE, True).all(axis=1)
                unexplained += int((first & ~near).sum())
        settled |= bad
    yf = y.detach().cpu().double().numpy()
    yi = tr.output_float.reshape(yf.shape)
    ok = ~settled
    return Agreement(samples=n, code_mismatches=mism, unexplained=unexplained,
                     max_abs_logit_diff=float(np.max(np.abs(yf - yi)[ok], initial=0.0)),
                     argmax_agreement=_argmax_agreement(yf, yi))


def _argmax_agreement(a: np.ndarray, b: np.ndarray) -> int:
    """Samples whose argmax agrees: over axis 1 for ``(N, C[, H, W])`` outputs; for token outputs
    ``(N, T, F)`` of a token-wise graph over the features of every token (all tokens must agree)."""
    if a.ndim == 3:
        return int((a.argmax(-1) == b.argmax(-1)).all(axis=1).sum())
    return int((a.argmax(1) == b.argmax(1)).reshape(a.shape[0], -1).all(axis=1).sum())
