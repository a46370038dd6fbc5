"""One bit-width decision shared by several weight quantizers (e.g. the q/k/v projections of a block).

    from mpq_plugin.nn.sharing import share_layer_bits
    share_layer_bits(model, [("attn.q", "attn.k", "attn.v")])   # q leads; k and v follow its bits

Why: q, k and v read the same input and are often fused into one kernel, so one bit-width per
block is what hardware runs, and three separate decisions waste the budget on noise.

How: the first quantizer of a group is the *leader*. Each follower keeps its own scales and
weights but drops the tensors that decide its bit-width (its *bit state*) and reads the leader's
instead: attribute look-ups of those names go to the leader (the follower's class becomes a
subclass with that routing). Nothing is stored twice, so

* the bit parameters get the gradients of every member (the budget penalty and the task loss of
  q, k and v all move one ``beta``), and an optimizer sees each of them once;
* ``force_bits``/``fix_bits``/``set_progress`` on any member act on the one shared decision;
* the state dict holds the bit state once, under the leader (safetensors refuses aliased tensors),
  and ``.to(device)`` moves it once.

The bit state of a method is named by its class attribute ``FakeQuantizer.bit_state`` (parameter
and buffer names; missing or ``None`` ones are skipped).
``bits_fixed`` is always shared, and so are the Python mirrors of shared ``host_state`` buffers
(``FakeQuantizer.host``). What that gives per method:

* ``sdq``: ``beta``/``beta_logit`` and ``level``: one decision during the search and at freeze;
* ``csq``: the plane-mask logits ``mu`` and ``kept_mask``: one decision during the search and at freeze;
* ``learned_range``: ``b`` (parametrizations U1, U2, P1, P2: one learned bit-width) and the bit
  range ``bit_lo``/``bit_hi``. With U3/P3 (default U3) the bits follow each layer's own step and
  range, so during the search the members may differ; ``force_bits`` and ``fix_bits`` set the
  shared range, so the frozen plan has one width per group (the search's freeze takes the
  group's minimum, see :func:`group_min_bits`);
* fixed-bit methods (``lsq``) have no decision; sharing leaves them alone.

A shared model cannot be pickled whole (the follower classes are made at run time); save its
``state_dict`` and share again before loading, as the transformers integration does.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from torch import nn

from mpq_plugin.nn.fake_quantizer import FakeQuantizer, host_attr

log = logging.getLogger(__name__)

__all__ = ["bit_leader", "bit_state_names", "group_min_bits", "share_bits", "share_layer_bits",
           "shared_bit_groups"]

_ALWAYS = ("bits_fixed",)


class _BitFollower:
    """Mixin of follower quantizers: the names in ``_shared_bit_names`` live on ``_bit_leader``."""

    def __getattr__(self, name: str) -> Any:
        d = self.__dict__
        if name in d.get("_shared_bit_names", ()):
            return getattr(d["_bit_leader"], name)
        return super().__getattr__(name)  # type: ignore[misc]

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.__dict__.get("_shared_bit_names", ()):
            setattr(self.__dict__["_bit_leader"], name, value)
            return
        super().__setattr__(name, value)


_FOLLOWER_CLASSES: Dict[type, type] = {}


def _follower_cls(cls: type) -> type:
    fc = _FOLLOWER_CLASSES.get(cls)
    if fc is None:
        fc = type(cls.__name__, (_BitFollower, cls), {"__module__": __name__,
                                                      "__qualname__": f"SharedBits[{cls.__qualname__}]"})
        _FOLLOWER_CLASSES[cls] = fc
    return fc


def bit_leader(q: FakeQuantizer) -> FakeQuantizer:
    """The quantizer whose bit state ``q`` uses (``q`` itself when it shares nothing)."""
    return q.__dict__.get("_bit_leader", q)


def bit_state_names(q: FakeQuantizer) -> Tuple[str, ...]:
    """The parameter and buffer names of ``q`` that decide its bit-width (present ones only,
    ``bits_fixed`` included).

    Raises:
        ValueError: ``q``'s method searches bits but does not say which state decides them.
    """
    names = type(q).bit_state
    if names is None:
        if q.spec.fixed or not getattr(type(q), "searches_bits", True):
            names = ()
        else:
            raise ValueError(
                f"method {q.method!r} does not declare which parameters decide its bit-width, so its "
                f"bits cannot be shared; set bit_state = (names...) on {type(q).__name__}, or do not share bits"
            )
    own = {**q._parameters, **q._buffers}
    return tuple(n for n in tuple(names) + _ALWAYS if own.get(n) is not None)


def share_bits(quantizers: Sequence[FakeQuantizer]) -> None:
    """Make ``quantizers[1:]`` use the bit state of ``quantizers[0]`` (see the module docstring).

    The followers adopt the leader's current bit state; their own copies are dropped.

    Raises:
        ValueError: fewer than two quantizers, a quantizer that already shares bits, or members of
            different methods, roles, bit ranges or options (one decision needs one search space).
    """
    qs = list(quantizers)
    if len(qs) < 2:
        raise ValueError(f"share_bits needs two or more quantizers, got {len(qs)}")
    leader = qs[0]
    for q in qs:
        if not isinstance(q, FakeQuantizer):
            raise TypeError(f"share_bits takes FakeQuantizers, got {type(q).__name__}")
        if "_bit_leader" in q.__dict__ or sum(o is q for o in qs) > 1:
            raise ValueError("a quantizer in this group already shares its bits (or appears twice); "
                             "each quantizer can belong to one group only")
    for q in qs[1:]:
        same = (type(q) is type(leader) and q.spec.role == leader.spec.role and q.spec.bits == leader.spec.bits
                and q.options == leader.options)
        if not same:
            raise ValueError(
                f"cannot share bits between a {leader.method} {leader.spec.role} quantizer with bits "
                f"{leader.spec.bits} and a {q.method} {q.spec.role} quantizer with bits {q.spec.bits} (or other "
                "options): members of a group need the same method, role, bit range and options; align their "
                "layer_overrides or do not share bits"
            )
    names = bit_state_names(leader)
    for q in qs[1:]:
        for n in names:
            mine, theirs = getattr(q, n), getattr(leader, n)
            if mine.shape != theirs.shape:
                raise ValueError(f"cannot share bits: {n} has shape {tuple(theirs.shape)} in the leader and "
                                 f"{tuple(mine.shape)} in a follower")
        mirrors = tuple(host_attr(n) for n in names if n in type(q).host_state)
        for n in names:
            q._parameters.pop(n, None)
            q._buffers.pop(n, None)
            q._non_persistent_buffers_set.discard(n)
        for m in mirrors:
            q.__dict__.pop(m, None)
        q.__class__ = _follower_cls(type(q))
        object.__setattr__(q, "_bit_leader", leader)
        object.__setattr__(q, "_shared_bit_names", frozenset(names + mirrors))
    log.debug("sharing %s of one %s quantizer with %d others", names, leader.method, len(qs) - 1)


def share_layer_bits(model: nn.Module, groups: Iterable[Sequence[str]]) -> List[Tuple[str, ...]]:
    """Share the weight bit-width of each group of quantized layers (module names; the first leads).

    Groups of one layer, and groups whose weight bits are fixed (nothing to decide), are skipped.

    Returns:
        The groups that now share one decision.

    Raises:
        ValueError: a name that is not a quantized layer of ``model`` (see also :func:`share_bits`).
    """
    done: List[Tuple[str, ...]] = []
    for group in groups:
        names = tuple(group)
        if len(names) < 2:
            continue
        qs = []
        for n in names:
            try:
                layer = model.get_submodule(n)
            except AttributeError:
                layer = None
            wq = getattr(layer, "weight_quantizer", None)
            if not isinstance(wq, FakeQuantizer):
                raise ValueError(f"{n!r} is not a quantized layer of {type(model).__name__}; share bits only "
                                 "between layers the config quantizes")
            qs.append(wq)
        if all(q.spec.fixed for q in qs) and len({q.spec.bits for q in qs}) == 1:
            continue
        share_bits(qs)
        done.append(names)
    return done


def shared_bit_groups(quantizers: Sequence[Optional[FakeQuantizer]]) -> List[List[int]]:
    """Indices into ``quantizers`` of the members of each sharing group with two or more members."""
    by_leader: Dict[int, List[int]] = {}
    for i, q in enumerate(quantizers):
        if q is not None:
            by_leader.setdefault(id(bit_leader(q)), []).append(i)
    return [ix for ix in by_leader.values() if len(ix) > 1]


def group_min_bits(bits: Sequence[float], groups: Sequence[Sequence[int]]) -> List[int]:
    """``bits`` (rounded) with every group set to its smallest member: one width per group that
    never costs more than ``bits`` (cost grows with bits), so a plan within budget stays so."""
    out = [int(round(b)) for b in bits]
    for g in groups:
        low = min(out[i] for i in g)
        for i in g:
            out[i] = low
    return out
