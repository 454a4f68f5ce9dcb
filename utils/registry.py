"""Name → object registries for architectures, loss heads, evaluators, objectives, aggregators.

Configs name components by a short canonical name (``trm``); upstream's ``module@Class`` strings
(``recursive_reasoning.trm@TinyRecursiveReasoningModel_ACTV1``) are registered as aliases so that
upstream YAML files and command lines keep working. Modules that register entries are imported on
the first lookup, so a registry is complete without import-order tricks.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of ``T`` with aliases.

    ``modules`` are imported before the first lookup; they register their entries with
    ``@registry.register("name", aliases=[...])`` or ``registry.add(...)``.
    """

    def __init__(self, kind: str, modules: Iterable[str] = ()) -> None:
        self.kind = kind
        self._modules = tuple(modules)
        self._loaded = False
        self._entries: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def add(self, name: str, obj: T, aliases: Iterable[str] = ()) -> T:
        """Register ``obj`` under ``name`` (and each alias); a name may be registered once."""
        for key in (name, *aliases):
            if key in self._entries or key in self._aliases:
                raise ValueError(f"{self.kind} '{key}' is registered twice")
        self._entries[name] = obj
        for alias in aliases:
            self._aliases[alias] = name
        return obj

    def register(self, name: str, aliases: Iterable[str] = ()) -> Callable[[T], T]:
        """Decorator form of ``add``."""

        def decorator(obj: T) -> T:
            return self.add(name, obj, aliases)

        return decorator

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in self._modules:
                importlib.import_module(module)

    def canonical(self, name: str) -> str:
        """The canonical name for ``name`` or an alias; ``ValueError`` listing the choices."""
        self._load()
        if name in self._entries:
            return name
        if name in self._aliases:
            return self._aliases[name]
        raise ValueError(f"unknown {self.kind} '{name}'; choose one of: {', '.join(self.names())}")

    def get(self, name: str) -> T:
        return self._entries[self.canonical(name)]

    def names(self) -> list[str]:
        """Canonical names, sorted."""
        self._load()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries or name in self._aliases
