"""The method registry: one name -> (options class, quantizer class).

Every integration looks methods up here by name, so a method registered once appears in the
native flow, torch.ao, torchao, INC and transformers with no per-method code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Type, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class MethodSpec:
    """What the registry knows about a method."""

    name: str
    options_cls: Type[Any]
    quantizer_cls: Type[Any]

    @property
    def description(self) -> str:
        doc = (self.quantizer_cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


METHODS: Dict[str, MethodSpec] = {}


def register_method(name: str, options_cls: Type[Any]) -> Callable[[Type[T]], Type[T]]:
    """Class decorator registering a ``FakeQuantizer`` subclass under ``name``.

    Example:
        >>> @register_method("my_method", MyOptions)          # doctest: +SKIP
        ... class MyQuantizer(FakeQuantizer): ...
    """

    def wrap(cls: Type[T]) -> Type[T]:
        if name in METHODS and METHODS[name].quantizer_cls is not cls:
            raise ValueError(f"method {name!r} is already registered by {METHODS[name].quantizer_cls}")
        METHODS[name] = MethodSpec(name, options_cls, cls)
        setattr(cls, "method", name)
        setattr(cls, "options_cls", options_cls)
        return cls

    return wrap


def get_method(name: str) -> MethodSpec:
    """Look a method up; unknown names raise ``ValueError`` listing the known ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS)) or 'none'}")
    return METHODS[name]


def list_methods() -> List[str]:
    """Registered method names, sorted."""
    return sorted(METHODS)
