"""A tiny name -> factory registry, shared by datasets, encoders, fusions and algorithms (timm-style)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from .errors import InputError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories. Lookup errors list the valid names.

    >>> FUSIONS = Registry("fusion")
    >>> @FUSIONS.register("mean")
    ... class MeanFusion: ...
    >>> FUSIONS.get("mean") is MeanFusion
    True
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}
        self._info: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **info: Any) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator adding ``factory`` under ``name``; ``info`` is what else the entry says of itself
        (e.g. a dataset's expected files and its check), read back with ``info(name)``."""

        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = factory
            self._info[name] = info
            return factory

        return decorator

    def info(self, name: str) -> dict[str, Any]:
        self.get(name)  # an unknown name is an error listing the valid ones
        return self._info[name]

    def get(self, name: str) -> Callable[..., T]:
        try:
            return self._entries[name]
        except KeyError:
            raise InputError(f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())}") from None

    def build(self, name: str, *args, **kwargs) -> T:
        return self.get(name)(*args, **kwargs)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
