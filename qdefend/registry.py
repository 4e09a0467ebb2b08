"""Registries by name: datasets, models, defenses, attacks and devices are looked up here.

The CLI lists them (`qdefend list models`) and the tests sweep them, so adding a component is one
decorated function or class.
"""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from .errors import QdefendError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object mapping whose unknown-name error lists the valid names."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._help: dict[str, str] = {}

    def register(self, name: str | None = None, help: str | None = None) -> Callable[[T], T]:
        """Decorator: register ``obj`` under ``name``, by default its own ``obj.name`` (a class's
        name is written once, on the class); a ``name`` that contradicts ``obj.name`` is refused."""
        def deco(obj: T) -> T:
            own = getattr(obj, "name", None)
            key = own if name is None else name
            if not isinstance(key, str) or not key:
                raise ValueError(f"{self.kind} {obj!r} has no name: give one or set .name on it")
            if isinstance(own, str) and own != key:
                raise ValueError(f"{self.kind} {obj!r} is named '{own}' but registered as '{key}'")
            return self._add(key, obj, help)

        return deco

    def _add(self, name: str, obj: T, help: str | None = None) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} '{name}' registered twice")
        self._items[name] = obj
        doc = help or (getattr(obj, "__doc__", None) or "").strip().splitlines()
        self._help[name] = doc if isinstance(doc, str) else (doc[0] if doc else "")
        return obj

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._items, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise QdefendError(
                f"unknown {self.kind} '{name}'. Valid {self.kind}s: {', '.join(self.names())}.{hint}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def describe(self, name: str) -> str:
        return self._help.get(name, "")

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
