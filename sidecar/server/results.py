"""The one result shape of every query-layer op (sidecar/server/queries.py and
expressions.py): `(value, source)`, or a coroutine returning it when the fallback is needed."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

LOCAL = "local"
AEROSPIKE = "aerospike"
NONE = "none"
SOURCES = (LOCAL, AEROSPIKE, NONE)

#: (value, source): what an op answers and where the answer came from.
Result = tuple[Any, str]
#: A coroutine the caller awaits when the fallback is needed; it returns a Result.
Deferred = Coroutine[Any, Any, Result]


async def settle(result: Result | Deferred) -> Result:
    """The awaited form of any op: `await settle(q.batch(pairs))`."""
    if type(result) is tuple:
        return result
    return await result  # type: ignore[misc]
