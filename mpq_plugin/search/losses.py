"""Finetune losses: knowledge distillation and SDQ's entropy-aware bin regularization (EBR).

* :func:`kd_loss`: soft-label cross-entropy against a teacher's logits (MEAL / Label-Refinery
  style, as the SDQ author's later code uses; algorithms.md §4.2), optionally with a temperature.
* :func:`bin_regularization`: Bin Regularization (Xu et al., ICCV 2021): for each quantization
  bin ``j`` (the weights whose integer code is ``j``),
  ``(mean(w_j) - q_j)^2 + Var(w_j)`` (variance only for bins with >= 2 elements), summed over
  bins; ``form="vvtq"`` is the SDQ author's later code form
  ``mean((clip(w) - sg(w_q))^2) + sum_{|bin|>1} Var_unbiased(w_j)``.
* :func:`entropy_aware_bin_regularization`: BR over every quantized layer with fixed bits,
  weighted per layer. **[U] reconstruction**: SDQ's "entropy-aware" weighting is not public;
  the default weight is the layer's code-histogram entropy per stored bit, ``H(codes) / b``
  (``= H / H_max``): layers whose codes carry more information per bit are regularized more,
  collapsed histograms (few used bins) less, and at equal entropy lower-bit layers more, which
  reads the summary's "keeps information-carrying components while considering the precision
  difference between layers". Alternatives in :data:`ENTROPY_WEIGHTS` or any callable.

Everything is vectorized (``bincount``/``index_add``), differentiable with respect to the
weights and, for :func:`bin_regularization` in the ``br`` form, the scale.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Dict, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from mpq_plugin.core.state import QuantState
from mpq_plugin.nn.layers import quant_layers

log = logging.getLogger(__name__)

__all__ = [
    "ENTROPY_WEIGHTS",
    "bin_regularization",
    "code_entropy",
    "entropy_aware_bin_regularization",
    "kd_loss",
]

BR_FORMS = ("br", "vvtq")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0, *,
            mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Soft-label cross-entropy ``-sum_c softmax(z_T/t)_c log softmax(z_S/t)_c * t^2``.

    Averaged over every position: all dimensions but the last (classes / vocabulary) are
    flattened, so ``(batch, classes)`` and ``(batch, tokens, vocab)`` both work. The teacher is
    detached. Half-precision logits are promoted to float32.

    Args:
        mask: optional boolean tensor of the leading shape selecting the positions to average
            (e.g. an attention mask); an all-false mask gives 0.

    Example:
        >>> s, t = torch.zeros(2, 3), torch.zeros(2, 3)
        >>> round(float(kd_loss(s, t)), 4)   # log(3): uniform vs uniform
        1.0986
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    c = student_logits.shape[-1]
    s = student_logits.reshape(-1, c)
    t = teacher_logits.detach().reshape(-1, c)
    if s.dtype in (torch.float16, torch.bfloat16):
        s, t = s.float(), t.float()
    per = -(F.softmax(t.to(s.dtype) / temperature, dim=-1) * F.log_softmax(s / temperature, dim=-1)).sum(-1)
    if mask is not None:
        m = mask.reshape(-1).to(torch.bool)
        if m.numel() != per.numel():
            raise ValueError(f"mask has {m.numel()} positions, logits have {per.numel()}")
        per = per[m]
        if per.numel() == 0:
            return s.sum() * 0.0
    return per.mean() * (temperature * temperature)


def _per_channel(p: torch.Tensor, n: int) -> torch.Tensor:
    p = p.reshape(-1)
    return p.expand(n) if p.numel() == 1 else p


def bin_regularization(w: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                       zero_point: Union[torch.Tensor, float] = 0.0, *, axis: Optional[int] = None,
                       form: str = "br", qmin: Optional[float] = None, qmax: Optional[float] = None) -> torch.Tensor:
    """Bin Regularization of one tensor.

    Args:
        w: the float tensor (weights), any shape.
        codes: its integer codes (same shape), e.g. ``quantizer.freeze(w).codes``.
        scale: step, shape ``()`` or ``(C,)`` along ``axis`` (per-channel: bins are per channel
            and code, each with target level ``(j - z_c) * s_c``).
        zero_point: same shape as ``scale`` (or a number).
        form: ``br`` (ICCV 2021: ``sum_j (mean(w_j) - q_j)^2 + Var_pop(w_j)``, bins with >= 2
            elements for the variance; gradient to ``w`` and ``scale``) or ``vvtq`` (author's later
            code: ``mean((clip(w) - sg(q(w)))^2) + sum_j Var_unbiased(clip(w)_j)``, clipping to
            ``[(qmin - z) s, (qmax - z) s]`` when ``qmin``/``qmax`` are given).

    Returns:
        A scalar tensor (sum over bins).
    """
    if form not in BR_FORMS:
        raise ValueError(f"form={form!r}; use one of {BR_FORMS}")
    if codes.shape != w.shape:
        raise ValueError(f"codes {tuple(codes.shape)} must have the weight's shape {tuple(w.shape)}")
    scale = torch.as_tensor(scale, device=w.device).to(w.dtype)
    zp = torch.as_tensor(zero_point, device=w.device).to(w.dtype)
    n_el = w.numel()
    if n_el == 0:
        return w.sum() * 0.0
    channels = scale.numel()
    if channels > 1 or zp.numel() > 1:
        if axis is None:
            raise ValueError("a per-channel scale needs axis= (the channel axis of w)")
        channels = max(channels, zp.numel())
        shape = [1] * w.dim()
        shape[axis] = -1
        ch = torch.arange(channels, device=w.device).reshape(shape).expand_as(w).reshape(-1)
    else:
        ch = torch.zeros(n_el, dtype=torch.long, device=w.device)
    s_c, z_c = _per_channel(scale, channels), _per_channel(zp, channels)
    wf = w.reshape(-1)
    c = codes.reshape(-1).to(torch.long)
    cmin = int(c.min())
    k = int(c.max()) - cmin + 1
    b = ch * k + (c - cmin)  # (N,) bin id
    if channels * k <= 4 * n_el + 1024:
        nb = channels * k
        bin_ids = torch.arange(nb, device=w.device)
    else:  # sparse: only the bins that occur
        bin_ids, b = torch.unique(b, return_inverse=True)
        nb = bin_ids.numel()
    bin_code = (bin_ids % k + cmin).to(w.dtype)
    bin_ch = bin_ids // k
    count = torch.bincount(b, minlength=nb).to(w.dtype)  # (B,)
    safe = count.clamp_min(1.0)
    if form == "vvtq":
        with torch.no_grad():
            wq = (c.to(w.dtype) - z_c[ch]) * s_c[ch]
        if qmin is not None and qmax is not None:
            wf = torch.clamp(wf, min=(qmin - z_c[ch]) * s_c[ch], max=(qmax - z_c[ch]) * s_c[ch])
        first = ((wf - wq) ** 2).mean()
    mean = torch.zeros(nb, dtype=w.dtype, device=w.device).index_add(0, b, wf) / safe
    dev2 = torch.zeros(nb, dtype=w.dtype, device=w.device).index_add(0, b, (wf - mean[b]) ** 2)
    multi = count >= 2
    if form == "vvtq":
        var = dev2 / (count - 1.0).clamp_min(1.0)
        return first + torch.where(multi, var, torch.zeros_like(var)).sum()
    target = (bin_code - z_c[bin_ch]) * s_c[bin_ch]  # (B,) levels, differentiable in the scale
    mse = torch.where(count > 0, (mean - target) ** 2, torch.zeros_like(mean)).sum()
    var = torch.where(multi, dev2 / safe, torch.zeros_like(dev2)).sum()
    return mse + var


def code_entropy(codes: torch.Tensor) -> float:
    """Shannon entropy (bits) of the histogram of integer codes."""
    c = codes.reshape(-1).to(torch.long)
    if c.numel() == 0:
        return 0.0
    p = torch.bincount(c - c.min()).double() / c.numel()
    p = p[p > 0]
    return float(-(p * torch.log2(p)).sum())


EntropyWeight = Callable[[QuantState], float]


def _entropy_per_bit(st: QuantState) -> float:
    return code_entropy(st.codes) / st.bits  # type: ignore[arg-type]


def _deficit(st: QuantState) -> float:
    return max(st.bits - code_entropy(st.codes), 0.0) / st.bits  # type: ignore[arg-type]


#: per-layer weights of :func:`entropy_aware_bin_regularization` ([U] reconstructions):
#: ``entropy_per_bit`` H/b (default), ``deficit`` (H_max - H)/H_max, ``inv_bits`` 1/b, ``none`` 1.
ENTROPY_WEIGHTS: Dict[str, EntropyWeight] = {
    "entropy_per_bit": _entropy_per_bit,
    "deficit": _deficit,
    "inv_bits": lambda st: 1.0 / st.bits,
    "none": lambda st: 1.0,
}

_warned: Dict[int, bool] = {}


def entropy_aware_bin_regularization(model: nn.Module, lam: float = 0.1,
                                     entropy_weight: Union[bool, str, EntropyWeight] = True, *,
                                     form: str = "br", only_fixed: bool = True) -> torch.Tensor:
    """SDQ's EBR: ``lam * sum_l weight_l * BR_l`` over quantized layers with fixed bits.

    Each layer's bins, levels and bit-width come from its weight quantizer's ``freeze(weight)``
    (codes, scale, zero point); the gradient flows to the weights (the frozen scale is a
    constant). Weight-replacing quantizers (CSQ) are skipped: their weights are codes already.

    Args:
        lam: ``lambda_E`` (0.1, the SDQ ablation's best [S]).
        entropy_weight: ``True`` (= ``"entropy_per_bit"``), ``False`` (= ``"none"``), a key of
            :data:`ENTROPY_WEIGHTS`, or a callable ``(QuantState) -> float``.
        form: see :func:`bin_regularization`.
        only_fixed: only layers whose bits are fixed (after ``freeze``); a model with none
            gives 0 and a one-time warning.

    Example:
        >>> loss = kd_loss(model(x), teacher(x)) + entropy_aware_bin_regularization(model)  # doctest: +SKIP
    """
    if entropy_weight is True:
        fn: EntropyWeight = ENTROPY_WEIGHTS["entropy_per_bit"]
    elif entropy_weight is False:
        fn = ENTROPY_WEIGHTS["none"]
    elif isinstance(entropy_weight, str):
        if entropy_weight not in ENTROPY_WEIGHTS:
            raise ValueError(f"entropy_weight={entropy_weight!r}; use one of {sorted(ENTROPY_WEIGHTS)} or a callable")
        fn = ENTROPY_WEIGHTS[entropy_weight]
    elif callable(entropy_weight):
        fn = entropy_weight
    else:
        raise TypeError(f"entropy_weight must be a bool, a name or a callable, got {entropy_weight!r}")
    terms = []
    device = torch.device("cpu")
    for name, layer in quant_layers(model):
        wq = layer.weight_quantizer
        w = layer.weight  # type: ignore[attr-defined]
        device = w.device
        if (only_fixed and not bool(wq.bits_fixed)) or wq.replaces_weight:
            continue
        st = wq.freeze(w)
        if st.codes is None:
            continue
        br = bin_regularization(w, st.codes.to(w.device), st.scale.to(w.device), st.zero_point.to(w.device),
                                axis=st.axis, form=form, qmin=st.qmin, qmax=st.qmax)
        factor = float(fn(st))
        if not math.isfinite(factor):
            raise ValueError(f"entropy weight of layer {name!r} is {factor}; check the entropy_weight function")
        terms.append(br * factor)
    if not terms:
        if not _warned.get(id(model)):
            log.warning("entropy_aware_bin_regularization: no quantized layer has fixed bits yet "
                        "(call search.freeze() / mpq_plugin.freeze() first); returning 0")
            _warned[id(model)] = True
        return torch.zeros((), device=device)
    return lam * torch.stack(terms).sum()
