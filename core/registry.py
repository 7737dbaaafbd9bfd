"""Named registries for pluggable strategies (architectures, CAM methods, fault models).

Modelled on torchvision's ``torchvision/models/_api.py``: ``register`` as a decorator, ``names``
to list, ``get`` to look up; a duplicate registration is refused and an unknown name is a clear
error that lists what is available.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from core.exceptions import RegistryError, UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name → object mapping that refuses duplicates and explains misses.

    ``kind`` names what is registered ("architecture", "CAM method", ...) in error messages;
    ``unknown_error`` is the :class:`UnknownNameError` subclass raised for a missing name, and
    ``field`` the request field such a name comes from, so APIs can point at it.
    """

    def __init__(
        self,
        kind: str,
        unknown_error: type[UnknownNameError] = UnknownNameError,
        *,
        field: str | None = None,
    ) -> None:
        self.kind = kind
        self._unknown_error = unknown_error
        self._field = field
        self._entries: dict[str, T] = {}

    def add(self, name: str, obj: T) -> T:
        """Register ``obj`` under ``name``; a name already taken is a :class:`RegistryError`."""
        if not name or name != name.strip():
            raise RegistryError(f"invalid {self.kind} name {name!r}")
        if name in self._entries:
            raise RegistryError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = obj
        return obj

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""

        def decorator(obj: T) -> T:
            return self.add(name, obj)

        return decorator

    def get(self, name: str) -> T:
        """The object registered under ``name``, or an error listing the known names."""
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(self.names()) or "none"
            raise self._unknown_error(
                f"unknown {self.kind} {name!r}; known: {known}", field=self._field
            ) from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
