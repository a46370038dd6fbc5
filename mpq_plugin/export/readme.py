"""The README written into every integer bundle: how a hardware engineer reads it."""
from __future__ import annotations

from typing import Any, Dict, List

from mpq_plugin.export.plan import Bundle


def width_table(bundle: Bundle) -> List[Dict[str, Any]]:
    """One row per quantized layer: the widths a hardware implementation needs."""
    rows = []
    for name, li in bundle.layers.items():
        req = li["input"]["requant"]
        rows.append(dict(
            layer=name, op=li["op"], fan_in=li["accumulator"]["fan_in"],
            act=f"{'s' if li['input']['signed'] else 'u'}{li['input']['bits']}",
            act_scale=li["input"]["scale_pow2_exponent"] if li["input"]["scale_pow2_exponent"] is not None
            else li["input"]["scale"],
            weight=f"{'s' if li['weight']['signed'] else 'u'}{li['weight']['bits']}"
            + (" bipolar" if li["weight"]["encoding"] == "bipolar" else ""),
            bias_bits=li["bias"]["bits"], bias_frac_bits=li["bias"]["frac_bits"],
            acc_bits=li["accumulator"]["bits"],
            acc_bits_formula=li["accumulator"]["bits_formula"],
            requant="float input" if req is None else ("shift" if req["exact_pow2"] else "dyadic m*2^-k"),
        ))
    return rows


def markdown_table(bundle: Bundle) -> str:
    rows = width_table(bundle)
    head = ("| layer | op | fan-in | input act | act scale (2^e or float) | weight | bias bits (frac) | "
            "accumulator bits (exact bound) | bits_x+bits_w+ceil(log2 fan-in) | requant |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['op']} | {r['fan_in']} | {r['act']} | {r['act_scale']} | {r['weight']} | "
                     f"{r['bias_bits']} ({r['bias_frac_bits']}) | {r['acc_bits']} | {r['acc_bits_formula']} | {r['requant']} |")
    return "\n".join(lines)


def bundle_readme(bundle: Bundle, files: Dict[str, Dict[str, Any]]) -> str:
    fs = sorted({li["bias"]["frac_bits"] for li in bundle.layers.values()})
    f = str(fs[0]) if len(fs) == 1 else "f"
    graph = " -> ".join(e["op"] + (f"({e['name']})" if "layer" in e else "") for e in bundle.manifest["graph"])
    return f"""# Integer bundle (mpq_plugin, format {bundle.manifest['format']} v{bundle.manifest['version']})

Graph: `{graph}`

## Files
- `manifest.json`: the op chain in execution order, the input/output description, options, and
  every array with its dtype and shape.
- `layers/<layer>.json`: one per quantized layer (op, attributes, weight/input/bias/accumulator
  widths, scales, requantization parameters).
- `arrays/*.npy`: integer tensors in the smallest integer dtype holding them (load with
  `numpy.load`). `<layer>.weight` (O, I/groups, kh, kw) or (O, I): weight codes;
  `<layer>.bias`: bias in accumulator units; `<layer>.requant_m` / `<layer>.requant_k`:
  requantization multiplier and shift per input feature (or one value); `output.unit`
  (float64): real value of one step of the output integers.

## Arithmetic (integers only)
1. Network input: `x_code = clamp(round(x / s_in), code_min, code_max)` with the first layer's
   `input` entry (the only float step; feed integer codes directly in hardware).
2. Quantized layer: `N = (sum x_code * w_code) << {f} + bias` (int accumulator; `f` is the
   layer's `bias.frac_bits`, here {', '.join(map(str, fs))}; one step of `N` is `s_x * s_w[c] * 2^-{f}`).
   Weight zero point is 0; weights are
   signed (`narrow` says whether the most negative code is unused; `bipolar` weights are ±1).
3. ReLU: `max(N, 0)`. Max pooling: max over the window. Average pooling: integer window **sum**
   (the divisor is folded into the next multiplier).
4. Requantization at the next layer's input:
   `code = clamp(round_shift(N * m, k), code_min, code_max)` where `round_shift(v, k)` is
   `v / 2^k` rounded with the input quantizer's `rounding` (`half_even`: ties to even, as
   `torch.round` / ONNX / hls4ml `AP_RND_CONV`; `half_away`: ties away from zero).
   When `exact_pow2` is true, `m = ±1` and this is a plain rounding shift. When
   `requant.thresholds_file` is present (export with `thresholds=True`), the same codes are
   `code_min + count(N >= t[feature, j])` (FINN MultiThreshold style).
5. Output: integer logits `N`; real value `N * unit`.

## Widths
`accumulator.bits` is a guarantee: the worst case over all input codes in range, computed from
the actual weight codes and bias (it is never exceeded). `bits_formula` is the usual
`bits_x + bits_w + ceil(log2 fan_in)` for comparison. Pooling sums carry `sum_bits`;
requantization products carry `product_bits`. For hls4ml, set `accum_t` to at least
`accumulator.bits` and, for pooling layers, `sum_bits`.

{markdown_table(bundle)}
"""
