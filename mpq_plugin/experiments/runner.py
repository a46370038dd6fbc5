"""Run an experiment: a float model, then every (budget, config) pair and the baselines, one report.

The engine behind ``mpq demo`` / ``mpq search`` (which build an :class:`Experiment` from arguments or
YAML in :mod:`mpq_plugin.cli`) and behind the vision tasks of ``mpq results``. Nothing here parses
arguments or reads files other than the checkpoints and reports it writes.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

log = logging.getLogger("mpq_plugin.cli")

BASELINES = ("lsq", "hawq", "rtn")


class ConfigError(ValueError):
    """A config file or argument that cannot be used; the message names the key and the fix."""


# -- experiment description -------------------------------------------------------------------------
@dataclass
class Experiment:
    """What to run: one float model, then every (budget, config) pair and the baselines."""

    kind: str  # "demo" | "search"
    run_dir: Path
    seed: int
    model_name: str
    model_factory: Callable[[], Any]
    data_name: str
    data_factory: Callable[[], Tuple[Any, Any]]
    float_checkpoint: Optional[str]
    float_steps: int
    float_lr: float
    groups: List[Tuple[Any, List[Any]]]  # [(Budget, [MPQConfig, ...])]
    fit_config: Any  # FitConfig without run_dir
    baselines: Tuple[str, ...] = BASELINES
    hawq: Dict[str, Any] = field(default_factory=dict)
    resume: bool = False
    command: str = ""
    model_kwargs: Dict[str, Any] = field(default_factory=dict)  # for rebuilding (mpq export)


def weighted_budget_options(method: str) -> Dict[str, Any]:
    """Methods whose budget may count an unweighted layer average (CSQ's code) are set to the
    parameter-weighted average here, so every method meets the same budget as the table reports."""
    from dataclasses import fields

    from mpq_plugin.registry import get_method

    names = {f.name for f in fields(get_method(method).options_cls)}
    return {"budget_ratio": "weighted"} if "budget_ratio" in names else {}


# -- running an experiment ---------------------------------------------------------------------------------
def _layer_rows(metrics: Mapping[str, Any], plan: Any) -> Dict[str, Dict[str, Any]]:
    out = {}
    for name, info in (metrics.get("layers") or {}).items():
        bits = int(round(info["weight_bits"]))
        act = plan[name].act_bits if plan is not None and name in plan else None
        out[name] = {"weight_bits": bits, "act_bits": act, "weight_params": int(info["weight_params"]),
                     "bias_params": int(info.get("bias_params", 0)),
                     "weight_kb": (info["weight_params"] + info.get("bias_params", 0)) * bits / 8192.0}
    return out


def _act_bits(layers: Mapping[str, Mapping[str, Any]]) -> Any:
    vals = sorted({l["act_bits"] for l in layers.values() if l["act_bits"] is not None})
    if not vals:
        return None
    return vals[0] if len(vals) == 1 else vals


_COST_KEYS = ("avg_weight_bits", "weight_kb", "act_kb_sum", "act_kb_max", "bops")


def _row_from_fit(label: str, kind: str, qcfg: Any, budget: Any, res: Any, float_acc: Optional[float],
                  extra_seconds: float = 0.0) -> Dict[str, Any]:
    from mpq_plugin.reporting import downsample_history

    layers = _layer_rows(res.metrics, res.plan)
    return {
        "label": label, "method": qcfg.method, "kind": kind, "budget": budget.to_dict(),
        "config": qcfg.to_dict(),
        "achieved": {k: res.metrics.get(k) for k in _COST_KEYS},
        "act_bits": _act_bits(layers), "accuracy": res.metrics.get("accuracy"), "float_accuracy": float_acc,
        "val_loss": res.metrics.get("val_loss"), "layers": layers, "search_seconds": res.search_seconds + extra_seconds,
        "finetune_seconds": res.finetune_seconds,
        "total_seconds": res.search_seconds + res.finetune_seconds + extra_seconds,
        "steps": res.total_steps, "history": downsample_history(res.history), "error": None,
        # the search's own end point, before freeze() repaired or filled the plan
        "search_end_avg_weight_bits": res.history[-1].get("avg_weight_bits") if res.history else None,
        "plan_cost": dict(res.plan.cost) if res.plan is not None else {},
    }


def method_label(qcfg: Any) -> str:
    """Row label of a searched config: the method name, plus ``-U1``/``-U2``/... when a learned-range
    config uses a parametrization other than the default U3 (so the variants get separate rows)."""
    param = (qcfg.options or {}).get("parametrization")
    return qcfg.method if param in (None, "U3") else f"{qcfg.method}-{param}"


def run_experiment_rows(exp: Experiment) -> Dict[str, Any]:
    """Run an :class:`Experiment` without rendering; returns its report (``rows``, ``float``, ...).

    The reusable core of ``mpq demo``/``mpq search``, used by :mod:`mpq_plugin.experiments`.
    """
    return _Runner(exp).run()


def _error_row(label: str, method: str, kind: str, budget: Any, err: BaseException) -> Dict[str, Any]:
    return {"label": label, "method": method, "kind": kind, "budget": budget.to_dict(), "error": str(err),
            "achieved": {}, "layers": {}, "history": [], "accuracy": None}


class _Runner:
    """Runs an :class:`Experiment`, writing the report after every finished model."""

    def __init__(self, exp: Experiment) -> None:
        self.exp = exp
        self.rows: List[Dict[str, Any]] = []
        self.report: Dict[str, Any] = {}
        self.t0 = time.perf_counter()

    def write(self, final: bool = False) -> None:
        from mpq_plugin.reporting import fill_baselines, write_report

        fill_baselines(self.rows)
        self.report["rows"] = self.rows
        self.report["wall_seconds"] = time.perf_counter() - self.t0
        self.report["complete"] = final
        write_report(self.exp.run_dir, self.report)

    def float_model(self, train: Any, val: Any) -> Tuple[Any, Dict[str, Any]]:
        import torch

        from mpq_plugin.search.trainer import evaluate, train_float

        exp = self.exp
        torch.manual_seed(exp.seed)
        model = exp.model_factory()
        saved = exp.run_dir / "float" / "model.pt"
        seconds = 0.0
        if exp.float_checkpoint:
            model.load_state_dict(torch.load(exp.float_checkpoint, map_location="cpu", weights_only=True))
            log.info("float model loaded from %s", exp.float_checkpoint)
        elif exp.resume and saved.is_file():
            model.load_state_dict(torch.load(saved, map_location="cpu", weights_only=True))
            log.info("float model reloaded from %s", saved)
        else:
            log.info("training the float model: %d steps", exp.float_steps)
            seconds = train_float(model, train, exp.float_steps, lr=exp.float_lr, seed=exp.seed)
            saved.parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), saved)
        model.eval()
        ev = evaluate(model, val)
        n_params = sum(m.weight.numel() + (m.bias.numel() if getattr(m, "bias", None) is not None else 0)
                       for m in model.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)))
        info = {"accuracy": ev["accuracy"], "val_loss": ev["loss"], "train_seconds": seconds,
                "weight_kb": n_params * 32 / 8192.0, "steps": exp.float_steps if seconds else 0}
        log.info("float model: accuracy %s", "n/a" if ev["accuracy"] is None else f"{100 * ev['accuracy']:.2f}%")
        return model, info

    def run(self) -> Dict[str, Any]:
        exp = self.exp
        exp.run_dir.mkdir(parents=True, exist_ok=True)
        train, val = exp.data_factory()
        self.report = {
            "kind": exp.kind, "command": exp.command, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            "seed": exp.seed, "model": exp.model_name,
            "data": {"name": exp.data_name, "train": len(train.dataset), "val": len(val.dataset)},
            "steps": {"float": exp.float_steps, "search": exp.fit_config.search_steps,
                      "finetune": exp.fit_config.finetune_steps},
            "budgets": [b.to_dict() for b, _ in exp.groups],
        }
        self.preflight(train, val)
        float_model, info = self.float_model(train, val)
        self.report["float"] = info
        self.write()
        example = (next(iter(train))[0],)
        for budget, configs in exp.groups:
            for qcfg in configs:
                self.fit_row(method_label(qcfg), "searched", qcfg, budget, float_model, train, val,
                             info["accuracy"])
            self.baselines(budget, configs, float_model, train, val, info["accuracy"], example)
        if exp.kind == "demo":
            self.deployable(float_model, train, val)
        self.write(final=True)
        return self.report

    def deployable(self, float_model: Any, train: Any, val: Any) -> None:
        """Re-train the best searched plan as it deploys (input quantized, BN folded, power-of-two
        steps; :mod:`mpq_plugin.export.deploy`) and store it in ``RUN_DIR/export`` for ``mpq export``."""
        import torch

        from mpq_plugin.export import deploy
        from mpq_plugin.search.trainer import fit

        ok = [r for r in self.rows if r["kind"] == "searched" and not r["error"] and r.get("layers")]
        if not ok:
            log.warning("no searched model finished: nothing to export")
            return
        best = max(ok, key=lambda r: r["accuracy"] or 0.0)
        bits = {n: l["weight_bits"] for n, l in best["layers"].items()}
        act = best["act_bits"] if isinstance(best["act_bits"], int) else 8
        model = copy.deepcopy(float_model)
        example = next(iter(train))[0]
        deploy.quantize_deployable_(model, deploy.deployable_config(bits, act_bits=act), example)
        cfg = self.exp.fit_config.replace(run_dir=str(self.exp.run_dir / "runs" / "deployable"), search_steps=0,
                                          search_epochs=0.0, checkpoint_every=0)
        with _quiet("mpq_plugin.search.trainer"):  # "search_steps=0: freezing at initial bits" is intended
            res = fit(model, train, val, model._mpq_config, cfg, teacher=float_model, resume=self.exp.resume)
        samples = torch.cat([b[0] for _, b in zip(range(8), val)])[:256]
        info = {"source": best["label"], "source_accuracy": best["accuracy"], "accuracy": res.metrics.get("accuracy"),
                "avg_weight_bits": res.metrics.get("avg_weight_bits"), "finetune_steps": cfg.finetune_steps}
        deploy.save_deployable(model, self.exp.run_dir, model_name=self.exp.model_name,
                               model_kwargs=self.exp.model_kwargs, samples=samples, info=info)
        self.report["deployable"] = info
        log.info("deployable model (plan of %s, input quantized, BN folded): accuracy %.2f%%", best["label"],
                 100 * (info["accuracy"] or 0))

    def preflight(self, train: Any, val: Any) -> None:
        """Fail on bad data, a model that does not fit the data or an infeasible budget before
        any training (one forward pass of an untrained model)."""
        from mpq_plugin.api import quantize_
        from mpq_plugin.search.trainer import check_model_fits

        batch = next(iter(train), None)
        if batch is None:
            raise ConfigError(f"the training data ({self.exp.data_name}) yields no batches")
        if next(iter(val), None) is None:
            raise ConfigError(f"the validation data ({self.exp.data_name}) yields no batches")
        model = self.exp.model_factory()
        check_model_fits(model, batch)
        for budget, configs in self.exp.groups:
            for qcfg in configs:
                quantize_(copy.deepcopy(model).eval(), qcfg, example_inputs=(batch[0],))

    def fit_row(self, label: str, kind: str, qcfg: Any, budget: Any, float_model: Any, train: Any, val: Any,
                float_acc: Optional[float], extra_seconds: float = 0.0) -> None:
        from mpq_plugin.search.budgets import BudgetError
        from mpq_plugin.search.trainer import fit

        exp = self.exp
        sub = exp.run_dir / "runs" / f"{label}_{_budget_slug(budget)}"
        cfg = exp.fit_config.replace(run_dir=str(sub))
        log.info("%s at budget %s ...", label, budget.to_dict())
        try:
            res = fit(copy.deepcopy(float_model), train, val, qcfg, cfg, resume=exp.resume)
        except BudgetError as e:
            log.warning("%s at %s missed the budget: %s", label, budget.to_dict(), e)
            self.rows.append(_error_row(label, qcfg.method, kind, budget, e))
            self.write()
            return
        row = _row_from_fit(label, kind, qcfg, budget, res, float_acc, extra_seconds)
        self.rows.append(row)
        log.info("%s at %s: accuracy %.2f%%, avg weight bits %.3f, search %.1fs, finetune %.1fs", label,
                 budget.to_dict(), 100 * (row["accuracy"] or 0), row["achieved"]["avg_weight_bits"],
                 row["search_seconds"], row["finetune_seconds"])
        self.write()

    def baselines(self, budget: Any, configs: List[Any], float_model: Any, train: Any, val: Any,
                  float_acc: Optional[float], example: Tuple[Any, ...]) -> None:
        import torch.nn.functional as F

        from mpq_plugin.config import MPQConfig
        from mpq_plugin.search import baselines as B

        exp = self.exp
        template = configs[0] if configs else MPQConfig(method="lsq", weight_bits=(2, 8), act_bits=8)
        act = template.act_bits[0] if template.act_bits is not None and template.act_bits[0] == template.act_bits[1] \
            else (8 if template.act_bits is not None else None)
        common = dict(per_channel=template.per_channel, include=template.include, exclude=template.exclude)
        lo, hi = template.weight_bits
        bits = B.uniform_bits_for_budget(float_model, budget, act_bits=act, example_inputs=example,
                                         config=template.replace(method="lsq", act_bits=act, options={}),
                                         min_bits=max(lo, 2), max_bits=min(hi, 8))
        if "lsq" in exp.baselines:
            qcfg = B.uniform_config(bits, act_bits=act, budget=budget, **common)
            self.fit_row(f"lsq-{bits}b", "uniform", qcfg, budget, float_model, train, val, float_acc)
        if "hawq" in exp.baselines:
            t0 = time.perf_counter()
            h = exp.hawq
            batches = [b for _, b in zip(range(int(h.get("batches", 2))), train)]
            res = B.hawq_allocate(copy.deepcopy(float_model), F.cross_entropy, batches, budget,
                                  candidates=tuple(h.get("candidates", (2, 3, 4, 5, 6, 8))),
                                  n_samples=int(h.get("n_samples", 32)), seed=exp.seed,
                                  config=template, act_bits=act, per_channel=template.per_channel)
            seconds = time.perf_counter() - t0
            qcfg = B.hawq_config(res, act_bits=act, per_channel=template.per_channel, exclude=template.exclude)
            self.fit_row("hawq", "hawq", qcfg, budget, float_model, train, val, float_acc, extra_seconds=seconds)
        if "rtn" in exp.baselines:
            self.rtn_row(bits, act, common, budget, float_model, train, val, float_acc)

    def rtn_row(self, bits: int, act: Optional[int], common: Mapping[str, Any], budget: Any, float_model: Any,
                train: Any, val: Any, float_acc: Optional[float]) -> None:
        from mpq_plugin.nn.costing import model_cost
        from mpq_plugin.search.baselines import rtn_ptq_
        from mpq_plugin.search.trainer import evaluate

        t0 = time.perf_counter()
        model = copy.deepcopy(float_model)
        batches = [b for _, b in zip(range(4), train)]
        kw = {k: v for k, v in common.items() if k != "per_channel"}
        _, plan = rtn_ptq_(model, bits, act_bits=act, per_channel=bool(common["per_channel"]),
                           calibration_batches=batches, **kw)
        ev = evaluate(model, val)
        cost = model_cost(model)
        seconds = time.perf_counter() - t0
        layers = _layer_rows({"layers": cost["layers"]}, plan)
        self.rows.append({
            "label": f"rtn-{bits}b", "method": "lsq", "kind": "rtn", "budget": budget.to_dict(),
            "achieved": {k: cost.get(k) for k in _COST_KEYS}, "act_bits": _act_bits(layers),
            "accuracy": ev["accuracy"], "float_accuracy": float_acc, "val_loss": ev["loss"], "layers": layers,
            "search_seconds": 0.0, "finetune_seconds": 0.0, "total_seconds": seconds, "steps": 0,
            "history": [], "error": None,
        })
        self.write()


class _quiet:
    """Raise one logger to ERROR for a block."""

    def __init__(self, name: str) -> None:
        self.logger = logging.getLogger(name)

    def __enter__(self) -> None:
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: Any) -> None:
        self.logger.setLevel(self.level)


def _budget_slug(budget: Any) -> str:
    return "_".join(f"{k}{v:g}" for k, v in budget.items()).replace(".", "p")


def run_experiment(exp: Experiment, plots: bool = True) -> str:
    """Run everything, write ``report.json``, the PNGs and ``table.txt``; return the table."""
    from mpq_plugin.reporting import render_report

    log.info("run dir: %s (resume an interrupted run with --resume)", exp.run_dir)
    _Runner(exp).run()
    try:
        return render_report(exp.run_dir, plots=plots)
    except ImportError as e:  # matplotlib missing: the table and report.json still exist
        log.warning("%s; skipping the PNG plots", e)
        return render_report(exp.run_dir, plots=False)
