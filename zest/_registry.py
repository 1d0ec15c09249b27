"""A small name -> object registry, shared by models, data sets and metrics."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from zest.errors import UnknownNameError, unknown_name_message

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects; ``get`` of an unknown name raises with the known names listed.

    Args:
        kind: What the registry holds, used in error messages ("model", "metric", ...).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **meta: Any) -> Callable[[T], T]:
        """Decorator that registers an object under ``name`` with optional metadata."""

        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            self._meta[name] = dict(meta)
            return obj

        return decorator

    def get(self, name: str) -> T:
        """The object registered as ``name``; raises :class:`UnknownNameError` otherwise."""
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(unknown_name_message(self.kind, name, self._items)) from None

    def unregister(self, name: str) -> None:
        """Removes ``name`` (a plugin's entry, or a test's); raises if it is not registered."""
        self.get(name)
        del self._items[name], self._meta[name]

    def meta(self, name: str) -> dict[str, Any]:
        """Metadata given at registration."""
        self.get(name)
        return self._meta[name]

    def names(self) -> list[str]:
        """Registered names in registration order."""
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)
