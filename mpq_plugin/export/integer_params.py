"""``to_integer_params(model, out_dir)``: the public entry of the integer bundle export."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Union

from torch import nn

from mpq_plugin.export.bundle_io import write_bundle
from mpq_plugin.export.plan import Bundle, plan

log = logging.getLogger(__name__)


def to_integer_params(model: nn.Module, out_dir: Union[str, Path], *, bias_frac_bits: Union[int, str] = "auto",
                      scales: str = "dyadic", pow2_tolerance: float = 0.0, mult_bits: int = 24,
                      max_bits: int = 16, packed: bool = False, thresholds: bool = False) -> Bundle:
    """Export a frozen quantized model as an integer bundle under ``out_dir``.

    Args:
        model: quantized (``mpq_plugin.quantize_``), frozen (``mpq_plugin.freeze``) and run at
            least once (layer shapes are recorded by a forward pass). Eval semantics are exported
            (fused Conv-BN layers use their running statistics).
        out_dir: directory for ``manifest.json``, ``layers/``, ``arrays/`` and ``README.md``.
        bias_frac_bits: extra fractional bits of the bias below the accumulator unit
            ``s_x * s_w``. ``0`` is the FINN/hls4ml convention (bias at ``s_x * s_w``) and is
            code-exact with PyTorch only when the float biases lie on that grid. ``"auto"``
            (default) picks per layer the fewest bits that keep the bias rounding error below
            ``2^-16`` of the next activation step (``2^-9`` output units for the last layer),
            which kept the executor code-exact with the float model on every model tested;
            see ``docs/export.md``.
        scales: ``"dyadic"`` (requantization multipliers ``m * 2^-k``, any scale) or ``"pow2"``
            (every multiplier must be a power of two within ``pow2_tolerance`` relative
            error, as hls4ml's ``ap_fixed`` path needs; otherwise a ``ValueError`` lists the
            error per layer).
        mult_bits: width of the dyadic multipliers ``m`` (sign included).
        max_bits: the largest weight/activation bit-width the bundle accepts.
        packed: also write weight codes as bit-streams at their exact bit-width
            (:mod:`mpq_plugin.export.packing`).
        thresholds: also write FINN-style integer thresholds for every requantization
            (:mod:`mpq_plugin.export.thresholds`; ``2^b - 1`` per feature for ``b``-bit codes).

    Returns:
        the in-memory :class:`~mpq_plugin.export.plan.Bundle` (also written to disk).
    """
    if scales not in ("dyadic", "pow2"):
        raise ValueError(f"scales={scales!r}; use 'dyadic' or 'pow2'")
    bundle = plan(model, bias_frac_bits=bias_frac_bits, mult_bits=mult_bits, pow2_tolerance=pow2_tolerance,
                  max_bits=max_bits)
    if scales == "pow2":
        _require_pow2(bundle, pow2_tolerance)
    if thresholds:
        from mpq_plugin.export.thresholds import add_thresholds

        add_thresholds(bundle)
    path = write_bundle(bundle, out_dir, packed=packed)
    log.info("integer bundle written to %s (%d layers)", path, len(bundle.layers))
    return bundle


def _require_pow2(bundle: Bundle, tol: float) -> None:
    import numpy as np

    bad = []
    for name, li in bundle.layers.items():
        req = li["input"]["requant"]
        if req is None or req["exact_pow2"]:
            continue
        m = bundle.arrays[req["multiplier_file"]].astype(np.float64)
        k = bundle.arrays[req["shift_file"]].astype(np.float64)
        r = np.abs(m) * 2.0 ** (-k)
        err = float(np.max(np.abs(r / 2.0 ** np.round(np.log2(r)) - 1)))
        if err > tol:
            bad.append(f"layer {name}: requantization multiplier is {err:.3g} (relative) from a power of two")
        else:  # snap to the nearest power of two (within tolerance)
            e = np.round(np.log2(r)).astype(np.int64)
            bundle.arrays[req["multiplier_file"]] = np.sign(m).astype(np.int64)
            bundle.arrays[req["shift_file"]] = -e
            req.update(exact_pow2=True, snapped_to_pow2=True, max_rel_error=err)
    if bad:
        raise ValueError("scales='pow2' but these layers' scales are not powers of two within "
                         f"pow2_tolerance={tol}: " + "; ".join(bad)
                         + ". Export with scales='dyadic' (integer multiplier m*2^-k), or train with "
                         "power-of-two steps (learned_range pow2_step=True)")
