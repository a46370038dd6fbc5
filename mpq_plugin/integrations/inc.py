"""Intel Neural Compressor 3.x: learned mixed precision as the INC algorithm ``"mpq"``.

The one-line change in an INC script is the config (and a training ``run_fn``)::

    from neural_compressor.torch.quantization import quantize
    from mpq_plugin.inc import MPQConfig, train_with
    q_model = quantize(model, MPQConfig(method="learned_range", budget=3.0), run_fn=train_with(train_loader))
    q_model.mpq_plan                      # the frozen BitPlan

``MPQConfig`` here is an INC ``TorchBaseConfig`` registered under ``"mpq"`` (this module calls it
:class:`INCMPQConfig`; ``mpq_plugin.MPQConfig`` is the native config it is translated into). The
algorithm runs search -> freeze -> finetune through ``mpq_plugin.search.trainer.fit`` when
``run_fn`` is :func:`train_with`; any other ``run_fn(model, *run_args)`` is treated as the user's own
training loop: it is called once while the bits are searched (the budget penalty's gradient is
added before, and ``MPQSearch.step()`` called after, every ``optimizer.step()`` through torch's
global optimizer hooks) and once more after the freeze to finetune at fixed bits.

Per-layer settings use INC's own ``set_local``: a local config with ``weight_bits=8`` pins a layer,
one with ``dtype="fp32"`` keeps it float; they become ``layer_overrides`` / ``exclude`` of the
native config. Method, budget, options and step counts are model-wide and read from the global
config. :func:`autotune` sweeps a budget ladder cheapest first through INC's ``autotune`` and
returns the smallest model within ``tolerable_loss``.
"""
import contextvars
import copy
import dataclasses
import inspect
import itertools
import logging
import re
import time
from collections import Counter
from numbers import Real
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
import torch.optim.optimizer as _opt_mod

import mpq_plugin
from mpq_plugin.config import BitPlan, Budget, MPQConfig as NativeMPQConfig
from mpq_plugin.nn.layers import QUANT_LAYER_TYPES, quant_layers

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install mpq_plugin[inc]"
WORKING_VERSIONS = "neural-compressor[pt] (or neural-compressor-pt) 3.x with the 3.x torch API; tested with 3.10"


def _inc_version() -> str:
    from importlib import metadata

    for dist in ("neural-compressor", "neural_compressor", "neural-compressor-pt"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


try:
    import neural_compressor  # noqa: F401
except ImportError as _e:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(f"mpq_plugin.inc needs Intel Neural Compressor 3.x: {INSTALL_HINT}") from _e
try:
    from neural_compressor.common.base_config import ComposableConfig, config_registry, register_config
    from neural_compressor.common.base_tuning import Sampler, TuningConfig
    from neural_compressor.common.utils import DEFAULT_WHITE_LIST, Mode
    from neural_compressor.torch.quantization import autotune as _inc_autotune
    from neural_compressor.torch.quantization import convert as _inc_convert
    from neural_compressor.torch.quantization import prepare as _inc_prepare
    from neural_compressor.torch.quantization import quantize as _inc_quantize
    from neural_compressor.torch.quantization.config import TorchBaseConfig
    from neural_compressor.torch.utils import register_algo
except ImportError as _e:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(
        f"mpq_plugin.inc needs the 3.x PyTorch API of Intel Neural Compressor (register_config, register_algo, "
        f"neural_compressor.torch.quantization); the installed neural-compressor {_inc_version()} lacks it "
        f"({_e}). Versions that work: {WORKING_VERSIONS}: {INSTALL_HINT}"
    ) from _e

__all__ = [
    "DEFAULT_LADDER",
    "MPQ_ALGO",
    "CheapestFirstSampler",
    "INCMPQConfig",
    "MPQConfig",
    "TrainWith",
    "autotune",
    "convert",
    "get_default_mpq_config",
    "get_mpq_config_set_for_tuning",
    "prepare",
    "quantize",
    "to_native_config",
    "train_with",
]

MPQ_ALGO = "mpq"
DEFAULT_LADDER: Tuple[float, ...] = (2.5, 3.0, 4.0, 6.0)
_DTYPES = ("int", "fp32")
_INC_INTERNAL = {"params_list", "non_tunable_params"}
# fields of the global config that apply to the whole model (one search, one budget)
MODEL_WIDE = ("method", "budget", "per_channel", "options", "search_steps", "finetune_steps")


# -- the INC config ----------------------------------------------------------------------------------
@register_config(framework_name="torch", algo_name=MPQ_ALGO, priority=5)
class INCMPQConfig(TorchBaseConfig):
    """INC config of mpq_plugin's learned mixed-precision quantization (exported as ``MPQConfig``).

    A list value of a field (``budget=[2.5, 3, 4]``) is a tuning space for INC's ``autotune``.

    Args:
        method: a registered mpq_plugin method (``sdq``, ``learned_range``, ``csq``, ``lsq``, ...).
        budget: average weight bits (parameter-weighted) the search must meet, a dict of
            :class:`mpq_plugin.Budget` fields, or ``None`` (no budget).
        min_bits / max_bits: weight bit range the search may use.
        weight_bits: fix a layer's (or every layer's) weight bits; overrides min/max_bits.
        act_bits: activation bits (``None``: float activations).
        dtype: ``"int"`` (quantize) or ``"fp32"`` (keep float, as INC's own configs).
        per_channel: per-output-channel weight scales (methods that support it).
        options: the method's own options (``mpq_plugin`` method options class).
        search_steps / finetune_steps: optimizer steps of each phase; override the
            :func:`train_with` ``FitConfig``; ``search_steps`` is required for a custom ``run_fn``
            and for ``prepare`` (it sets the search's schedules).
    """

    name = MPQ_ALGO
    supported_configs: list = []

    def __init__(self, method: str = "sdq", budget: Any = None, min_bits: int = 2, max_bits: int = 8,
                 weight_bits: Optional[int] = None, act_bits: Optional[int] = 8, dtype: str = "int",
                 per_channel: bool = False, options: Optional[Dict[str, Any]] = None,
                 search_steps: Optional[int] = None, finetune_steps: Optional[int] = None,
                 white_list: Any = DEFAULT_WHITE_LIST, **kwargs: Any) -> None:
        # INC rebuilds configs from their __dict__ (``params_list`` and private fields come back
        # as keywords): accept those, reject anything else so typos fail loudly.
        unknown = sorted(k for k in kwargs if k not in _INC_INTERNAL and not k.startswith("_"))
        if unknown:
            raise ValueError(f"unknown mpq config key(s) {unknown}; allowed: {sorted(_public_params())}")
        super().__init__(white_list=white_list)
        self.method = method
        self.budget = budget
        self.min_bits = min_bits
        self.max_bits = max_bits
        self.weight_bits = weight_bits
        self.act_bits = act_bits
        self.dtype = dtype
        self.per_channel = per_channel
        self.options = dict(options) if isinstance(options, Mapping) else options
        self.search_steps = search_steps
        self.finetune_steps = finetune_steps
        _validate(self)
        self._post_init()

    @classmethod
    def register_supported_configs(cls) -> None:
        cls.supported_configs = []

    @staticmethod
    def get_model_info(model: nn.Module, *args: Any, **kwargs: Any) -> List[Tuple[str, str]]:
        """``(name, type)`` of every layer mpq can quantize (float, or already quantized by prepare)."""
        kinds = set(QUANT_LAYER_TYPES) | set(QUANT_LAYER_TYPES.values())
        return [(n, type(m).__name__) for n, m in model.named_modules() if type(m) in kinds]

    @classmethod
    def get_config_set_for_tuning(cls) -> "INCMPQConfig":
        return cls(budget=list(DEFAULT_LADDER))


MPQConfig = INCMPQConfig
_DEFAULTS = {k: p.default for k, p in inspect.signature(INCMPQConfig.__init__).parameters.items()}


def _public_params() -> List[str]:
    return [p for p in INCMPQConfig._generate_params_list() if p != "white_list"]


def get_default_mpq_config() -> INCMPQConfig:
    """``sdq`` searching 2..8-bit weights (8-bit activations) under a 4-bit average budget."""
    return INCMPQConfig(method="sdq", budget=4.0)


def get_mpq_config_set_for_tuning(budgets: Sequence[float] = DEFAULT_LADDER, **fields: Any) -> INCMPQConfig:
    """One config whose ``budget`` list INC expands into a budget ladder."""
    return INCMPQConfig(budget=sorted(float(b) for b in budgets), **fields)


def _as_list(v: Any) -> List[Any]:
    return list(v) if isinstance(v, list) else [v]


def _validate(cfg: INCMPQConfig) -> None:
    """Check every combination a (possibly list-valued) config expands to with the native config."""
    for d in _as_list(cfg.dtype):
        if d not in _DTYPES:
            raise ValueError(f"mpq config: dtype={d!r}; use 'int' (quantize) or 'fp32' (keep the layer float)")
    for s in ("search_steps", "finetune_steps"):
        for v in _as_list(getattr(cfg, s)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"mpq config: {s}={v!r} must be an integer >= 0 or None")
    grid = [_as_list(getattr(cfg, f)) for f in ("method", "budget", "min_bits", "max_bits", "weight_bits", "act_bits")]
    for method, budget, lo, hi, wb, ab in itertools.product(*grid):
        try:
            _native_fields(method, budget, lo, hi, wb, ab, cfg.per_channel, cfg.options)
        except (TypeError, ValueError) as e:
            raise ValueError(f"mpq config (method={method!r}, budget={budget!r}): {e}") from None


def _bits(lo: Any, hi: Any, wb: Any) -> Tuple[int, int]:
    return (wb, wb) if wb is not None else (lo, hi)


def _budget(budget: Any) -> Optional[Budget]:
    if budget is None:
        return None
    if isinstance(budget, Budget):
        return budget
    if isinstance(budget, Mapping):
        return Budget.from_dict(budget)
    if isinstance(budget, Real) and not isinstance(budget, bool):
        return Budget(avg_weight_bits=float(budget))
    raise TypeError(f"budget must be average weight bits (a number), a dict of Budget fields or None, got {budget!r}")


def _weighted_options(method: str, options: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """INC's budget is the parameter-weighted average (what ``BitPlan.avg_weight_bits`` reports):
    methods that can count an unweighted average are set to the weighted one unless told."""
    from mpq_plugin.registry import get_method

    opts = dict(options or {})
    names = {f.name for f in dataclasses.fields(get_method(method).options_cls)}
    if "budget_ratio" in names:
        opts.setdefault("budget_ratio", "weighted")
    return opts


def _native_fields(method: Any, budget: Any, lo: Any, hi: Any, wb: Any, ab: Any, per_channel: Any,
                   options: Any) -> NativeMPQConfig:
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(f"options must be a dict of the method's options, got {options!r}")
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, got {method!r}")
    return NativeMPQConfig(method=method, weight_bits=_bits(lo, hi, wb), act_bits=ab, budget=_budget(budget),
                           per_channel=bool(per_channel), options=_weighted_options(method, options)
                           if method in mpq_plugin.list_methods() else dict(options or {}))


def _layer_settings(cfg: INCMPQConfig) -> Optional[Dict[str, Any]]:
    """Per-layer part of a config (``None``: keep float)."""
    if cfg.dtype == "fp32":
        return None
    return {"weight_bits": _bits(cfg.min_bits, cfg.max_bits, cfg.weight_bits), "act_bits": cfg.act_bits}


def _global_of(configs: Sequence[INCMPQConfig]) -> INCMPQConfig:
    """The model-wide config: the one INC built for the global scope (``white_list=None``), else the
    most frequent one."""
    scoped = [c for c in configs if c.white_list is None] or list(configs)
    counts = Counter(id(c) for c in scoped)
    best = max(counts, key=counts.get)  # type: ignore[arg-type]
    return next(c for c in scoped if id(c) == best)


def to_native_config(configs_mapping: Mapping[Tuple[str, str], Any], model_info: Sequence[Tuple[str, str]]
                     ) -> Tuple[NativeMPQConfig, INCMPQConfig]:
    """Translate INC's per-op mapping into one native config (``layer_overrides`` / ``exclude``).

    Layers INC left out of the mapping (another algorithm's, or not in a ``white_list``) stay float.
    """
    mine = {name: c for (name, _), c in configs_mapping.items() if getattr(c, "name", None) == MPQ_ALGO}
    if not mine:
        raise ValueError("no layer is configured for the mpq algorithm")
    g = _global_of(list(mine.values()))
    for f in MODEL_WIDE:
        if isinstance(getattr(g, f), list):
            raise ValueError(f"mpq config: {f}={getattr(g, f)!r} is a list (a tuning space): pass it to "
                             "autotune (TuningConfig(config_set=[...])), or give quantize one value")
    base = _native_fields(g.method, g.budget, g.min_bits, g.max_bits, g.weight_bits, g.act_bits,
                          g.per_channel, g.options)
    default = _layer_settings(g)
    overrides: Dict[str, Dict[str, Any]] = {}
    exclude: List[str] = []
    for name, _ in model_info:
        cfg = mine.get(name)
        settings = None if cfg is None else _layer_settings(cfg)
        if settings is None:
            exclude.append(re.escape(name))
        elif settings != default:
            overrides[re.escape(name)] = settings
        if cfg is not None and cfg is not g:
            ignored = [f for f in MODEL_WIDE if getattr(cfg, f) != getattr(g, f)
                       and getattr(cfg, f) != _DEFAULTS[f]]
            if ignored:
                log.warning("mpq: local config of %r sets model-wide field(s) %s; they are ignored (set them on the "
                            "global config)", name, ignored)
    if default is None:  # global dtype fp32: only layers with a local int config are quantized
        base = base.replace(include=tuple(overrides) or ("$^",))
    native = base.replace(layer_overrides=overrides, exclude=tuple(exclude))
    return native, g


# -- running the pipeline ------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainWith:
    """``run_fn`` that makes the mpq algorithm train with mpq_plugin's trainer (search -> freeze ->
    finetune with distillation, ``mpq_plugin.search.trainer.fit``).

    Called directly (as INC calls a calibration ``run_fn`` of other algorithms), it runs no-grad
    forward passes over ``train_loader``.
    """

    train_loader: Any
    val_loader: Any = None
    fit_config: Any = None
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
    calibration_batches: int = 4

    def __call__(self, model: nn.Module, *args: Any) -> None:
        was = model.training
        model.eval()
        with torch.no_grad():
            for i, batch in enumerate(self.train_loader):
                if i >= self.calibration_batches:
                    break
                model(batch[0].to(_device(model)))
        model.train(was)

    def make_fit_config(self, g: INCMPQConfig) -> Any:
        from mpq_plugin.search.trainer import FitConfig

        cfg = self.fit_config if self.fit_config is not None else FitConfig(
            search_steps=100, finetune_steps=60, lr=3e-3, bit_lr=0.1, progress_bar=False)
        if isinstance(cfg, Mapping):
            cfg = FitConfig.from_dict(cfg)
        changes = {k: getattr(g, k) for k in ("search_steps", "finetune_steps") if getattr(g, k) is not None}
        return cfg.replace(**changes) if changes else cfg


def train_with(train_loader: Any, val_loader: Any = None, fit_config: Any = None,
               loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy) -> TrainWith:
    """The ``run_fn`` for INC's ``quantize``/``autotune`` that trains with mpq_plugin's trainer.

    Args:
        train_loader: a ``DataLoader`` of ``(inputs, targets)`` over a map-style dataset.
        val_loader: optional loader; its metrics land in ``model.mpq_fit_result.metrics``.
        fit_config: a ``mpq_plugin.search.trainer.FitConfig`` (or dict); default 100 search and 60
            finetune steps. The config's ``search_steps``/``finetune_steps`` override it.
    """
    return TrainWith(train_loader, val_loader, fit_config, loss_fn)


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _example_tuple(example_inputs: Any) -> Optional[Tuple[Any, ...]]:
    if example_inputs is None or isinstance(example_inputs, Mapping):
        return None
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


class _WarmStart:
    """Carries the previous trial's plan from one autotune trial to the next."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.plan: Optional[BitPlan] = None
        # set after the last trial when none passed: INC >= 3.10 then re-quantizes the best config;
        # we already hold that trial's model, so the entry skips the retraining
        self.skip_training = False


_WARM: contextvars.ContextVar[Optional[_WarmStart]] = contextvars.ContextVar("mpq_inc_warm_start", default=None)


def _apply_warm_start(model: nn.Module) -> Optional[float]:
    """Start every searching weight quantizer at the previous trial's bits (``force_bits``)."""
    ws = _WARM.get()
    if ws is None or not ws.enabled or ws.plan is None:
        return None
    n = 0
    for name, layer in quant_layers(model):
        q = layer.weight_quantizer
        lb = ws.plan.layers.get(name)
        lo, hi = q.spec.bits
        if lb is None or lo == hi or not hasattr(q, "force_bits"):
            continue
        try:
            q.force_bits(min(max(int(lb.weight_bits), lo), hi))
            n += 1
        except ValueError as e:
            log.debug("warm start skipped %s: %s", name, e)
    prev = ws.plan.budget.avg_weight_bits if ws.plan.budget is not None else None
    log.info("mpq: warm start of %d layers from the previous trial's plan (budget %s)", n, prev)
    model.mpq_warm_started_layers = n  # type: ignore[assignment]
    return prev if n else None


def _record_plan(model: nn.Module, plan: BitPlan, warm_from: Optional[float]) -> None:
    model.mpq_plan = plan  # type: ignore[assignment]
    model.mpq_warm_started_from = warm_from  # type: ignore[assignment]
    ws = _WARM.get()
    if ws is not None:
        ws.plan = plan


def _first_batch(loader: Any) -> Any:
    """The loader's first samples in dataset order: the same calibration batch for every trial,
    whatever the loader's shuffling state."""
    ds = getattr(loader, "dataset", None)
    if ds is not None and hasattr(ds, "__getitem__") and hasattr(ds, "__len__") and loader.batch_size:
        return next(iter(torch.utils.data.DataLoader(ds, batch_size=loader.batch_size, collate_fn=loader.collate_fn)))
    return next(iter(loader))


def _run_fit(model: nn.Module, native: NativeMPQConfig, g: INCMPQConfig, run_fn: TrainWith) -> nn.Module:
    from mpq_plugin.search.trainer import fit

    fit_cfg = run_fn.make_fit_config(g)
    teacher = copy.deepcopy(model) if fit_cfg.kd else None
    first = _first_batch(run_fn.train_loader)
    was = model.training
    mpq_plugin.quantize_(model, native, example_inputs=(first[0].to(_device(model)),))
    model.train(was)
    warm_from = _apply_warm_start(model)
    res = fit(model, run_fn.train_loader, run_fn.val_loader, native, fit_cfg, teacher=teacher,
              loss_fn=run_fn.loss_fn)
    model.mpq_fit_result = res  # type: ignore[assignment]
    _record_plan(model, res.plan, warm_from)
    return model


class _Session:
    """A search driven by the user's own loop through torch's global optimizer hooks."""

    def __init__(self, model: nn.Module, search: Any) -> None:
        self.search = search
        self.params = {id(p) for p in model.parameters()}
        self.handles = [_opt_mod.register_optimizer_step_pre_hook(self._pre),
                        _opt_mod.register_optimizer_step_post_hook(self._post)]

    def _mine(self, opt: torch.optim.Optimizer) -> bool:
        return any(id(p) in self.params for grp in opt.param_groups for p in grp["params"])

    def _pre(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.search.frozen or not self._mine(opt):
            return
        pen = self.search.penalty()
        if pen.requires_grad:
            pen.backward()

    def _post(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self.search.frozen and self._mine(opt):
            self.search.step()

    def close(self) -> None:
        for h in self.handles:
            h.remove()

    def __deepcopy__(self, memo: Dict[int, Any]) -> "_Session":
        new = _Session.__new__(_Session)
        new.search = copy.deepcopy(self.search, memo)
        new.params, new.handles = set(), self.handles  # a copy never adds penalties itself
        return new


def _start_session(model: nn.Module, native: NativeMPQConfig, g: INCMPQConfig, example_inputs: Any,
                   what: str) -> _Session:
    from mpq_plugin.search import MPQSearch

    if g.search_steps is None or g.search_steps == 0:
        raise ValueError(f"{what} needs the number of optimizer steps your training runs for the search: set "
                         "MPQConfig(search_steps=N), or pass run_fn=mpq_plugin.inc.train_with(train_loader)")
    was = model.training
    mpq_plugin.quantize_(model, native, example_inputs=_example_tuple(example_inputs))
    model.train(was)
    model.mpq_warm_started_from = _apply_warm_start(model)  # type: ignore[assignment]
    session = _Session(model, MPQSearch(model, total_steps=int(g.search_steps)))
    model._mpq_inc_session = session  # type: ignore[assignment]
    return session


def _finish_session(model: nn.Module) -> BitPlan:
    session: Optional[_Session] = getattr(model, "_mpq_inc_session", None)
    if session is None:
        raise ValueError("convert() with the mpq config needs a model returned by prepare(model, MPQConfig(...))")
    session.close()
    del model._mpq_inc_session
    plan = session.search.freeze(strict=False)
    return plan


def _run_user_loop(model: nn.Module, native: NativeMPQConfig, g: INCMPQConfig, run_fn: Callable[..., Any],
                   run_args: Any, example_inputs: Any) -> nn.Module:
    args = tuple(run_args) if isinstance(run_args, (tuple, list)) else (() if run_args is None else (run_args,))
    _start_session(model, native, g, example_inputs, "quantize with a custom run_fn")
    try:
        run_fn(model, *args)
    except BaseException:
        getattr(model, "_mpq_inc_session").close()
        raise
    warm_from = model.mpq_warm_started_from
    plan = _finish_session(model)
    if g.finetune_steps != 0:
        run_fn(model, *args)  # finetune at the frozen bits
    _record_plan(model, plan, warm_from)
    return model


@register_algo(MPQ_ALGO)
def mpq_entry(model: nn.Module, configs_mapping: Mapping[Tuple[str, str], Any], mode: Any = Mode.QUANTIZE,
              *args: Any, **kwargs: Any) -> nn.Module:
    """INC algorithm entry: QUANTIZE = search -> freeze -> finetune; PREPARE = quantize layers and
    start a search the user's training drives; CONVERT = freeze that search."""
    if mode == Mode.CONVERT:
        plan = _finish_session(model)
        _record_plan(model, plan, getattr(model, "mpq_warm_started_from", None))
        return model
    native, g = to_native_config(configs_mapping, INCMPQConfig.get_model_info(model))
    example_inputs = kwargs.get("example_inputs")
    if mode == Mode.PREPARE:
        _start_session(model, native, g, example_inputs, "prepare")
        return model
    ws = _WARM.get()
    if ws is not None and ws.skip_training:
        log.info("mpq autotune: INC re-quantizes its best trial; keeping that trial's model instead of retraining")
        return model
    run_fn = kwargs.get("run_fn")
    if run_fn is None:
        raise ValueError("the mpq algorithm learns bit-widths by training: pass "
                         "run_fn=mpq_plugin.inc.train_with(train_loader) (search -> freeze -> finetune with "
                         "mpq_plugin's trainer) or your own training function run_fn(model, *run_args) "
                         "together with MPQConfig(search_steps=...)")
    if isinstance(run_fn, TrainWith):
        return _run_fit(model, native, g, run_fn)
    return _run_user_loop(model, native, g, run_fn, kwargs.get("run_args"), example_inputs)


# -- entry points with our error context ---------------------------------------------------------------
def _parse(config: Any) -> Any:
    """Let INC parse a dict config; its rejections come back with mpq context."""
    if isinstance(config, Mapping):
        try:
            return ComposableConfig.from_dict(dict(config), config_registry=config_registry.get_cls_configs()["torch"])
        except KeyError as e:
            known = sorted(config_registry.get_cls_configs()["torch"])
            raise ValueError(f"Intel Neural Compressor rejected the config dict: unknown algorithm {e}; registered: "
                             f"{known} (mpq_plugin's is {MPQ_ALGO!r})") from e
        except ValueError as e:  # our own validation: its message already names the fix
            raise ValueError(f"Intel Neural Compressor rejected the config dict {dict(config)!r}: {e}") from e
        except (AssertionError, TypeError) as e:
            raise ValueError(f"Intel Neural Compressor rejected the config dict {dict(config)!r}: {e}. The mpq "
                             f"algorithm takes {_public_params()} under 'global' and per-layer under 'local'") from e
    return config


def quantize(model: nn.Module, quant_config: Any, run_fn: Any = None, run_args: Any = None, inplace: bool = True,
             example_inputs: Any = None) -> nn.Module:
    """INC's ``quantize`` with config errors explained (``neural_compressor``'s own works too)."""
    return _inc_quantize(model, _parse(quant_config), run_fn=run_fn, run_args=run_args, inplace=inplace,
                         example_inputs=example_inputs)


def prepare(model: nn.Module, quant_config: Any, inplace: bool = True, example_inputs: Any = None) -> nn.Module:
    """INC's ``prepare``: layers quantized, search started; train, then :func:`convert`."""
    return _inc_prepare(model, _parse(quant_config), inplace=inplace, example_inputs=example_inputs)


def convert(model: nn.Module, quant_config: Any = None, inplace: bool = True) -> nn.Module:
    """INC's ``convert``: freezes the search started by :func:`prepare`; ``model.mpq_plan`` is the plan."""
    return _inc_convert(model, _parse(quant_config) if quant_config is not None else None, inplace=inplace)


# -- autotune over a budget ladder ------------------------------------------------------------------------
def _cost_key(cfg: Any) -> Tuple[float, ...]:
    b = getattr(cfg, "budget", None)
    if isinstance(b, Mapping):
        b = b.get("avg_weight_bits", b.get("weight_kb", b.get("bops")))
    hi = cfg.weight_bits if getattr(cfg, "weight_bits", None) is not None else getattr(cfg, "max_bits", 16)
    return (float("inf") if b is None else float(b), float(hi))


class CheapestFirstSampler(Sampler):
    """INC sampler: trials in increasing budget, so autotune's first trial within tolerance is the
    smallest model."""

    def __init__(self, config_source: Any) -> None:
        self.config_source = config_source

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(range(len(self.config_source)), key=lambda i: _cost_key(self.config_source[i])))

    def __len__(self) -> int:
        return len(self.config_source)


def autotune(model: nn.Module, eval_fn: Callable[..., float], run_fn: Any = None, *,
             budgets: Sequence[float] = DEFAULT_LADDER, tolerable_loss: float = 0.01,
             config: Optional[INCMPQConfig] = None, warm_start: bool = True, eval_args: Any = None,
             run_args: Any = None, example_inputs: Any = None) -> nn.Module:
    """Smallest model within ``tolerable_loss`` over a budget ladder, through INC's ``autotune``.

    Trials run cheapest first (:class:`CheapestFirstSampler`), each on a deep copy of the float
    ``model``; INC stops at the first trial with ``eval_fn(q) >= baseline * (1 - tolerable_loss)``.
    With ``warm_start`` each trial's search starts at the previous trial's bits. When no budget
    meets the tolerance, the best-scoring trial is returned with a warning.

    Args:
        model: the float model (left unchanged).
        eval_fn: ``eval_fn(model, *eval_args) -> float``, higher is better (INC's convention).
        run_fn: :func:`train_with` (or a custom training ``run_fn``, see the module docstring).
        budgets: average weight bits to try.
        tolerable_loss: relative loss INC accepts against the float baseline.
        config: a base :class:`INCMPQConfig` (method, bits, ``set_local`` overrides); its
            ``budget`` is replaced by ``budgets``.

    Returns:
        The chosen quantized model; ``model.mpq_autotune`` holds ``baseline``, ``trials`` (budget,
        score, avg_weight_bits, wall_s, passed, warm_started_from, warm_started_layers), ``chosen``
        and ``met_tolerance``.
    """
    if not budgets:
        raise ValueError("budgets is empty; give average weight bits to try, e.g. (2.5, 3, 4, 6)")
    if not isinstance(tolerable_loss, Real) or not 0.0 <= tolerable_loss < 1.0:
        raise ValueError(f"tolerable_loss={tolerable_loss!r} must be in [0, 1), e.g. 0.01 for 1%")
    base = copy.deepcopy(config) if config is not None else INCMPQConfig()
    if not isinstance(base, INCMPQConfig):
        raise TypeError(f"config must be mpq_plugin.inc.MPQConfig, got {type(base).__name__}")
    base.budget = sorted(float(b) for b in budgets)  # re-validated by INC's __setattr__ -> _post_init
    _validate(base)
    n_trials = len(base.expand())
    trials: List[Dict[str, Any]] = []
    state: Dict[str, Any] = {"baseline": None, "t": None, "best": None}
    warm = _WarmStart(warm_start)
    args = tuple(eval_args) if isinstance(eval_args, (tuple, list)) else (() if eval_args is None else (eval_args,))

    def recording_eval(q_model: nn.Module) -> float:
        score = float(eval_fn(q_model, *args))
        now = time.perf_counter()
        plan: Optional[BitPlan] = getattr(q_model, "mpq_plan", None)
        if state["baseline"] is None and plan is None:
            state["baseline"] = score
        else:
            b = plan.budget.avg_weight_bits if plan is not None and plan.budget is not None else None
            rec = {"trial": len(trials) + 1, "budget": b, "score": score,
                   "avg_weight_bits": plan.avg_weight_bits() if plan is not None else None,
                   "wall_s": now - state["t"],
                   "passed": score >= state["baseline"] * (1 - tolerable_loss),
                   "warm_started_from": getattr(q_model, "mpq_warm_started_from", None),
                   "warm_started_layers": getattr(q_model, "mpq_warm_started_layers", 0)}
            trials.append(rec)
            if rec["passed"] and "last_passed" not in state:
                state["last_passed"] = q_model
            log.info("mpq autotune trial %d: budget %s -> score %.4f (avg bits %s, %.1fs)%s", rec["trial"], b,
                     score, rec["avg_weight_bits"], rec["wall_s"], " within tolerance" if rec["passed"] else "")
            if state["best"] is None or score > state["best"][0]:
                state["best"] = (score, q_model, rec["trial"])
            if len(trials) >= n_trials and not any(t["passed"] for t in trials):
                warm.skip_training = True
        state["t"] = time.perf_counter()
        return score

    tune = TuningConfig(config_set=[base], sampler=CheapestFirstSampler, tolerable_loss=float(tolerable_loss),
                        max_trials=10**9)
    token = _WARM.set(warm)
    try:
        _inc_autotune(model, tune, eval_fn=recording_eval, run_fn=run_fn, run_args=run_args,
                      example_inputs=example_inputs)
    finally:
        _WARM.reset(token)
    if state["best"] is None:
        raise RuntimeError("autotune ran no trial")
    passed = [t for t in trials if t["passed"]]
    met = bool(passed)
    if met:  # INC stops at the first pass; the model is the one that trial evaluated
        chosen = passed[0]["trial"]
        best = state["last_passed"]
    else:
        score, best, idx = state["best"]
        log.warning("mpq autotune: no budget in %s is within tolerable_loss=%g of the float baseline %.4f; "
                    "returning the best trial (budget %s, score %.4f). Raise the budgets or the tolerance.",
                    sorted(budgets), tolerable_loss, state["baseline"], trials[idx - 1]["budget"], score)
        chosen = idx
    best.mpq_autotune = {"baseline": state["baseline"], "trials": trials, "chosen": chosen,  # type: ignore[assignment]
                         "met_tolerance": met, "tolerable_loss": float(tolerable_loss)}
    return best
