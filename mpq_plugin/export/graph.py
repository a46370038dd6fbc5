"""Turn a quantized model into a chain of export ops (the graphs the integer path supports).

The model is traced with ``torch.fx`` (quantized layers stay leaves). Supported: a single chain
``input -> op -> op -> ... -> output`` of quantized Conv2d/Linear (``QuantConvBn2d`` included),
ReLU, MaxPool2d, AvgPool2d (no padding), global average pooling (``AdaptiveAvgPool2d(1)``),
flatten, and the identities of eval mode (Dropout, Identity). Anything else raises a
``ValueError`` naming the node, so an unsupported model never exports silently wrong.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from mpq_plugin.nn.layers import QuantLayer

_IDENTITY = (nn.Dropout, nn.Identity)


@dataclass
class ExportOp:
    """One op of the chain: ``kind`` plus its attributes; ``module`` for quantized layers."""

    kind: str  # quant_conv2d | quant_linear | relu | maxpool2d | avgpool2d | global_avgpool | flatten
    name: str
    attrs: Dict[str, Any] = field(default_factory=dict)
    module: Any = None


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, QuantLayer) or super().is_leaf_module(m, qualname)


def _pair(v: Any) -> Tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _module_op(name: str, m: nn.Module) -> ExportOp | None:
    if isinstance(m, QuantLayer):
        if isinstance(m, nn.Conv2d):  # QuantConv2d and QuantConvBn2d
            if m.padding_mode != "zeros" or isinstance(m.padding, str):
                raise ValueError(f"layer {name}: only numeric zero padding exports (got {m.padding!r}, "
                                 f"{m.padding_mode!r}); write padding as integers")
            return ExportOp("quant_conv2d", name, dict(stride=_pair(m.stride), padding=_pair(m.padding),
                                                      dilation=_pair(m.dilation), groups=int(m.groups)), m)
        if isinstance(m, nn.Linear):
            return ExportOp("quant_linear", name, {}, m)
        raise ValueError(f"layer {name} ({type(m).__name__}) has no integer export path; "
                         "supported quantized layers: Conv2d (with fused BN) and Linear")
    if isinstance(m, nn.ReLU):
        return ExportOp("relu", name)
    if isinstance(m, _IDENTITY):
        return None
    if isinstance(m, nn.MaxPool2d):
        if _pair(m.dilation) != (1, 1) or m.ceil_mode:
            raise ValueError(f"{name}: MaxPool2d with dilation or ceil_mode does not export")
        k = _pair(m.kernel_size)
        return ExportOp("maxpool2d", name, dict(kernel=k, stride=_pair(m.stride or k), padding=_pair(m.padding)))
    if isinstance(m, nn.AvgPool2d):
        if _pair(m.padding) != (0, 0) or m.ceil_mode or m.divisor_override is not None:
            raise ValueError(f"{name}: AvgPool2d exports without padding, ceil_mode or divisor_override only")
        k = _pair(m.kernel_size)
        return ExportOp("avgpool2d", name, dict(kernel=k, stride=_pair(m.stride or k)))
    if isinstance(m, nn.AdaptiveAvgPool2d):
        if _pair(m.output_size) != (1, 1):
            raise ValueError(f"{name}: only AdaptiveAvgPool2d(1) (global average pooling) exports")
        return ExportOp("global_avgpool", name)
    if isinstance(m, nn.Flatten):
        if m.start_dim != 1 or m.end_dim != -1:
            raise ValueError(f"{name}: only Flatten(1, -1) exports")
        return ExportOp("flatten", name)
    if isinstance(m, nn.BatchNorm2d):
        raise ValueError(f"{name}: BatchNorm2d is not fused into its conv; quantize with "
                         "mpq_plugin.adapters.vision.quantize_vision_(..., fold_bn=True) so BN folds into the weight")
    raise ValueError(f"{name} ({type(m).__name__}) has no integer export path; supported: quantized Conv2d/Linear, "
                     "ReLU, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d(1), Flatten, Dropout, Identity")


def _function_op(node: fx.Node) -> ExportOp | None:
    t = node.target
    if t in (torch.relu, F.relu) or t == "relu":
        return ExportOp("relu", node.name)
    if t in (torch.flatten,) or t == "flatten":
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        if start != 1 or end != -1:
            raise ValueError(f"{node.name}: only flatten(x, 1) exports (got start_dim={start}, end_dim={end})")
        return ExportOp("flatten", node.name)
    raise ValueError(f"{node.name} ({t}) has no integer export path; use ReLU / flatten(x, 1) or modules")


def trace_chain(model: nn.Module) -> List[ExportOp]:
    """The model as a list of :class:`ExportOp` (a single chain from input to output)."""
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # noqa: BLE001 - fx raises many types
        raise ValueError(f"the model could not be traced with torch.fx ({e}); the integer export supports "
                         "Sequential-style CNN/MLP chains") from e
    modules = dict(model.named_modules())
    ops: List[ExportOp] = []
    prev: fx.Node | None = None
    for node in graph.nodes:
        if node.op == "placeholder":
            if prev is not None:
                raise ValueError("the integer export supports models with one input tensor")
            prev = node
            continue
        if node.op == "output":
            if node.args[0] is not prev:
                raise ValueError("the model output must be the last op of the chain (one tensor)")
            break
        tensor_args = [a for a in node.all_input_nodes]
        if tensor_args != [prev]:
            raise ValueError(f"node {node.name} does not consume exactly the previous op's output; "
                             "the integer export supports single-chain (Sequential-style) graphs only")
        if node.op == "call_module":
            op = _module_op(str(node.target), modules[str(node.target)])
        elif node.op in ("call_function", "call_method"):
            op = _function_op(node)
        else:
            raise ValueError(f"node {node.name} ({node.op}) has no integer export path")
        if op is not None:
            ops.append(op)
        prev = node
    if not any(o.kind.startswith("quant_") for o in ops):
        raise ValueError("the model has no quantized layer; run mpq_plugin.quantize_ first")
    return ops
