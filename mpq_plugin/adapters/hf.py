"""Hugging Face transformer rules: which modules of BERT-, GPT-2-, Llama- and ViT-style models
get quantizers, expressed as :class:`~mpq_plugin.MPQConfig` ``include``/``exclude``/``layer_overrides``.

Rules (one table per family, :data:`FAMILY_RULES`):

* quantized: every ``nn.Linear`` inside the attention blocks and the MLPs (q/k/v/o, up/gate/down,
  BERT ``intermediate``/``output``), plus GPT-2's ``Conv1D`` (a transposed linear layer: weight
  ``(in, out)``; its per-channel axis is 1);
* optional (``quantize_embeddings=True``): token/position embeddings and ViT's patch-embedding conv;
* skipped by default: task heads and poolers (``classifier``, ``pooler``, ``lm_head``, ``score``,
  ``qa_outputs``, ...), plus what transformers itself keeps float (output embeddings, tied weights);
* activations: with ``act_bits`` set, each quantized linear gets an *input* quantizer; embeddings get
  none (their inputs are token ids); attention matmuls (``QK^T``, ``softmax V``) are functional ops,
  not modules, and stay float.

Grouping: :func:`qkv_groups` lists the q/k/v projections of each attention block (also after the
layers were swapped for quantized ones). ``MpqConfig(share_qkv_bits=True)`` gives each group one
weight bit-width decision (:mod:`mpq_plugin.nn.sharing`).

This module is torch-only apart from an optional, lazy look-up of ``transformers``' ``Conv1D``.
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from torch import nn

__all__ = [
    "DEFAULT_SKIP",
    "QKV_LEAVES",
    "FAMILY_RULES",
    "detect_family",
    "hf_conv1d_type",
    "layer_override_map",
    "matches_any",
    "qkv_groups",
    "quantizable_modules",
    "resolve_skip",
]

#: module-name components kept float by default (heads, poolers)
DEFAULT_SKIP: Tuple[str, ...] = ("classifier", "pooler", "lm_head", "score", "qa_outputs", "cls",
                                 "pre_classifier", "seq_relationship")

#: leaf names of q/k/v projections (BERT/ViT classic, Llama/ViT in transformers 5, GPT-2 fused)
QKV_LEAVES: Tuple[str, ...] = ("query", "key", "value", "q_proj", "k_proj", "v_proj", "q_lin", "k_lin", "v_lin",
                               "c_attn", "qkv", "query_key_value")

#: per family: model_type values, embedding modules (regex on the full name)
FAMILY_RULES: Dict[str, Dict[str, Tuple[str, ...]]] = {
    "bert": {"model_types": ("bert", "roberta", "xlm-roberta", "distilbert", "electra", "camembert",
                             "mpnet", "deberta", "deberta-v2", "albert"),
             "embeddings": (r".*embeddings(\..*)?",)},
    "gpt2": {"model_types": ("gpt2", "gpt_neo", "gptj", "gpt_bigcode", "opt", "bloom", "falcon"),
             "embeddings": (r"(.*\.)?(wte|wpe|embed_tokens|embed_positions)",)},
    "llama": {"model_types": ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi", "phi3",
                              "mixtral", "olmo", "smollm3"),
              "embeddings": (r"(.*\.)?embed_tokens",)},
    "vit": {"model_types": ("vit", "deit", "beit", "dinov2", "swin", "vit_mae"),
            "embeddings": (r".*embeddings(\..*)?",)},
    "generic": {"model_types": (),
                "embeddings": (r".*(embeddings|embed_tokens|wte|wpe)(\..*)?",)},
}


def detect_family(model: nn.Module) -> str:
    """``bert`` | ``gpt2`` | ``llama`` | ``vit`` | ``generic`` from ``model.config.model_type``."""
    model_type = str(getattr(getattr(model, "config", None), "model_type", "") or "")
    for family, rules in FAMILY_RULES.items():
        if model_type in rules["model_types"]:
            return family
    return "generic"


def hf_conv1d_type() -> Optional[type]:
    """transformers' GPT-2 ``Conv1D`` class, or ``None`` when transformers is not installed."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is optional
        return None
    return Conv1D


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """HF-style match: ``p`` equals ``name``, is one of its dotted components/suffixes/prefixes,
    or fully matches it as a regex (``classifier`` matches ``classifier`` and ``model.classifier``)."""
    for p in patterns:
        if name == p or name.endswith("." + p) or name.startswith(p + ".") or ("." + p + ".") in name:
            return True
        try:
            if re.fullmatch(p, name):
                return True
        except re.error:
            continue
    return False


def resolve_skip(model: nn.Module, modules_to_not_convert: Optional[Sequence[str]],
                 extra_defaults: Sequence[str] = ()) -> List[str]:
    """The skip list: ``modules_to_not_convert`` as given (HF convention: an explicit list replaces
    the defaults), else :data:`DEFAULT_SKIP` plus ``extra_defaults`` (transformers' own list).

    Raises:
        ValueError: an explicit entry matches no module of ``model`` (a typo would silently
            quantize the head it meant to protect).
    """
    if modules_to_not_convert is None:
        return sorted(set(DEFAULT_SKIP) | set(extra_defaults))
    names = [n for n, _ in model.named_modules() if n]
    unknown = [p for p in modules_to_not_convert if not any(matches_any(n, [p]) for n in names)]
    if unknown:
        sample = ", ".join(names[-5:])
        raise ValueError(
            f"modules_to_not_convert entries {unknown} match no module of {type(model).__name__}; "
            f"use module names as in model.named_modules() (for example: {sample})"
        )
    return list(modules_to_not_convert)


def _kind(module: nn.Module, swapped: bool = False) -> Optional[str]:
    """The module's kind; with ``swapped``, a quantized layer counts as the float type it replaced."""
    conv1d = hf_conv1d_type()
    cls = getattr(module, "_float_cls", type(module)) if swapped else type(module)
    if cls is nn.Linear:
        return "linear"
    if conv1d is not None and cls is conv1d:
        return "conv1d"
    if cls is nn.Embedding:
        return "embedding"
    if cls in (nn.Conv1d, nn.Conv2d):
        return "conv"
    return None


def quantizable_modules(model: nn.Module, *, skip: Sequence[str] = DEFAULT_SKIP,
                        quantize_embeddings: bool = False, family: Optional[str] = None,
                        include: Sequence[str] = (), exclude: Sequence[str] = ()) -> Dict[str, str]:
    """``{name: kind}`` of the modules to quantize (``kind``: linear | conv1d | embedding | conv).

    Convolutions other than GPT-2's ``Conv1D`` count as embeddings (ViT patch embedding) and are
    quantized only with ``quantize_embeddings``.
    """
    family = family or detect_family(model)
    if family not in FAMILY_RULES:
        raise ValueError(f"unknown model family {family!r}; use one of {sorted(FAMILY_RULES)}")
    emb_patterns = FAMILY_RULES[family]["embeddings"]
    out: Dict[str, str] = {}
    for name, module in model.named_modules():
        kind = _kind(module)
        if kind is None or not name:
            continue
        if matches_any(name, skip) or any(_full(p, name) for p in exclude):
            continue
        if include and not any(_full(p, name) for p in include):
            continue
        is_embedding = kind in ("embedding", "conv") or any(re.fullmatch(p, name) for p in emb_patterns)
        if is_embedding and not quantize_embeddings:
            continue
        out[name] = kind
    return out


def _full(pattern: str, name: str) -> bool:
    return pattern == name or re.fullmatch(pattern, name) is not None


def qkv_groups(model: nn.Module, family: Optional[str] = None) -> List[Tuple[str, ...]]:
    """The q/k/v projections of each attention block, as tuples of module names (sorted q, k, v).

    A fused projection (GPT-2 ``c_attn``) is a one-element group. Quantized layers count as the
    float layers they replaced.
    """
    del family  # the leaf names are common to every family
    leaves = QKV_LEAVES
    groups: Dict[str, List[str]] = {}
    for name, module in model.named_modules():
        if _kind(module, swapped=True) not in ("linear", "conv1d"):
            continue
        parent, _, leaf = name.rpartition(".")
        if leaf in leaves:
            groups.setdefault(parent, []).append(name)
    order = {leaf: i for i, leaf in enumerate(leaves)}
    return [tuple(sorted(g, key=lambda n: order[n.rpartition(".")[2]])) for g in groups.values()]


def layer_override_map(overrides: Optional[Mapping[str, Mapping[str, object]]]) -> Dict[str, Dict[str, object]]:
    """Copy of user ``layer_overrides`` (JSON lists turned back into tuples)."""
    out: Dict[str, Dict[str, object]] = {}
    for k, v in (overrides or {}).items():
        out[k] = {kk: (tuple(vv) if isinstance(vv, list) else vv) for kk, vv in dict(v).items()}
    return out
