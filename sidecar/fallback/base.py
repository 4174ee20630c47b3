"""The fallback interface: where the sidecar asks when it cannot answer from memory.

A fallback returns a user's segment map `{segment: version}` (DESIGN.md's Aerospike bin
`segs`), an empty map for a user it does not know, or None when it cannot answer within its
budget (timeout, error, open circuit). It never raises for those.
"""

from __future__ import annotations

import abc


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
