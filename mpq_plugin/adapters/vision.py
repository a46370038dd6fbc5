"""Vision adapter: the rules a CNN user expects, as BN fusion plus ``MPQConfig.layer_overrides``.

``quantize_vision_(model, config, example_inputs)`` is ``quantize_`` for CNNs: it fuses every
Conv->BN pair into a :class:`~mpq_plugin.nn.conv_bn.ConvBn2d` (BN folded into the quantized
weight during QAT), pins the first conv and the last layer to 8 bits, optionally keeps 1x1
shortcut convs float, then calls :func:`mpq_plugin.quantize_`. Host integrations reuse the same
rules: call :func:`prepare_vision_model` on the float model and pass the overrides it returns
as ``MPQConfig(layer_overrides=...)`` to the integration.

Where quantizers sit. mpq_plugin quantizes the *input* of every conv/linear and its weight.
The input of a block's first conv is the previous block's output, i.e. the residual-add (and
ReLU) output; the classifier's input is the pooled feature map; so residual-add and pooling
outputs are quantized where the next layer consumes them. A tensor consumed by two layers (a
ResNet block input feeds ``conv1`` and the 1x1 ``downsample`` conv) gets one quantizer per
consumer; a deployment shares one (export picks the wider). The network input (the first
layer's input, the image) is not quantized by default (``quantize_first_input=False``), as in
the learned-range and CSQ code.

Depthwise and grouped convs fuse and quantize like any conv (folding is per output channel;
MACs count ``C_in/groups`` per output). Folded depthwise weights spread widely across channels,
so per-tensor weight scales lose precision at low bits (Nagel et al. 2019, data-free
quantization): prefer ``per_channel=True`` with methods that support it.

Paper defaults (:data:`PAPER_POLICIES`, :func:`paper_policy`):

* LSQ (Esser et al. 2020) and most low-bit papers: first conv and last FC at 8 bits
  (``first_layer_bits=8, last_layer_bits=8``: the library default), BN folded.
* Learned step size + dynamic range (Uhlich et al. 2020, §2.7): "we quantize all layers": first
  and last at the searched bits (``"same"``), BN kept float and unfolded (``fold_bn=False``),
  network input not quantized, option-A ResNet shortcuts (no 1x1 convs).
* CSQ (Xiao et al. 2023, §3.5): stem conv and final FC bit-parametrized (``"same"``), 1x1
  downsample convs float (``quantize_shortcuts=False``); CSQ's weight-replacing quantizer
  keeps BN unfolded during QAT anyway (see :mod:`mpq_plugin.nn.conv_bn`).
* SDQ (Huang et al. 2022): unknown (§4.5); the library default (8/8) is used.
"""
from __future__ import annotations

import logging
import operator
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

import torch
from torch import fx, nn

from mpq_plugin.api import quantize_
from mpq_plugin.config import MPQConfig, as_bit_range
from mpq_plugin.nn.conv_bn import ConvBn1d, ConvBn2d, fuse_conv_bn
from mpq_plugin.nn.layers import QuantLayer

log = logging.getLogger(__name__)

LayerBitsPolicy = Union[int, Tuple[int, int], None, str]
Pair = Tuple[str, str]

_BN_FOR = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d}
_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)  # ConvBn1d/2d are subclasses
_SHORTCUT_NAMES = ("downsample", "shortcut", "skip")
_ADD_TARGETS = (operator.add, operator.iadd, torch.add)
_BN_STATE = ("running_mean", "running_var", "num_batches_tracked")

#: keyword arguments of :func:`prepare_vision_model` that reproduce each paper's setup
PAPER_POLICIES: Dict[str, Dict[str, Any]] = {
    "lsq": dict(first_layer_bits=8, last_layer_bits=8, fold_bn=True, quantize_shortcuts=True),
    "learned_range": dict(first_layer_bits="same", last_layer_bits="same", fold_bn=False,
                          quantize_shortcuts=True),
    "csq": dict(first_layer_bits="same", last_layer_bits="same", fold_bn=True, quantize_shortcuts=False),
    "sdq": dict(first_layer_bits=8, last_layer_bits=8, fold_bn=True, quantize_shortcuts=True),
}


def paper_policy(method: str) -> Dict[str, Any]:
    """The policy keywords of ``method``'s paper (the library default for unknown methods)."""
    return dict(PAPER_POLICIES.get(method, PAPER_POLICIES["lsq"]))


# -- graph discovery ----------------------------------------------------------------------------
class _Tracer(fx.Tracer):
    """Keeps fused and quantized layers as leaves (torch.nn modules are leaves already)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (ConvBn1d, ConvBn2d, QuantLayer)) or super().is_leaf_module(m, qualname)


def _trace(model: nn.Module) -> Optional[fx.Graph]:
    try:
        return _Tracer().trace(model)
    except Exception as e:  # data-dependent control flow, unsupported ops, ...
        log.info("vision adapter: torch.fx cannot trace %s (%s: %s); falling back to module "
                 "order and attribute names", type(model).__name__, type(e).__name__, e)
        return None


def _module_nodes(graph: fx.Graph, modules: Mapping[str, nn.Module]) -> List[fx.Node]:
    return [n for n in graph.nodes if n.op == "call_module" and n.target in modules]


def _pairs_from_graph(graph: fx.Graph, modules: Mapping[str, nn.Module]) -> List[Pair]:
    """Conv nodes whose only user is the matching BN, each module called exactly once."""
    calls: Dict[str, int] = {}
    nodes = _module_nodes(graph, modules)
    for n in nodes:
        calls[n.target] = calls.get(n.target, 0) + 1  # type: ignore[index]
    pairs = []
    for n in nodes:
        conv = modules[n.target]  # type: ignore[index]
        bn_cls = _BN_FOR.get(type(conv))
        if bn_cls is None or len(n.users) != 1:
            continue
        user = next(iter(n.users))
        if (user.op == "call_module" and type(modules.get(user.target)) is bn_cls  # type: ignore[arg-type]
                and len(user.all_input_nodes) == 1 and calls[n.target] == 1 and calls[user.target] == 1):
            pairs.append((str(n.target), str(user.target)))
    return pairs


def _pairs_from_modules(model: nn.Module) -> List[Pair]:
    """Fallback: adjacent children of a plain ``nn.Sequential``, then ``conv*``/``bn*`` names."""
    pairs: List[Pair] = []
    for parent_name, parent in model.named_modules():
        prefix = parent_name + "." if parent_name else ""
        children = list(parent.named_children())
        if isinstance(parent, nn.Sequential) and type(parent).forward is nn.Sequential.forward:
            for (cn, c), (bn_name, b) in zip(children, children[1:]):
                if _BN_FOR.get(type(c)) is type(b):
                    pairs.append((prefix + cn, prefix + bn_name))
            continue
        named = dict(children)
        for cn, c in children:
            m = re.fullmatch(r"conv(.*)", cn)
            b = named.get(f"bn{m.group(1)}") if m else None
            if b is not None and _BN_FOR.get(type(c)) is type(b):
                pairs.append((prefix + cn, prefix + f"bn{m.group(1)}"))  # type: ignore[union-attr]
    return pairs


def _shared_modules(model: nn.Module) -> Set[int]:
    seen: Dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        seen[id(m)] = seen.get(id(m), 0) + 1
    return {k for k, v in seen.items() if v > 1}


def find_conv_bn_pairs(model: nn.Module, graph: Optional[fx.Graph] = None) -> Tuple[List[Pair], str]:
    """``([(conv_name, bn_name), ...], how)``: the Conv->BN pairs that can fuse.

    ``how`` is ``"fx"`` when found on the ``torch.fx`` graph (a conv whose only user is a BN
    of matching dimension), else ``"modules"`` (adjacency inside a plain ``nn.Sequential`` and
    ``conv``/``bn``, ``conv1``/``bn1``... attribute pairs: a heuristic; pass ``example_inputs`` to
    :func:`fuse_conv_bn_` to have it checked).
    """
    graph = graph if graph is not None else _trace(model)
    modules = dict(model.named_modules())
    if graph is not None:
        pairs, how = _pairs_from_graph(graph, modules), "fx"
    else:
        pairs, how = _pairs_from_modules(model), "modules"
    shared = _shared_modules(model)
    kept = []
    for conv_name, bn_name in pairs:
        conv, bn = modules[conv_name], modules[bn_name]
        if id(conv) in shared or id(bn) in shared:
            log.info("vision adapter: %s/%s is shared between submodules; not fusing", conv_name, bn_name)
        elif bn.num_features != conv.out_channels or not bn.track_running_stats:  # type: ignore[union-attr]
            log.info("vision adapter: %s/%s cannot fold (channels or no running stats)", conv_name, bn_name)
        else:
            kept.append((conv_name, bn_name))
    return kept, how


# -- fusion -------------------------------------------------------------------------------------
def _tensors(out: Any) -> List[torch.Tensor]:
    """Tensors inside a model output (a tensor, or nested tuples/lists/dicts of them)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


def _outputs(model: nn.Module, example_inputs: Sequence[Any]) -> List[torch.Tensor]:
    with torch.no_grad():
        return _tensors(model(*example_inputs))


class _EvalMode:
    """Eval mode inside the block (BN does not update), the previous modes restored after."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc: Any) -> None:
        for m, mode in self.modes:
            m.training = mode


def fuse_conv_bn_(model: nn.Module, pairs: Optional[Sequence[Pair]] = None,
                  example_inputs: Optional[Sequence[Any]] = None, verify: Optional[bool] = None) -> List[Pair]:
    """Replace each Conv->BN pair (in place): the conv by a ``ConvBn2d``, the BN by ``nn.Identity``.

    Args:
        pairs: ``(conv_name, bn_name)`` pairs; default :func:`find_conv_bn_pairs`.
        example_inputs: when given and ``verify`` holds, the eval outputs before and after
            fusion are compared; a mismatch undoes the fusion and raises.
        verify: compare outputs (default: only for pairs from the module-name heuristic).

    Returns:
        The fused pairs.

    Raises:
        ValueError: the heuristic pairs change the model's output (fuse explicit ``pairs``).
    """
    how = "given"
    if pairs is None:
        pairs, how = find_conv_bn_pairs(model)
    if verify is None:
        verify = how == "modules"
    check = example_inputs is not None and verify and len(pairs) > 0
    if check:
        with _EvalMode(model):
            before = _outputs(model, example_inputs)  # type: ignore[arg-type]
    originals = []
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        originals.append((conv_name, conv, bn_name, bn))
        model.set_submodule(conv_name, fuse_conv_bn(conv, bn))
        model.set_submodule(bn_name, nn.Identity())
    if check:
        with _EvalMode(model):
            after = _outputs(model, example_inputs)  # type: ignore[arg-type]
        if len(before) != len(after) or not all(torch.allclose(a, b, rtol=1e-4, atol=1e-5)
                                                for a, b in zip(before, after)):
            for conv_name, conv, bn_name, bn in reversed(originals):
                model.set_submodule(conv_name, conv)
                model.set_submodule(bn_name, bn)
            raise ValueError(
                "fusing Conv->BN pairs found by module names changed the model's output, so some "
                "conv's output is not consumed only by its BN; make the model traceable by "
                "torch.fx, pass explicit pairs=[(conv_name, bn_name), ...], or use fold_bn=False"
            )
    log.info("vision adapter: fused %d Conv->BN pairs (%s)", len(pairs), how)
    return list(pairs)


# -- layer roles --------------------------------------------------------------------------------
def layer_order(model: nn.Module, example_inputs: Optional[Sequence[Any]] = None,
                graph: Optional[fx.Graph] = None) -> List[str]:
    """Names of conv/linear layers in execution order (fx graph, else a forward pass with hooks,
    else module registration order)."""
    modules = dict(model.named_modules())
    is_layer = lambda m: isinstance(m, _LAYER_TYPES)  # noqa: E731
    graph = graph if graph is not None else _trace(model)
    if graph is not None:
        nodes = _module_nodes(graph, modules)
        order = [str(n.target) for n in nodes if is_layer(modules[n.target])]  # type: ignore[index]
        return list(dict.fromkeys(order))
    if example_inputs is not None:
        seen: List[str] = []
        hooks = [m.register_forward_pre_hook(lambda mod, inp, name=n: seen.append(name))
                 for n, m in modules.items() if is_layer(m)]
        try:
            with _EvalMode(model):
                _outputs(model, example_inputs)
        finally:
            for h in hooks:
                h.remove()
        return list(dict.fromkeys(seen))
    return [n for n, m in modules.items() if is_layer(m)]


def _reaches(node: fx.Node, target: fx.Node, blocked: fx.Node) -> bool:
    """Whether ``target`` is an ancestor of ``node`` along a path that avoids ``blocked``."""
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        if n is target:
            return True
        if n in seen or n is blocked:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return False


def _is_1x1(m: nn.Module) -> bool:
    return isinstance(m, (nn.Conv1d, nn.Conv2d)) and all(k == 1 for k in m.kernel_size)  # type: ignore[union-attr]


def find_shortcut_convs(model: nn.Module, graph: Optional[fx.Graph] = None) -> List[str]:
    """Names of 1x1 projection-shortcut convs (ResNet option B ``downsample``).

    On an fx graph: a 1x1 conv (optionally followed by BN/Identity) feeding an addition whose
    other operand also descends from the conv's input by a path around the conv, i.e. a conv on
    the skip branch of a residual block (MobileNetV2's 1x1 projections are on the main branch:
    not shortcuts). Without a graph: 1x1 convs under a module named
    ``downsample``, ``shortcut`` or ``skip``.
    """
    modules = dict(model.named_modules())
    graph = graph if graph is not None else _trace(model)
    if graph is None:
        return [n for n, m in modules.items()
                if _is_1x1(m) and any(part in _SHORTCUT_NAMES for part in n.split("."))]
    found = []
    for node in graph.nodes:
        is_add = (node.op == "call_function" and node.target in _ADD_TARGETS) or \
                 (node.op == "call_method" and node.target in ("add", "add_"))
        if not is_add:
            continue
        operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        if len(operands) != 2:
            continue
        for i, branch in enumerate(operands):
            other = operands[1 - i]
            n = branch
            passthrough = (nn.BatchNorm1d, nn.BatchNorm2d, nn.Identity)
            while n.op == "call_module" and isinstance(modules.get(n.target), passthrough):  # type: ignore[arg-type]
                n = n.args[0]  # type: ignore[assignment]
            if n.op != "call_module" or not _is_1x1(modules.get(n.target)):  # type: ignore[arg-type]
                continue
            conv_in = n.args[0]
            if isinstance(conv_in, fx.Node) and _reaches(other, conv_in, blocked=n):
                found.append(str(n.target))
    return list(dict.fromkeys(found))


# -- policy -------------------------------------------------------------------------------------
def _check_bits(value: LayerBitsPolicy, what: str) -> LayerBitsPolicy:
    if value is None or value == "same":
        return value
    if isinstance(value, str):
        raise ValueError(f"{what}={value!r}; use an int (e.g. 8), a (min, max) pair, None (float) or 'same'")
    return as_bit_range(value, what)  # type: ignore[arg-type]


def prepare_vision_model(model: nn.Module, example_inputs: Optional[Sequence[Any]] = None, *,
                         fold_bn: bool = True, first_layer_bits: LayerBitsPolicy = 8,
                         last_layer_bits: LayerBitsPolicy = 8, quantize_first_input: bool = False,
                         quantize_shortcuts: bool = True) -> Dict[str, Dict[str, Any]]:
    """Fuse Conv->BN pairs (in place) and return the first/last/shortcut ``layer_overrides``.

    Args:
        model: a float CNN (not yet quantized).
        example_inputs: optional inputs; used to order layers and to check heuristic fusion
            when the model does not trace with ``torch.fx``.
        fold_bn: fuse each Conv->BN pair into a ``ConvBn2d``/``ConvBn1d`` (BN folded into the
            quantized weight during QAT). ``False`` keeps BN float and unfolded (learned range).
        first_layer_bits: bits of the first conv's weight: an int or ``(min, max)`` (LSQ: 8),
            ``"same"`` (searched like any layer: learned range, CSQ) or ``None`` (kept float).
        last_layer_bits: bits of the last layer (the classifier), weight and input activation;
            same choices.
        quantize_first_input: quantize the network input (the first layer's input activation),
            at ``first_layer_bits`` when that is a number, else at the config's ``act_bits``.
        quantize_shortcuts: quantize 1x1 projection-shortcut convs (``False``: float, as CSQ's code).

    Returns:
        ``{layer_name: {"weight_bits": .., "act_bits": .., "skip": ..}}`` for ``MPQConfig.layer_overrides``.

    Raises:
        ValueError: a bad policy value, or the model is already quantized.

    Example:
        >>> from mpq_plugin.models import resnet20
        >>> m = resnet20()
        >>> prepare_vision_model(m)["fc"]
        {'weight_bits': (8, 8), 'act_bits': (8, 8)}
    """
    first_layer_bits = _check_bits(first_layer_bits, "first_layer_bits")
    last_layer_bits = _check_bits(last_layer_bits, "last_layer_bits")
    if any(isinstance(m, QuantLayer) for m in model.modules()):
        raise ValueError("the model is already quantized; call prepare_vision_model/quantize_vision_ "
                         "on the float model (mpq_plugin.dequantize_ reverts a quantized one)")
    graph = _trace(model)
    order = layer_order(model, example_inputs, graph)
    shortcuts = [] if quantize_shortcuts else find_shortcut_convs(model, graph)
    if fold_bn:
        pairs, how = find_conv_bn_pairs(model, graph)
        fuse_conv_bn_(model, pairs, example_inputs, verify=how == "modules")
    overrides: Dict[str, Dict[str, Any]] = {name: {"skip": True} for name in shortcuts}
    if not order:
        log.warning("vision adapter: no conv/linear layer found")
        return overrides
    last = _layer_policy(last_layer_bits, act=True)
    if last:
        overrides[order[-1]] = last
    first = _layer_policy(first_layer_bits, act=quantize_first_input)
    if not quantize_first_input and first_layer_bits is not None:
        first["act_bits"] = None  # the network input stays float
    if first:
        overrides[order[0]] = first
    return overrides


def _layer_policy(bits: LayerBitsPolicy, act: bool) -> Dict[str, Any]:
    if bits is None:
        return {"skip": True}
    if bits == "same":
        return {}
    return {"weight_bits": bits, "act_bits": bits} if act else {"weight_bits": bits}


def quantize_vision_(model: nn.Module, config: MPQConfig, example_inputs: Optional[Sequence[Any]] = None,
                     **policy: Any) -> nn.Module:
    """:func:`prepare_vision_model` then :func:`mpq_plugin.quantize_` (in place).

    ``policy`` takes :func:`prepare_vision_model`'s keywords (``paper_policy(config.method)``
    gives each paper's). The policy's overrides are merged under ``config.layer_overrides``
    (an entry of the config for the same layer name wins). With ``config.act_bits=None`` the
    policy adds no activation quantizer. BN running statistics are not changed by the
    calibration forward pass.

    Example:
        >>> import mpq_plugin
        >>> from mpq_plugin.models import resnet20
        >>> m = quantize_vision_(resnet20(), mpq_plugin.MPQConfig(method="lsq", weight_bits=4),
        ...                      (torch.randn(2, 3, 32, 32),))
        >>> m.conv1.weight_quantizer.bits, m.layer1[0].conv1.weight_quantizer.bits
        (8, 4)
    """
    if not isinstance(config, MPQConfig):
        raise TypeError(f"config must be an mpq_plugin.MPQConfig, got {type(config).__name__}")
    overrides = prepare_vision_model(model, example_inputs, **policy)
    if config.act_bits is None:
        for ov in overrides.values():
            if ov.get("act_bits") is not None:
                del ov["act_bits"]
    merged = {**overrides, **config.layer_overrides}
    bn_state = [(t, t.clone()) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                for t in (getattr(m, k) for k in _BN_STATE) if t is not None]
    try:
        quantize_(model, config.replace(layer_overrides=merged), example_inputs)
    finally:
        with torch.no_grad():
            for t, saved in bn_state:
                t.copy_(saved)
    return model


__all__ = [
    "PAPER_POLICIES",
    "find_conv_bn_pairs",
    "find_shortcut_convs",
    "fuse_conv_bn_",
    "layer_order",
    "paper_policy",
    "prepare_vision_model",
    "quantize_vision_",
]
