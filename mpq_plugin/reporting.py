"""Run reports: ``RUN_DIR/report.json``, a text table and PNG plots.

A report is a plain dict (see :func:`write_report`); each entry of ``report["rows"]`` is one
quantized model: a searched method or a baseline at one budget. Plots are drawn with
matplotlib's Agg canvas (no pyplot, no global backend change), imported only when plotting.

* ``bits_per_layer.png``: weight bits per layer, one bar per method, one panel per budget;
* ``bit_evolution.png``: per-layer and average weight bits during each search;
* ``accuracy_vs_size.png``: accuracy against weight memory, uniform LSQ joined by a line, the
  float model as a dashed line.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

REPORT_NAME = "report.json"
TABLE_NAME = "table.txt"
PLOTS = ("bits_per_layer.png", "bit_evolution.png", "accuracy_vs_size.png")
REPORT_VERSION = 1
_INSTALL_HINT = "pip install mpq_plugin[search]"

PathLike = Union[str, Path]

__all__ = ["REPORT_NAME", "PLOTS", "write_report", "read_report", "format_table", "fill_baselines",
           "baseline_accuracies", "plot_bits_per_layer",
           "plot_bit_evolution", "plot_accuracy_vs_size", "render_plots", "render_report", "downsample_history"]


# -- json -------------------------------------------------------------------------------------------
def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if hasattr(obj, "item"):  # numpy / torch scalars
        return _jsonable(obj.item())
    if hasattr(obj, "to_dict"):
        return _jsonable(obj.to_dict())
    return str(obj)


def write_report(run_dir: PathLike, report: Mapping[str, Any]) -> Path:
    """Write ``run_dir/report.json`` atomically (a temp file, then ``os.replace``)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = dict(report)
    data.setdefault("version", REPORT_VERSION)
    path = run_dir / REPORT_NAME
    tmp = run_dir / f".{REPORT_NAME}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(_jsonable(data), indent=2, sort_keys=False))
    os.replace(tmp, path)
    return path


def read_report(run_dir: PathLike) -> Dict[str, Any]:
    """Load ``run_dir/report.json``; a missing or malformed file raises ``ValueError`` saying so."""
    path = Path(run_dir) / REPORT_NAME
    if not path.is_file():
        raise ValueError(f"{path} does not exist: RUN_DIR must be a directory written by `mpq demo` or `mpq search`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ValueError(f"{path} has no 'rows' list; it was not written by mpq")
    return data


def downsample_history(history: Sequence[Mapping[str, Any]], max_points: int = 200) -> List[Dict[str, Any]]:
    """At most ``max_points`` records (evenly spaced, the last one kept), for compact reports."""
    h = [dict(r) for r in history]
    if len(h) <= max_points:
        return h
    stride = math.ceil(len(h) / max_points)
    out = h[::stride]
    if out[-1] is not h[-1]:
        out.append(h[-1])
    return out


# -- table ------------------------------------------------------------------------------------------
def _fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec)


def _pct(v: Optional[float]) -> Optional[float]:
    return None if v is None else 100.0 * v


def _delta(a: Optional[float], b: Optional[float]) -> str:
    if a is None or b is None:
        return "-"
    return f"{100.0 * (a - b):+.1f}"


def _time_ratio(row: Mapping[str, Any], lsq: Optional[Mapping[str, Any]]) -> str:
    """Search-phase wall time over uniform LSQ's first phase (the same number of QAT steps)."""
    if row.get("kind") != "searched" or lsq is None:
        return ""
    a, b = row.get("search_seconds"), lsq.get("search_seconds")
    if not a or not b:
        return "-"
    return f"{a / b:.2f}x"


def _budget_text(budget: Optional[Mapping[str, float]]) -> str:
    if not budget:
        return "-"
    if set(budget) == {"avg_weight_bits"}:
        return f"{budget['avg_weight_bits']:g}b"
    return ",".join(f"{k}={v:g}" for k, v in budget.items())


def _act_bits_text(row: Mapping[str, Any]) -> str:
    ab = row.get("act_bits")
    if isinstance(ab, list):
        vals = sorted({a for a in ab if a is not None})
        return "/".join(str(a) for a in vals) if vals else "float"
    return "float" if ab is None else str(ab)


_BASELINE_KEYS = {"uniform": "lsq", "hawq": "hawq", "rtn": "rtn"}


def _baseline_rows(rows: Sequence[Mapping[str, Any]]) -> Dict[str, Dict[str, Mapping[str, Any]]]:
    out: Dict[str, Dict[str, Mapping[str, Any]]] = {}
    for r in rows:
        key = _BASELINE_KEYS.get(str(r.get("kind")))
        if key is not None and not r.get("error"):
            out.setdefault(_budget_text(r.get("budget")), {})[key] = r
    return out


def baseline_accuracies(rows: Sequence[Mapping[str, Any]]) -> Dict[str, Dict[str, Optional[float]]]:
    """``{budget text: {"lsq"|"hawq"|"rtn": accuracy}}`` from the baseline rows of a report."""
    return {b: {k: r.get("accuracy") for k, r in d.items()} for b, d in _baseline_rows(rows).items()}


def fill_baselines(rows: Sequence[Dict[str, Any]]) -> None:
    """Set each row's ``baselines`` to the baseline accuracies at its budget (in place)."""
    acc = baseline_accuracies(rows)
    for r in rows:
        r["baselines"] = dict(acc.get(_budget_text(r.get("budget")), {}))


def format_table(report: Mapping[str, Any]) -> str:
    """The report's rows as an aligned text table (accuracy in %, deltas in points)."""
    base_by_budget = baseline_accuracies(report.get("rows", []))
    base_rows = _baseline_rows(report.get("rows", []))
    headers = ["budget", "method", "avg W bits", "weight KB", "act bits", "acc %", "float %",
               "vs LSQ", "vs HAWQ", "search s", "total s", "search/QAT"]
    lines: List[List[str]] = []
    for row in report.get("rows", []):
        ach = row.get("achieved") or {}
        base = row.get("baselines") or base_by_budget.get(_budget_text(row.get("budget")), {})
        if row.get("error"):
            lines.append([_budget_text(row.get("budget")), row.get("label", row.get("method", "?")),
                          "failed: " + str(row["error"]).splitlines()[0][:80]] + [""] * (len(headers) - 3))
            continue
        lines.append([
            _budget_text(row.get("budget")), str(row.get("label", row.get("method"))),
            _fmt(ach.get("avg_weight_bits"), ".3f"), _fmt(ach.get("weight_kb"), ".3f"), _act_bits_text(row),
            _fmt(_pct(row.get("accuracy")), ".2f"), _fmt(_pct(row.get("float_accuracy")), ".2f"),
            _delta(row.get("accuracy"), base.get("lsq")) if row.get("kind") != "uniform" else "",
            _delta(row.get("accuracy"), base.get("hawq")) if row.get("kind") != "hawq" else "",
            _fmt(row.get("search_seconds"), ".1f"), _fmt(row.get("total_seconds"), ".1f"),
            _time_ratio(row, base_rows.get(_budget_text(row.get("budget")), {}).get("lsq")),
        ])
    ok_lines = [r for r in lines if not r[2].startswith("failed:")]
    widths = [max([len(h)] + [len(r[i]) for r in (ok_lines if i >= 2 else lines)]) for i, h in enumerate(headers)]
    sep = "  "
    out = [sep.join(h.rjust(w) if i > 1 else h.ljust(w) for i, (h, w) in enumerate(zip(headers, widths))),
           sep.join("-" * w for w in widths)]
    for r in lines:
        if r[2].startswith("failed:"):
            out.append(sep.join([r[0].ljust(widths[0]), r[1].ljust(widths[1]), r[2]]))
        else:
            out.append(sep.join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    notes = []
    fl = report.get("float") or {}
    if fl.get("accuracy") is not None:
        notes.append(f"float model: accuracy {100 * fl['accuracy']:.2f}%, "
                     f"weights {_fmt(fl.get('weight_kb'), '.2f')} KB")
    for row in report.get("rows", []):
        pc = row.get("plan_cost") or {}
        raised, lowered = pc.get("repair_raised") or 0, pc.get("repair_lowered") or 0
        if row.get("kind") == "searched" and not row.get("error") and (raised or lowered):
            end = row.get("search_end_avg_weight_bits")
            final = (row.get("achieved") or {}).get("avg_weight_bits")
            notes.append(f"{row.get('label')} @ {_budget_text(row.get('budget'))}: the search ended at "
                         f"{_fmt(end, '.3f')} avg weight bits; freeze() moved bits up {raised:g} and down "
                         f"{lowered:g} step(s) to reach {_fmt(final, '.3f')}")
    notes.append("vs LSQ / vs HAWQ: accuracy difference in points with uniform LSQ QAT and HAWQ-V3-style "
                 "allocation + LSQ QAT at the same budget")
    notes.append("search/QAT: search wall time over uniform LSQ QAT's wall time for the same number of steps "
                 "(hawq's search s is its Hessian-trace allocation plus that QAT phase)")
    return "\n".join([line.rstrip() for line in out] + [""] + notes)


# -- plots ------------------------------------------------------------------------------------------
def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(f"plots need matplotlib: {_INSTALL_HINT}") from e
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _ok_rows(rows: Sequence[Mapping[str, Any]]) -> List[Mapping[str, Any]]:
    return [r for r in rows if not r.get("error")]


def _group_by_budget(rows: Sequence[Mapping[str, Any]]) -> Dict[str, List[Mapping[str, Any]]]:
    groups: Dict[str, List[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(_budget_text(r.get("budget")), []).append(r)
    return groups


def plot_bits_per_layer(rows: Sequence[Mapping[str, Any]], path: PathLike) -> Path:
    """Grouped bars of weight bits per layer (one bar per row), one panel per budget."""
    groups = _group_by_budget(_ok_rows(rows))
    n = max(len(groups), 1)
    fig = _figure(10, 3.2 * n)
    if not groups:
        fig.add_subplot(1, 1, 1).text(0.5, 0.5, "no completed run", ha="center")
        return _save(fig, path)
    for k, (budget, grp) in enumerate(groups.items()):
        ax = fig.add_subplot(n, 1, k + 1)
        layers: List[str] = []
        for r in grp:
            for name in (r.get("layers") or {}):
                if name not in layers:
                    layers.append(name)
        width = 0.8 / max(len(grp), 1)
        for j, r in enumerate(grp):
            lb = r.get("layers") or {}
            xs = [i + (j - (len(grp) - 1) / 2) * width for i in range(len(layers))]
            ys = [(lb.get(name) or {}).get("weight_bits", 0) or 0 for name in layers]
            ax.bar(xs, ys, width=width, label=str(r.get("label", r.get("method"))))
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(layers, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("weight bits")
        ax.set_title(f"weight bits per layer, budget {budget}")
        ax.legend(fontsize=7, ncol=min(len(grp), 4))
    return _save(fig, path)


def plot_bit_evolution(histories: Union[Sequence[Mapping[str, Any]], Mapping[str, Sequence[Mapping[str, Any]]]],
                       path: PathLike) -> Path:
    """Per-layer (thin) and average (thick) hard weight bits against the search step.

    Args:
        histories: one ``MPQSearch.history`` list, or ``{title: history}`` for several searches.
    """
    if not isinstance(histories, Mapping):
        histories = {"search": histories}
    items = [(t, h) for t, h in histories.items() if h]
    n = max(len(items), 1)
    cols = min(n, 3)
    nrows = math.ceil(n / cols)
    fig = _figure(4.5 * cols, 3.2 * nrows)
    if not items:
        fig.add_subplot(1, 1, 1).text(0.5, 0.5, "no search history (fixed-bit runs only)", ha="center")
        return _save(fig, path)
    for k, (title, hist) in enumerate(items):
        ax = fig.add_subplot(nrows, cols, k + 1)
        steps = [r.get("step", i + 1) for i, r in enumerate(hist)]
        layer_keys = sorted({key for r in hist for key in r if key.startswith("bits/")})
        for key in layer_keys:
            ax.plot(steps, [r.get(key) for r in hist], lw=1, alpha=0.7, label=key[len("bits/"):])
        avg = [r.get("avg_weight_bits") for r in hist]
        if any(a is not None for a in avg):
            ax.plot(steps, avg, lw=2.5, color="black", label="average")
        ax.set_xlabel("search step")
        ax.set_ylabel("weight bits")
        ax.set_title(str(title), fontsize=9)
        ax.legend(fontsize=6)
    return _save(fig, path)


_MARKERS = {"searched": "o", "uniform": "s", "hawq": "^", "rtn": "x"}


def plot_accuracy_vs_size(rows: Sequence[Mapping[str, Any]], path: PathLike,
                          float_accuracy: Optional[float] = None, float_kb: Optional[float] = None) -> Path:
    """Accuracy (%) against weight memory (KB); the uniform LSQ baseline joined by a line."""
    fig = _figure(7, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    ok = [r for r in _ok_rows(rows) if r.get("accuracy") is not None and (r.get("achieved") or {}).get("weight_kb")]
    labels: Dict[str, List[Tuple[float, float]]] = {}
    kinds: Dict[str, str] = {}
    for r in ok:
        label = str(r.get("method")) if r.get("kind") == "searched" else str(r.get("kind"))
        labels.setdefault(label, []).append((r["achieved"]["weight_kb"], 100 * r["accuracy"]))
        kinds[label] = str(r.get("kind"))
    for label, pts in labels.items():
        pts.sort()
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        if kinds[label] == "uniform":
            ax.plot(xs, ys, "-s", color="gray", label="uniform LSQ")
        else:
            ax.plot(xs, ys, _MARKERS.get(kinds[label], "o"), ms=8, label=label)
    if float_accuracy is not None:
        ax.axhline(100 * float_accuracy, ls="--", color="black", lw=1,
                   label=f"float ({float_kb:.1f} KB)" if float_kb else "float")
    ax.set_xlabel("weight memory (KB)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("accuracy vs size")
    ax.grid(alpha=0.3)
    if labels or float_accuracy is not None:
        ax.legend(fontsize=8)
    return _save(fig, path)


def render_plots(run_dir: PathLike, report: Mapping[str, Any]) -> List[Path]:
    """Draw the three PNGs of a report into ``run_dir``."""
    run_dir = Path(run_dir)
    rows = report.get("rows", [])
    histories = {f"{r.get('label', r.get('method'))} @ {_budget_text(r.get('budget'))}": r["history"]
                 for r in _ok_rows(rows) if r.get("history")}
    fl = report.get("float") or {}
    return [
        plot_bits_per_layer(rows, run_dir / PLOTS[0]),
        plot_bit_evolution(histories, run_dir / PLOTS[1]),
        plot_accuracy_vs_size(rows, run_dir / PLOTS[2], fl.get("accuracy"), fl.get("weight_kb")),
    ]


def render_report(run_dir: PathLike, plots: bool = True) -> str:
    """Re-render a run directory from its ``report.json``: the PNGs and ``table.txt``.

    Returns:
        The table text.
    """
    report = read_report(run_dir)
    table = format_table(report)
    (Path(run_dir) / TABLE_NAME).write_text(table + "\n")
    if plots:
        render_plots(run_dir, report)
    return table
