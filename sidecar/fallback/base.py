"""The fallback interface: where the sidecar asks when it cannot answer from memory.

A fallback returns a user's segment map `{segment: version}` (DESIGN.md's Aerospike bin
`segs`), an empty map for a user it does not know, or None when it cannot answer within its
budget (timeout, error, open circuit). It never raises for those. A fallback that knows TTL
memberships' expiries returns a `FallbackMap`, which also carries them (`explain` shows them).
"""

from __future__ import annotations

import abc


class FallbackMap(dict[str, int]):
    """A segment map `{segment: version}` with, for its TTL memberships, `expires_at`:
    `{segment: expires_at_ms}` (DESIGN.md "Freshness")."""

    __slots__ = ("expires_at",)

    def __init__(self) -> None:
        super().__init__()
        self.expires_at: dict[str, int] = {}


class Fallback(abc.ABC):
    name: str = "none"

    @abc.abstractmethod
    async def segments_of(self, user: int) -> dict[str, int] | None: ...

    def status(self) -> dict[str, object]:
        return {"kind": self.name}

    async def close(self) -> None:
        return None


class NoFallback(Fallback):
    """No fallback configured: whatever the replica cannot answer is unknown (None)."""

    name = "none"

    async def segments_of(self, user: int) -> dict[str, int] | None:
        return None
