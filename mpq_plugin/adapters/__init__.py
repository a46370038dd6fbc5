"""Adapters: model-family rules (which layers to fuse, pin or skip) on top of ``quantize_``."""
from mpq_plugin.adapters.vision import (
    PAPER_POLICIES,
    find_conv_bn_pairs,
    find_shortcut_convs,
    fuse_conv_bn_,
    layer_order,
    paper_policy,
    prepare_vision_model,
    quantize_vision_,
)

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
