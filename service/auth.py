"""Who is asking: API keys → principals, and what a principal may see. FastAPI-free (the worker
uses :class:`Principal` too; the HTTP side is :mod:`service.deps`).

Every model, dataset and job records its ``owner``. A client key sees what its owner created
(and the built-in models); an admin key sees everything; with no keys configured (the embedded
default, for one user on their own machine) access control is off and everything is shared.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from service.settings import Settings

__all__ = ["LOCAL", "KeyRing", "Principal"]


@dataclass(frozen=True)
class Principal:
    """The owner a request acts for. ``owner`` is None when access control is off: what it
    creates is unowned, and it sees everything."""

    owner: str | None
    admin: bool = False

    def can_see(self, owner: str | None) -> bool:
        """Whether a resource of ``owner`` is visible to this principal."""
        return self.admin or owner == self.owner


#: The principal of every request when access control is off.
LOCAL = Principal(owner=None, admin=True)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class KeyRing:
    """The configured keys, held as SHA-256 digests only, matched in constant time."""

    def __init__(self, settings: Settings) -> None:
        self._entries: list[tuple[bytes, Principal]] = [
            (_digest(key), Principal(owner=owner)) for key, owner in settings.api_keys.items()
        ]
        self._entries += [
            (_digest(key), Principal(owner=owner, admin=True))
            for key, owner in settings.admin_keys.items()
        ]

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    def authenticate(self, key: str) -> Principal | None:
        """The principal of ``key``, or None for an unknown key. Every entry is compared (with
        :func:`hmac.compare_digest`), so the time taken reveals nothing about which matched."""
        presented = _digest(key)
        found: Principal | None = None
        for digest, principal in self._entries:
            if hmac.compare_digest(digest, presented):
                found = principal
        return found
