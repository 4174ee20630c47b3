"""asyncio client of the sidecar's Unix socket: the same API as `SidecarClient`, with any
number of concurrent requests pipelined on one connection (responses come back in request
order; each is matched to its request id)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any, Literal, overload

from ..expr.results import Count
from ..ids import MAX_WAIT_MS
from ..protocol import HEADER, HEADER_SIZE, ResponseError, decode_response
from . import base
from .base import ServerError, SidecarTimeout, SidecarUnavailable, typed, value_of

_hunpack = HEADER.unpack_from


class _Lost(Exception):
    """The connection closed while a request was outstanding."""


class _ClientProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiting: deque[tuple[int, asyncio.Future[list[Any]]]] = deque()
        self.buf = bytearray()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        while self.waiting:
            _, fut = self.waiting.popleft()
            if not fut.done():
                fut.set_exception(_Lost(repr(exc) if exc else "closed by the server"))

    def send(self, payload: bytes, ids: list[int]) -> list[asyncio.Future[list[Any]]]:
        if self.closed or self.transport is None or self.transport.is_closing():
            raise _Lost("not connected")
        loop = asyncio.get_running_loop()
        futs = []
        for rid in ids:
            fut: asyncio.Future[list[Any]] = loop.create_future()
            self.waiting.append((rid, fut))
            futs.append(fut)
        self.transport.write(payload)
        return futs

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        end = len(buf)
        while end - pos >= HEADER_SIZE:
            length = _hunpack(buf, pos)[0]
            stop = pos + HEADER_SIZE + length
            if stop > end:
                break
            try:
                resp = decode_response(buf[pos + HEADER_SIZE : stop])
            except ResponseError as exc:
                self._fail(ServerError(str(exc)))
                return
            pos = stop
            self._deliver(resp)
        del buf[:pos]

    def _deliver(self, resp: Any) -> None:
        if not self.waiting:
            self._fail(ServerError(f"unexpected response {resp!r}"[:200]))
            return
        rid, fut = self.waiting.popleft()
        if resp[0] not in (rid, None):
            if not fut.done():
                fut.set_exception(
                    ServerError(f"response {resp!r} does not match request {rid}"[:200])
                )
            self._fail(ServerError("protocol out of step; connection dropped"))
            return
        if not fut.done():
            fut.set_result(resp)

    def _fail(self, exc: Exception) -> None:
        while self.waiting:
            _, fut = self.waiting.popleft()
            if not fut.done():
                fut.set_exception(exc)
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class AsyncSidecarClient(base.BaseClient):
    """`AsyncSidecarClient(path, timeout=1.0)`; `async with` or `await connect()`. Safe to
    share between tasks of one event loop."""

    def _init_io(self) -> None:
        self._proto: _ClientProtocol | None = None
        self._lock: asyncio.Lock | None = None

    async def connect(self) -> AsyncSidecarClient:
        await self._connection()
        return self

    async def _connection(self) -> _ClientProtocol:
        proto = self._proto
        if proto is not None and not proto.closed:
            return proto
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            proto = self._proto
            if proto is not None and not proto.closed:
                return proto
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(self.timeout):
                    _, proto = await loop.create_unix_connection(_ClientProtocol, self.path)
            except TimeoutError:
                raise SidecarTimeout(f"connecting to {self.path} timed out") from None
            except OSError as exc:
                raise SidecarUnavailable(
                    f"cannot connect to the sidecar at {self.path}: {exc}"
                ) from exc
            self._proto = proto
            return proto

    async def close(self) -> None:
        proto, self._proto = self._proto, None
        if proto is not None and proto.transport is not None:
            proto.transport.close()

    async def __aenter__(self) -> AsyncSidecarClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _exchange(
        self, requests: Sequence[Sequence[Any]], wait: float = 0.0
    ) -> list[list[Any]]:
        for attempt in (0, 1):
            proto = await self._connection()
            payload, ids = self._frames(requests)
            try:
                futs = proto.send(payload, ids)
                async with asyncio.timeout(None if self.timeout is None else self.timeout + wait):
                    if len(futs) == 1:
                        return [await futs[0]]
                    return list(await asyncio.gather(*futs))
            except _Lost as exc:
                if attempt:
                    raise SidecarUnavailable(f"connection to {self.path} broke: {exc}") from None
            except TimeoutError:
                raise SidecarTimeout(
                    f"no response from {self.path} within {self.timeout} s"
                ) from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def call(self, op: str, *args: Any) -> Any:
        """One request; returns the raw result or raises the matching SidecarError."""
        return value_of((await self._exchange([(op, *args)]))[0])

    async def run(self, call: base.Call) -> Any:
        """One request as `base` encodes it, its result decoded."""
        result = value_of((await self._exchange([(call.op, *call.args)], call.wait))[0])
        return call.decode(result) if call.decode is not None else result

    async def ping(self) -> str:
        return await self.call("ping")

    async def check(self, user: int, segment: str) -> bool | None:
        return await self.call("check", user, segment)

    async def check_at(
        self, user: int, segment: str, min_version: int, wait_ms: int = MAX_WAIT_MS
    ) -> bool | None:
        """Read-your-publish (`base.check_at`): never an answer from state older than
        `min_version`; None when that version has not landed within `wait_ms`."""
        return await self.run(base.check_at(user, segment, min_version, wait_ms))

    async def check_many(self, user: int, segments: Sequence[str]) -> list[bool | None]:
        return await self.run(base.check_many(user, segments))

    async def batch(self, pairs: Iterable[tuple[int, str] | Sequence[Any]]) -> list[bool | None]:
        return await self.run(base.batch(pairs))

    @overload
    async def batch_packed(
        self, users: base.Users, segments: base.Segments, *, raw: Literal[False] = ...
    ) -> list[bool | None]: ...
    @overload
    async def batch_packed(
        self, users: base.Users, segments: base.Segments, *, raw: Literal[True]
    ) -> bytes: ...
    async def batch_packed(
        self, users: base.Users, segments: base.Segments, *, raw: bool = False
    ) -> list[bool | None] | bytes:
        """See `SidecarClient.batch_packed`."""
        return await self.run(base.batch_packed(users, segments, raw))

    async def segments(self, user: int) -> list[str]:
        return await self.call("segments", user)

    async def explain(self, user: int, segment: str) -> base.Explain:
        return await self.run(base.explain(user, segment))

    # -- segment expressions ---------------------------------------------------------------------
    async def eval(self, user: int, expr: str) -> bool | None:
        """`expr` (say "vip & !churned") for `user`: True / False / None (unknown)."""
        return await self.call("eval", user, expr)

    @overload
    async def eval_many(
        self, users: base.Users, expr: str, *, raw: Literal[False] = ...
    ) -> list[bool | None]: ...
    @overload
    async def eval_many(self, users: base.Users, expr: str, *, raw: Literal[True]) -> bytes: ...
    async def eval_many(
        self, users: base.Users, expr: str, *, raw: bool = False
    ) -> list[bool | None] | bytes:
        """`expr` for each of `users` (as `batch_packed` takes them), in order."""
        return await self.run(base.eval_many(users, expr, raw))

    async def count(self, expr: str) -> Count:
        """(count, versions) of a bounded expression over segments the sidecar holds."""
        return await self.run(base.count(expr))

    def audience(
        self, expr: str, *, after: int | None = None, limit: int | None = None
    ) -> AsyncAudienceExport:
        """The members of a bounded expression, ascending, streamed from the sidecar's HTTP
        server: `async with client.audience("a & !b") as export:` then `export.versions`
        and `async for user in export`."""
        return AsyncAudienceExport(
            base.http_address(self.http), base.audience_target(expr, after, limit)
        )

    async def status(self) -> dict[str, Any]:
        return await self.call("status")

    async def shm_info(self) -> dict[str, Any] | None:
        """Where the shared replica is published (docs/SHARED_REPLICA.md)."""
        return await self.run(base.shm_info())

    async def pipeline(self, requests: Iterable[Sequence[Any]]) -> list[Any]:
        """Many requests `(op, *args)` in one write; typed results or the SidecarError of
        each failed request, in order."""
        reqs = [tuple(r) for r in requests]
        if not reqs:
            return []
        responses = await self._exchange(reqs)
        return [typed(req[0], resp) for req, resp in zip(reqs, responses, strict=True)]


class AsyncAudienceExport(base.Export):
    """One streamed `GET /v1/audience` (aiohttp); `async with`, then `async for` the ids."""

    def __init__(self, address: tuple[str, int], target: str) -> None:
        self._url = f"http://{address[0]}:{address[1]}{target}"
        self._session: Any = None
        self._resp: Any = None

    async def __aenter__(self) -> AsyncAudienceExport:
        import aiohttp

        self._session = aiohttp.ClientSession()
        try:
            self._resp = await self._session.get(self._url)
            if self._resp.status != 200:
                raise base.http_failure(self._resp.status, await self._resp.read())
        except aiohttp.ClientError as exc:
            await self.aclose()
            raise SidecarUnavailable(f"cannot reach the sidecar at {self._url}: {exc}") from exc
        except BaseException:
            await self.aclose()
            raise
        super().__init__(self._resp.headers)
        return self

    async def __aiter__(self) -> AsyncIterator[int]:
        import aiohttp

        try:
            async for chunk in self._resp.content.iter_any():
                for user in self._ids(chunk):
                    yield user
        except aiohttp.ClientError as exc:
            raise SidecarUnavailable(f"the audience stream broke: {exc}") from exc
        for user in self._ids(b"", end=True):
            yield user

    async def aclose(self) -> None:
        if self._resp is not None:
            self._resp.release()
        if self._session is not None:
            await self._session.close()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
