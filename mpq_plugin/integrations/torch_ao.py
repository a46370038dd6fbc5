"""torch.ao (eager ``prepare_qat`` / FX ``prepare_qat_fx``) and PT2E fake-quant slots for every
registered method.

One generic :class:`MPQFakeQuantize` wraps a method's quantizer (``mpq_plugin.registry``); the
per-method classes (``SDQFakeQuantize``, ``LearnedRangeFakeQuantize``, ``CSQFakeQuantize``,
``LSQFakeQuantize``, ...) are generated from the registry, so a newly registered method gets its
class with no code here (:func:`fake_quantize_class`).

The one line for an existing torch.ao QAT script::

    qconfig_mapping = get_default_qat_qconfig_mapping("x86").set_global(get_mpq_qat_qconfig(method="sdq"))

Traps handled here (see ``docs/integrations-torch.md``):

* fusion compares qconfigs by equality of their ``with_args`` partials: :func:`get_mpq_qat_qconfig`
  is cached, so equal arguments give the *same* QConfig object;
* torchao's PT2E only accepts subclasses of *its* ``FakeQuantizeBase``: the class derives from
  torchao's and torch.ao's bases (torchao's when importable);
* a weight quantizer that needs the weight's shape (CSQ's bit planes, per-channel scales) can only
  be built when it first sees the weight; :func:`init_mpq_fake_quants` builds them before the
  optimizer is created.

Importing this module also registers a cost provider (``mpq_plugin.nn.costing``) so
``mpq_plugin.model_cost`` and ``mpq_plugin.search.MPQSearch`` find these fake-quants in prepared
models.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import sys
import warnings
import weakref
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple, Type, Union

import torch
import torch.ao.quantization as tq
from torch import nn
from torch.ao.quantization.observer import _with_args as _tq_with_args

from mpq_plugin import methods as _methods  # noqa: F401  (registers the built-in methods)
from mpq_plugin.config import MethodOptions, as_bit_range
from mpq_plugin.core.cost import LayerGeometry, conv_geometry, embedding_geometry, linear_geometry
from mpq_plugin.nn.costing import QuantSite, register_cost_provider
from mpq_plugin.nn.fake_quantizer import FakeQuantizer, QuantizerSpec
from mpq_plugin.registry import METHODS, get_method

log = logging.getLogger(__name__)

try:  # torchao's PT2E base: required by prepare_qat_pt2e / convert_pt2e
    from torchao.quantization.pt2e import FakeQuantizeBase as _AOFakeQuantizeBase

    _BASES: Tuple[type, ...] = (_AOFakeQuantizeBase, tq.FakeQuantizeBase)
except ImportError:  # pragma: no cover - torchao is optional
    _AOFakeQuantizeBase = None
    _BASES = (tq.FakeQuantizeBase,)

__all__ = [
    "MPQFakeQuantize",
    "fake_quantize_class",
    "get_mpq_qat_qconfig",
    "get_mpq_qat_qconfig_mapping",
    "init_mpq_fake_quants",
    "mpq_fake_quants",
]

_UNSIGNED = {torch.quint8: torch.qint8, torch.uint8: torch.int8}
_WEIGHT_DTYPES = (torch.qint8, torch.int8)

BitsArg = Union[int, Tuple[int, int]]

#: set by the init helpers, whose forward is meant to build shape-dependent quantizers
_QUIET_MATERIALIZE = False


@contextlib.contextmanager
def quiet_materialize() -> Iterator[None]:
    """Inside, a fake-quant building its quantizer at a forward does not warn (init helpers)."""
    global _QUIET_MATERIALIZE
    old, _QUIET_MATERIALIZE = _QUIET_MATERIALIZE, True
    try:
        yield
    finally:
        _QUIET_MATERIALIZE = old


def _bits_from_range(quant_min: Optional[int], quant_max: Optional[int]) -> Optional[Tuple[int, int]]:
    if quant_min is None or quant_max is None:
        return None
    b = int(math.ceil(math.log2(int(quant_max) - int(quant_min) + 1)))
    return (b, b)


class MPQFakeQuantize(*_BASES):  # type: ignore[misc]
    """A registered method's quantizer in a torch.ao / PT2E fake-quant slot.

    Args:
        observer, quant_min, quant_max, dtype, qscheme, ch_axis, is_dynamic: what the hosts pass
            (PT2E passes the ``QuantizationSpec`` fields). ``observer`` is ignored: the method
            initializes itself from the first tensor it sees. ``quant_min/quant_max`` give the
            bits when ``bits`` is not set.
        method: registry name (set by the generated per-method classes).
        role: ``"weight"`` or ``"act"`` (default: ``"weight"`` for ``qint8``/``int8``).
        bits: ``(min, max)`` bits (an int fixes them).
        options: the method's options (a ``MethodOptions`` or a mapping).
        per_channel: per-output-channel weight scales (methods that support them).
        calibration_batches: with N > 0, the first N forwards only observe (pass ``x`` through) with
            an :class:`~mpq_plugin.integrations.observer.MPQObserver`, which then initializes the
            quantizer (MSE-optimal range, starting bit-width); 0 (default) initializes from the
            first batch.

    The host reads ``quant_min``, ``quant_max``, ``dtype``, ``qscheme``, ``ch_axis`` and
    ``calculate_qparams()``; they follow the quantizer's *current* hard bit-width, so after
    ``freeze`` they describe the learned sub-8-bit range.
    """

    method: str = ""

    def __init__(self, observer: Any = None, quant_min: Optional[int] = None, quant_max: Optional[int] = None,
                 dtype: Optional[torch.dtype] = None, qscheme: Optional[torch.qscheme] = None,
                 ch_axis: Optional[int] = None, is_dynamic: bool = False, *, method: Optional[str] = None,
                 role: Optional[str] = None, bits: Optional[BitsArg] = None,
                 options: Union[None, MethodOptions, Mapping[str, Any]] = None,
                 per_channel: bool = False, calibration_batches: int = 0, **kwargs: Any) -> None:
        super().__init__()
        if int(calibration_batches) < 0:
            raise ValueError(f"calibration_batches={calibration_batches}; use 0 (initialize from the first batch) or more")
        self.calibration_batches = int(calibration_batches)
        self._calib_seen = 0
        self.__dict__["_calib_observer"] = None  # not a submodule: stays out of state_dict and host scans
        method = method or self.method
        if not method:
            raise ValueError("MPQFakeQuantize needs method=...; or use a per-method class such as SDQFakeQuantize")
        if is_dynamic:
            raise ValueError("mpq_plugin fake-quants learn static ranges; is_dynamic=True is not supported")
        spec = get_method(method)
        self.method = method
        if role is None:
            role = "weight" if dtype in _WEIGHT_DTYPES else "act"
        if role not in ("weight", "act"):
            raise ValueError(f"role={role!r}; use 'weight' or 'act'")
        self.role = role
        if bits is None:
            bits = _bits_from_range(quant_min, quant_max) or (8, 8)
        self.bits = as_bit_range(bits, f"{role} bits")
        if options is None or isinstance(options, MethodOptions):
            self.options = options if options is not None else spec.options_cls()
        else:
            self.options = spec.options_cls.from_mapping(dict(options))
        if per_channel and role == "weight" and not spec.quantizer_cls.supports_per_channel:
            raise ValueError(f"method {method!r} quantizes weights per tensor only; set per_channel=False")
        self.per_channel = bool(per_channel and role == "weight")
        self._dtype = dtype if dtype is not None else (torch.qint8 if role == "weight" else torch.quint8)
        self.is_dynamic = False
        self._in_shape: Optional[Tuple[int, ...]] = None  # per-sample shape of the last input (act)
        self.quantizer: Optional[FakeQuantizer] = None
        self._mpq_train_steps = 0  # training forwards seen (convert_mpq warns when frozen untrained)
        if not self._needs_tensor:
            self.quantizer = self._build(None)

    # -- construction -------------------------------------------------------------------------
    @property
    def _needs_tensor(self) -> bool:
        qcls = get_method(self.method).quantizer_cls
        return self.role == "weight" and (self.per_channel or qcls.replaces_weight)

    def _build(self, x: Optional[torch.Tensor]) -> FakeQuantizer:
        spec = get_method(self.method)
        shape = tuple(x.shape) if x is not None and self.role == "weight" else None
        qspec = QuantizerSpec(role=self.role, bits=self.bits, signed=True if self.role == "weight" else None,
                              channels=shape[0] if self.per_channel and shape else None, axis=0, shape=shape)
        q = spec.quantizer_cls(qspec, self.options)
        return q.to(x.device) if x is not None else q

    def materialize(self, x: torch.Tensor) -> None:
        """Build a shape-dependent quantizer (CSQ weights, per-channel scales) from ``x`` and
        initialize it; a no-op when it exists."""
        if self.quantizer is None:
            self.quantizer = self._build(x)
        if not bool(self.quantizer.initialized):
            with torch.no_grad():
                self.quantizer._initialize_from(x)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantizer is None:
            if not _QUIET_MATERIALIZE:
                log.warning("%s built its %s quantizer at the first forward: parameters created now are missing "
                            "from an optimizer built earlier; call mpq_plugin.ao.init_mpq_fake_quants(model) "
                            "(PT2E: mpq_plugin.pt2e.init_mpq_pt2e) before building the optimizer",
                            type(self).__name__, self.method)
            self.materialize(x.detach())
        if self.role == "act":
            self._in_shape = tuple(x.shape[1:])
        if self.training and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            self._mpq_train_steps = self.__dict__.get("_mpq_train_steps", 0) + 1
        if self.calibration_batches and not bool(self.quantizer.initialized):
            return self._calibrate(x)
        if self.fake_quant_enabled[0] == 0:
            if self.observer_enabled[0] == 1 and not bool(self.quantizer.initialized):
                self.quantizer._initialize_from(x)
            out = x
        else:
            out = self.quantizer(x)
        if self.role == "act" and isinstance(out, torch.Tensor) and not torch.compiler.is_compiling():
            out._mpq_fq = weakref.ref(self)  # lets the consuming layer find its input quantizer
        return out

    def _calibrate(self, x: torch.Tensor) -> torch.Tensor:
        from mpq_plugin.integrations.observer import MPQObserver

        if self._calib_observer is None:
            self.__dict__["_calib_observer"] = MPQObserver(dtype=torch.qint8 if self.role == "weight" else torch.quint8)
        self._calib_observer(x)
        self._calib_seen += 1
        if self._calib_seen >= self.calibration_batches:
            self._calib_observer.initialize(self.quantizer)
            self.__dict__["_calib_observer"] = None
        return x

    # -- what the hosts read -------------------------------------------------------------------
    def _state(self):  # the quantizer's frozen description (scale, zero point, bits, signedness)
        if self.quantizer is None or not bool(self.quantizer.initialized):
            return None
        return self.quantizer.freeze(None)

    @property
    def quant_min(self) -> int:
        st = self._state()
        if st is not None:  # a state may clip tighter than its bits (learned_range's code_min)
            return int(st.extra.get("code_min", st.qmin))
        b = self.bits[1]
        return -(2 ** (b - 1)) if self.role == "weight" else 0

    @property
    def quant_max(self) -> int:
        st = self._state()
        if st is not None:
            return int(st.extra.get("code_max", st.qmax))
        b = self.bits[1]
        return 2 ** (b - 1) - 1 if self.role == "weight" else 2**b - 1

    @property
    def dtype(self) -> torch.dtype:
        q = self.quantizer
        if q is not None and int(q.signed_flag) == 1 and self._dtype in _UNSIGNED:
            return _UNSIGNED[self._dtype]  # activations turned out signed
        return self._dtype

    @property
    def qscheme(self) -> torch.qscheme:
        if self.per_channel:
            return torch.per_channel_symmetric
        return torch.per_tensor_symmetric if self.role == "weight" else torch.per_tensor_affine

    @property
    def ch_axis(self) -> int:
        return 0 if self.per_channel else -1

    @property
    def activation_post_process(self) -> "_ObserverView":
        """torch.ao's FX prepare reads ``fq.activation_post_process.quant_min/quant_max/eps`` to
        check backend constraints; the method *is* the observer here, so this is a read-only view
        (a property, not a submodule: a submodule pointing back would make state_dict recurse)."""
        return _ObserverView(self)

    @torch.jit.export
    def calculate_qparams(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` of the current state (float32, int32; shape (C,) per channel)."""
        st = self._state()
        if st is None:
            raise RuntimeError(f"{type(self).__name__} has not seen data yet: run a forward pass first")
        if self.quant_max - self.quant_min + 1 < 256 and _called_from_torch_ao_convert():
            warnings.warn(f"torch.ao convert lowers {self.method} {self.role} fake-quants to int8 kernels, which lose "
                          f"the learned {self.quant_min}..{self.quant_max} range (numerics change); use "
                          "mpq_plugin.ao.convert_mpq (eager/FX, exact) or mpq_plugin.pt2e.convert_mpq_pt2e (PT2E)", UserWarning,
                          stacklevel=3)
        scale = st.scale.detach().float().reshape(-1)
        zp = st.zero_point.detach().round().to(torch.int32).reshape(-1)
        return scale, zp

    def extra_repr(self) -> str:
        return f"method={self.method}, role={self.role}, bits={self.bits}, per_channel={self.per_channel}"

    # torch.ao's and torchao's partial wrappers; the torch.ao flow uses this one explicitly
    tq_with_args = classmethod(_tq_with_args)


class _ObserverView:
    """What torch.ao reads from a fake-quant's observer, delegated to the fake-quant."""

    eps = float(torch.finfo(torch.float32).eps)

    def __init__(self, fq: MPQFakeQuantize) -> None:
        self._fq = fq

    def __getattr__(self, name: str) -> Any:
        if name in ("quant_min", "quant_max", "dtype", "qscheme", "ch_axis", "is_dynamic", "calculate_qparams"):
            return getattr(self._fq, name)
        raise AttributeError(name)


def _called_from_torch_ao_convert() -> bool:
    # torch.ao's convert/convert_fx call calculate_qparams from torch.ao.quantization.*; torchao's
    # PT2E convert (which keeps the range) from torchao.*
    f = sys._getframe(2)
    for _ in range(4):
        if f is None:
            return False
        name = str(f.f_globals.get("__name__", ""))
        if name.startswith("torch.ao.quantization") and "pt2e" not in name and "_decomposed" not in f.f_code.co_name:
            return True
        f = f.f_back
    return False


# -- per-method classes, generated from the registry ----------------------------------------------
def _class_name(method: str) -> str:
    parts = method.split("_")
    return "".join(p.upper() if len(p) <= 3 else p.capitalize() for p in parts) + "FakeQuantize"


_CLASSES: Dict[str, Type[MPQFakeQuantize]] = {}


def fake_quantize_class(method: str) -> Type[MPQFakeQuantize]:
    """The fake-quant class of a registered method (``"sdq"`` -> ``SDQFakeQuantize``)."""
    get_method(method)
    if method not in _CLASSES:
        name = _class_name(method)
        cls = type(name, (MPQFakeQuantize,), {
            "method": method, "__module__": __name__, "__qualname__": name,
            "__doc__": f"{MPQFakeQuantize.__doc__.splitlines()[0]} Method: ``{method}``.",
        })
        _CLASSES[method] = cls
        globals()[name] = cls  # importable (and picklable) by name
    return _CLASSES[method]


for _m in list(METHODS):
    fake_quantize_class(_m)
    __all__.append(_class_name(_m))


def __getattr__(name: str) -> Any:  # classes of methods registered after this import
    for m in list(METHODS):
        if _class_name(m) == name:
            return fake_quantize_class(m)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- qconfigs (cached: fusion needs equal qconfigs) ------------------------------------------------
def _norm_bits(bits: Optional[BitsArg], what: str) -> Optional[Tuple[int, int]]:
    return None if bits is None else tuple(as_bit_range(bits, what))  # type: ignore[return-value]


def _freeze_value(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return tuple(_freeze_value(x) for x in v)
    if isinstance(v, Mapping):
        return tuple(sorted((k, _freeze_value(x)) for k, x in v.items()))
    return v


def _norm_options(method: str, options: Union[None, MethodOptions, Mapping[str, Any]]) -> MethodOptions:
    cls = get_method(method).options_cls
    if options is None:
        return cls()
    if isinstance(options, MethodOptions):
        return options
    if not isinstance(options, Mapping):
        raise TypeError(f"options must be a mapping or a {cls.__name__}, got {type(options).__name__}")
    return cls.from_mapping(dict(options))


def default_weight_bits(method: str) -> Tuple[int, int]:
    """``(2, 8)`` for methods that search bit-widths, 4 bits for fixed-bit baselines."""
    return (2, 8) if get_method(method).quantizer_cls.searches_bits else (4, 4)


def fake_quant_kwargs(method: str, weight_bits: Optional[BitsArg], act_bits: Optional[BitsArg],
                      options: Union[None, MethodOptions, Mapping[str, Any]],
                      per_channel: bool) -> Tuple[Dict[str, Any], Optional[Dict[str, Any]]]:
    """Validated constructor arguments of the weight and activation fake-quants (shared by the
    torch.ao qconfig and the PT2E quantization config)."""
    opts = _norm_options(method, options)
    wb = _norm_bits(weight_bits, "weight_bits") or default_weight_bits(method)
    ab = _norm_bits(act_bits, "act_bits")
    qcls = get_method(method).quantizer_cls
    if per_channel and not qcls.supports_per_channel:
        raise ValueError(f"method {method!r} quantizes weights per tensor only; set per_channel=False")
    if not qcls.searches_bits and (wb[0] != wb[1] or (ab is not None and ab[0] != ab[1])):
        raise ValueError(f"method {method!r} is a fixed-bit baseline; pass weight_bits/act_bits as one int, e.g. 4")
    w = dict(role="weight", bits=wb, options=opts, per_channel=per_channel)
    a = dict(role="act", bits=ab, options=opts) if ab is not None else None
    return w, a


@functools.lru_cache(maxsize=None)
def _qat_qconfig(method: str, wb: Optional[Tuple[int, int]], ab: Optional[Tuple[int, int]],
                 options: MethodOptions, per_channel: bool) -> tq.QConfig:
    w, a = fake_quant_kwargs(method, wb, ab, options, per_channel)
    cls = fake_quantize_class(method)
    if a is None:
        raise ValueError("torch.ao static QAT needs quantized activations (act_bits=None leaves torch.ao's "
                         "backends without a dtype config, so the layer would stay float); use act_bits=8, "
                         "or mpq_plugin.torchao.MPQQATConfig(act_bits=None) for weight-only quantization")
    return tq.QConfig(activation=cls.tq_with_args(**a), weight=cls.tq_with_args(**w))


def get_mpq_qat_qconfig(method: str = "sdq", weight_bits: Optional[BitsArg] = None, act_bits: Optional[BitsArg] = 8,
                        options: Union[None, MethodOptions, Mapping[str, Any]] = None,
                        per_channel: bool = False) -> tq.QConfig:
    """A torch.ao ``QConfig`` whose weight and activation fake-quants are ``method``'s quantizers.

    Equal arguments return the *same* QConfig object (FX fusion checks that fused modules share
    equal qconfigs). ``weight_bits`` defaults to ``(2, 8)`` for searching methods and 4 for
    fixed-bit baselines.

    Example:
        >>> from torch.ao.quantization import get_default_qat_qconfig_mapping    # doctest: +SKIP
        >>> mapping = get_default_qat_qconfig_mapping("x86").set_global(get_mpq_qat_qconfig(method="sdq"))  # doctest: +SKIP
    """
    opts = _norm_options(method, options)
    try:
        hash(opts)
    except TypeError as e:  # an unhashable option value (a list): make it a tuple
        raise TypeError(f"options must be hashable to cache the qconfig ({e}); pass lists as tuples") from e
    return _qat_qconfig(method, _norm_bits(weight_bits, "weight_bits"), _norm_bits(act_bits, "act_bits"),
                        opts, bool(per_channel))


def get_mpq_qat_qconfig_mapping(method: str = "sdq", weight_bits: Optional[BitsArg] = None,
                                act_bits: Optional[BitsArg] = 8,
                                options: Union[None, MethodOptions, Mapping[str, Any]] = None,
                                per_channel: bool = False, backend: str = "x86") -> "tq.QConfigMapping":
    """``get_default_qat_qconfig_mapping(backend)`` with :func:`get_mpq_qat_qconfig` as global
    (fixed-qparams ops such as sigmoid keep torch.ao's own fake-quants)."""
    qc = get_mpq_qat_qconfig(method, weight_bits, act_bits, options, per_channel)
    return tq.get_default_qat_qconfig_mapping(backend).set_global(qc)


# -- discovery, initialization and costing -----------------------------------------------------------
def mpq_fake_quants(model: nn.Module) -> Iterator[Tuple[str, MPQFakeQuantize]]:
    """``(name, fake_quant)`` for every MPQFakeQuantize in ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, MPQFakeQuantize):
            yield name, m


def weight_seen_by_fake_quant(module: nn.Module) -> torch.Tensor:
    """The tensor ``module`` passes to its ``weight_fake_quant``: the weight, or for torch.ao's fused
    ConvBn QAT modules the weight scaled by ``bn.weight / sqrt(running_var + eps)``."""
    w = module.weight
    bn = getattr(module, "bn", None)
    if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.running_var is not None:
        sf = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        shape = [1] * w.dim()
        shape[0] = -1
        w = w * sf.reshape(shape)
    return w


def init_mpq_fake_quants(model: nn.Module, example_inputs: Optional[Tuple[Any, ...]] = None) -> nn.Module:
    """Build and initialize every weight fake-quant from its module's weight (so all parameters
    exist before the optimizer is built), install the shape hooks used for costing, and with
    ``example_inputs`` run one no-grad forward (modules keep their train/eval modes restored) to
    initialize activation fake-quants and record layer shapes."""
    with torch.no_grad():
        for _, m in model.named_modules():
            wfq = m._modules.get("weight_fake_quant") if hasattr(m, "_modules") else None
            if isinstance(wfq, MPQFakeQuantize):
                wfq.materialize(weight_seen_by_fake_quant(m).detach())
                _install_hooks(m)
    if example_inputs is not None:
        modes = {m: m.training for m in model.modules()}
        try:
            for m in model.modules():
                m.training = False
            with torch.no_grad(), quiet_materialize():
                model(*example_inputs)
        finally:
            for m, t in modes.items():
                m.training = t
    return model


def _record(module: nn.Module, args: Tuple[Any, ...], out: Any) -> None:
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor):
        module._mpq_in_shape = tuple(x.shape[1:])
        module._mpq_out_shape = tuple(out.shape[1:])


def _find_input_fq(module: nn.Module, args: Tuple[Any, ...]) -> None:
    # the MPQ activation fake-quant that produced this input tagged the tensor (every forward:
    # one getattr; keeps a deep copy pointing at its own fake-quants after its first forward)
    if args and isinstance(args[0], torch.Tensor):
        module._mpq_input_fq = getattr(args[0], "_mpq_fq", None)


def _install_hooks(module: nn.Module) -> None:
    if module.__dict__.get("_mpq_hooked"):
        return
    module.register_forward_pre_hook(_find_input_fq)
    module.register_forward_hook(_record)
    module._mpq_hooked = True


def _geometry(module: nn.Module, name: str) -> LayerGeometry:
    w = module.weight
    ins = module.__dict__.get("_mpq_in_shape")
    outs = module.__dict__.get("_mpq_out_shape")
    if isinstance(module, nn.Embedding):
        return embedding_geometry(name, module.num_embeddings, module.embedding_dim)
    if isinstance(module, nn.Linear):
        return linear_geometry(name, module.in_features, module.out_features, module.bias is not None,
                               ins if ins is not None else (module.in_features,))
    if isinstance(module, nn.modules.conv._ConvNd):
        if ins is None:
            raise RuntimeError(f"layer {name} has not run since mpq_plugin started tracking it, so its activation "
                               "size is unknown; call mpq_plugin.ao.init_mpq_fake_quants(model, example_inputs) "
                               "or run one forward pass first")
        return conv_geometry(name, tuple(w.shape), module.bias is not None, module.groups, ins, outs)
    raise TypeError(f"cannot cost {type(module).__name__} ({name}): only conv, linear and embedding layers")


def _ao_sites(model: nn.Module) -> Iterator[Tuple[str, QuantSite]]:
    """Cost provider: torch.ao eager/FX modules whose ``weight_fake_quant`` is an MPQFakeQuantize;
    their input quantizer is the MPQ activation fake-quant that produced their input."""
    mine = None
    for name, m in model.named_modules():
        wfq = m._modules.get("weight_fake_quant")
        if not isinstance(wfq, MPQFakeQuantize):
            continue
        _install_hooks(m)
        if wfq.quantizer is None:
            with torch.no_grad():
                wfq.materialize(weight_seen_by_fake_quant(m).detach())
        ref = m.__dict__.get("_mpq_input_fq")
        afq = ref() if ref is not None else None
        if afq is not None:
            mine = mine if mine is not None else {id(q) for _, q in mpq_fake_quants(model)}
            if id(afq) not in mine:  # a deep copy before its first forward points at the original's
                afq = None
        yield name, QuantSite(wfq.quantizer, afq.quantizer if afq is not None else None,
                              functools.partial(_geometry, m), is_embedding=isinstance(m, nn.Embedding))


register_cost_provider(_ao_sites)
