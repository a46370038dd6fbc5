"""A run directory's deployable model: stored frozen, rebuilt and exported by ``mpq export``.

The models a search trains keep BatchNorm float and (vision adapter default) the image float,
which no integer path can execute. The deployable model is the searched plan re-trained as it
will run: every layer's weight at the plan's bits (``learned_range``, power-of-two steps,
ties to even), BN folded into the conv, 8-bit activations including the network input.
:func:`save_deployable` writes ``RUN_DIR/export/model.pt`` (state dict + model name/kwargs +
``MPQConfig`` + plan + check samples); :func:`load_deployable` rebuilds the frozen model from it
bit for bit; :func:`export_run` writes the integer bundle, QONNX or ONNX Q/DQ next to it and
checks each against PyTorch with its consumer (integer executor, qonnx, onnxruntime).
"""
from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from mpq_plugin.config import MPQConfig

log = logging.getLogger(__name__)

EXPORT_DIR = "export"
MODEL_FILE = "model.pt"
FORMAT = 1
FORMATS = ("int", "qonnx", "onnx")
#: the vision adapter policy of deployable models (rebuilt the same way by ``load_deployable``)
POLICY = dict(quantize_first_input=True, fold_bn=True, first_layer_bits="same", last_layer_bits="same")


def deployable_config(weight_bits: Mapping[str, int], act_bits: int = 8) -> MPQConfig:
    """``learned_range`` at fixed per-layer weight bits (a plan), power-of-two steps, ties to even:
    exact in the integer executor and accepted by every export format."""
    if not weight_bits:
        raise ValueError("deployable_config needs the plan's per-layer weight bits, got none")
    bits = {k: int(v) for k, v in weight_bits.items()}
    lo, hi = min(bits.values()), max(bits.values())
    return MPQConfig(method="learned_range", weight_bits=(lo, hi), act_bits=act_bits,
                     layer_overrides={k: {"weight_bits": (b, b)} for k, b in bits.items()},
                     options={"pow2_step": True, "rounding": "half_even"})


def _builtin_models() -> Dict[str, Callable[..., nn.Module]]:
    from mpq_plugin import models

    return {"small_cnn": models.SmallCNN, "resnet20": models.resnet20, "mobilenet_v2": models.mobilenet_v2}


def make_model(name: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """A float model from a built-in name or ``package.module:callable``."""
    fn = _builtin_models().get(name)
    if fn is None:
        mod, sep, attr = name.partition(":")
        if not sep:
            raise ValueError(f"model {name!r}: not a built-in ({sorted(_builtin_models())}) nor 'module:callable'")
        fn = getattr(importlib.import_module(mod), attr)
    return fn(**dict(kwargs))


def quantize_deployable_(model: nn.Module, config: MPQConfig, example: torch.Tensor) -> nn.Module:
    """Quantize a float model the deployable way (:data:`POLICY`), in place."""
    from mpq_plugin.adapters.vision import quantize_vision_

    model.eval()
    return quantize_vision_(model, config, (example,), **POLICY)


def save_deployable(model: nn.Module, run_dir: Union[str, Path], *, model_name: str,
                    model_kwargs: Mapping[str, Any], samples: torch.Tensor,
                    info: Optional[Mapping[str, Any]] = None) -> Path:
    """Write a frozen deployable model to ``run_dir/export/model.pt``.

    ``samples``: inputs stored with it (the check set of ``mpq export``; a few hundred).
    ``info``: JSON-able facts shown by ``mpq export`` (source row, accuracy, ...).
    """
    config = getattr(model, "_mpq_config", None)
    if config is None:
        raise ValueError("save_deployable needs a model quantized by quantize_deployable_ (no _mpq_config found)")
    from mpq_plugin.api import freeze

    plan = freeze(model)  # idempotent for a frozen model; records the plan
    out = Path(run_dir) / EXPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    record = {"format": FORMAT, "model": {"name": model_name, "kwargs": dict(model_kwargs)},
              "mpq_config": config.to_json(), "plan": plan.to_json(), "policy": dict(POLICY),
              "samples": samples.detach().cpu().float().clone(), "state_dict": model.state_dict(),
              "info": json.loads(json.dumps(dict(info or {})))}
    path = out / MODEL_FILE
    tmp = path.with_suffix(".tmp")
    torch.save(record, tmp)
    tmp.replace(path)
    return path


def find_model_file(run_dir: Union[str, Path]) -> Path:
    p = Path(run_dir)
    for cand in (p / EXPORT_DIR / MODEL_FILE, p / MODEL_FILE, p):
        if cand.is_file():
            return cand
    if not p.exists():
        raise FileNotFoundError(f"{run_dir} does not exist")
    raise FileNotFoundError(f"{p / EXPORT_DIR / MODEL_FILE} does not exist: this run has no deployable model. "
                            "`mpq demo` writes one at its end (rerun it, or `mpq demo --resume` to finish)")


def load_deployable(run_dir: Union[str, Path]) -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild the frozen deployable model of a run directory; returns ``(model, record)``."""
    path = find_model_file(run_dir)
    rec = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(rec, dict) or rec.get("format") != FORMAT:
        raise ValueError(f"{path} is not a deployable model file of format {FORMAT}")
    config = MPQConfig.from_dict(json.loads(rec["mpq_config"]))
    model = make_model(rec["model"]["name"], rec["model"]["kwargs"])
    from mpq_plugin.adapters.vision import quantize_vision_
    from mpq_plugin.api import freeze

    model.eval()
    quantize_vision_(model, config, (rec["samples"][:8],), **rec["policy"])
    freeze(model)
    model.load_state_dict(rec["state_dict"])
    return model.eval(), rec


# -- exports -------------------------------------------------------------------------------------------------
def _check_int(model: nn.Module, out: Path, x: torch.Tensor) -> Dict[str, Any]:
    from mpq_plugin.export import compare, read_bundle, to_integer_params
    from mpq_plugin.export.readme import width_table

    to_integer_params(model, out / "int_bundle")
    bundle = read_bundle(out / "int_bundle")  # check what is on disk
    a = compare(model, bundle, x)
    return {"path": str(out / "int_bundle"), "samples": a.samples, "code_mismatch_samples": a.code_mismatches,
            "unexplained": a.unexplained, "argmax_agreement": a.argmax_agreement,
            "max_abs_logit_diff": a.max_abs_logit_diff, "width_table": width_table(bundle)}


def _run_each(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
    return np.concatenate([fn(x[i:i + 1]) for i in range(x.shape[0])])


def _check_qonnx(model: nn.Module, out: Path, x: torch.Tensor, y: np.ndarray) -> Dict[str, Any]:
    from mpq_plugin.export import to_qonnx

    path = to_qonnx(model, (x[:1],), out / "model.qonnx.onnx")
    res: Dict[str, Any] = {"path": str(path)}
    try:
        from qonnx.core.modelwrapper import ModelWrapper
        from qonnx.core.onnx_exec import execute_onnx
        from qonnx.util.cleanup import cleanup_model
    except ImportError:
        res["checked"] = "qonnx is not installed (pip install -e .[export])"
        return res
    mw = cleanup_model(ModelWrapper(str(path)))
    iname, oname = mw.graph.input[0].name, mw.graph.output[0].name
    got = _run_each(lambda b: execute_onnx(mw, {iname: b})[oname], x.numpy())
    return {**res, **_agreement("qonnx execute_onnx", got, y)}


def _check_onnx(model: nn.Module, out: Path, x: torch.Tensor, y: np.ndarray) -> Dict[str, Any]:
    from mpq_plugin.export import to_onnx_qdq

    path = to_onnx_qdq(model, (x[:1],), out / "model.qdq.onnx")
    res: Dict[str, Any] = {"path": str(path)}
    try:
        import onnxruntime as ort
    except ImportError:
        res["checked"] = "onnxruntime is not installed"
        return res
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # its QDQ fusion rounds differently
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    iname = sess.get_inputs()[0].name
    got = _run_each(lambda b: sess.run(None, {iname: b})[0], x.numpy())
    return {**res, **_agreement("onnxruntime (ORT_DISABLE_ALL)", got, y)}


def _agreement(consumer: str, got: np.ndarray, y: np.ndarray) -> Dict[str, Any]:
    return {"checked": consumer, "samples": int(y.shape[0]),
            "exact_samples": int((got == y).reshape(y.shape[0], -1).all(axis=1).sum()),
            "argmax_agreement": int((got.argmax(1) == y.argmax(1)).sum()),
            "max_abs_diff": float(np.abs(got - y).max())}


def export_run(run_dir: Union[str, Path], formats: Sequence[str] = FORMATS, out_dir: Optional[Union[str, Path]] = None,
               samples: Optional[int] = None) -> Dict[str, Any]:
    """Export a run's deployable model in ``formats`` and check each against PyTorch.

    Writes under ``out_dir`` (default ``RUN_DIR/export``): ``int_bundle/``, ``model.qonnx.onnx``,
    ``model.qdq.onnx`` and ``export.json`` (the check figures). ``samples`` limits the check set.
    """
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"unknown export format(s) {bad or list(formats)}; use one or more of {list(FORMATS)}")
    model, rec = load_deployable(run_dir)
    out = Path(out_dir) if out_dir is not None else find_model_file(run_dir).parent
    out.mkdir(parents=True, exist_ok=True)
    x = rec["samples"] if samples is None else rec["samples"][:samples]
    with torch.no_grad():
        y = model(x).numpy()
    summary: Dict[str, Any] = {"run_dir": str(run_dir), "info": rec["info"], "plan": json.loads(rec["plan"]),
                               "formats": {}}
    checks = {"int": lambda: _check_int(model, out, x), "qonnx": lambda: _check_qonnx(model, out, x, y),
              "onnx": lambda: _check_onnx(model, out, x, y)}
    for f in dict.fromkeys(formats):
        summary["formats"][f] = checks[f]()
    prev = out / "export.json"
    if prev.is_file():  # keep the figures of formats exported earlier
        old = json.loads(prev.read_text()).get("formats", {})
        summary["formats"] = {**old, **summary["formats"]}
    prev.write_text(json.dumps(summary, indent=2))
    return summary


def format_summary(summary: Mapping[str, Any], formats: Optional[Sequence[str]] = None) -> str:
    """Human-readable lines of :func:`export_run`'s result (the CLI prints them)."""
    lines = []
    info = summary.get("info") or {}
    if info:
        lines.append("deployable model: " + ", ".join(f"{k} {v}" for k, v in info.items() if not isinstance(v, dict)))
    for f, r in summary["formats"].items():
        if formats is not None and f not in formats:
            continue
        if f == "int":
            mism = sum(r["code_mismatch_samples"].values())
            lines.append(f"int    {r['path']}: {r['samples']} samples, code mismatches {mism} "
                         f"(unexplained {r['unexplained']}), argmax agreement {r['argmax_agreement']}/{r['samples']}, "
                         f"max |logit diff| {r['max_abs_logit_diff']:.2e}")
            head = (f"  {'layer':<12} {'op':<13} {'fan-in':>6} {'act':>4} {'weight':>7} {'bias(frac)':>10} "
                    f"{'acc bits':>8}  requant")
            lines.append(head)
            for w in r["width_table"]:
                lines.append(f"  {w['layer']:<12} {w['op']:<13} {w['fan_in']:>6} {w['act']:>4} {w['weight']:>7} "
                             f"{str(w['bias_bits']) + '(' + str(w['bias_frac_bits']) + ')':>10} {w['acc_bits']:>8}  "
                             f"{w['requant']}")
        elif "samples" in r:
            lines.append(f"{f:<6} {r['path']}: {r['checked']}: {r['exact_samples']}/{r['samples']} samples equal "
                         f"PyTorch exactly, argmax agreement {r['argmax_agreement']}/{r['samples']}, "
                         f"max |diff| {r['max_abs_diff']:.2e}")
        else:
            lines.append(f"{f:<6} {r['path']} (not checked: {r.get('checked')})")
    return "\n".join(lines)
