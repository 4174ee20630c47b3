"""The HTTP API (DESIGN.md "Interfaces"), JSON over aiohttp; `openapi.json` describes it.

Bad input is a 400 `{"error": "..."}`, a body over the limit a 413, an unknown route a 404;
client input never produces a 500 (a middleware turns any unexpected exception into
`500 {"error": "internal error"}` and logs it).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from ..expr import compile_arg, id_chunks
from ..expr.stream import as_lines
from ..ids import MAX_WAIT_MS, BadRequest, user_id_from_text
from ..replica import NotLocal
from .console import add_console
from .metrics import OK_KEYS, Metrics
from .queries import Queries
from .results import LOCAL, NONE, settle

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8571
DEFAULT_MAX_BODY = 1 << 20
MAX_CHECKS = 10_000
MAX_REQUEST_LINE = 16 * 1024


@dataclass(frozen=True, slots=True)
class HttpTimeouts:
    """Bounds for slow clients (seg-sidecar --http-idle-timeout / --http-body-timeout).

    `idle`: a connection is closed when no complete request head arrived within this many
    seconds of its opening or of its last response: it bounds both idle keep-alive and the
    time to send headers (a client trickling them a byte at a time). `body`: a request body
    not read within this many seconds is answered 408 and the connection closed."""

    idle: float = 15.0
    body: float = 10.0


QUERIES_KEY = web.AppKey("queries", Queries)
METRICS_KEY = web.AppKey("metrics", Metrics)
DEFAULT_TIMEOUTS = HttpTimeouts()
TIMEOUTS_KEY = web.AppKey("timeouts", HttpTimeouts)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.json_response(obj, status=status, dumps=_dumps)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, dumps=_dumps, headers=headers)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except NotLocal as exc:
        return _json({"error": str(exc), "segments": exc.segments}, status=409)
    except _Respond as answer:
        return answer.response
    except BadRequest as exc:
        return _error(400, str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = exc.text if exc.text and exc.status == 413 else exc.reason
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return _error(exc.status, message, headers)
    except Exception:
        log.exception("internal error serving %s %s", request.method, request.path)
        request.app[METRICS_KEY].error("http", "internal")
        return _error(500, "internal error")


def _query(request: web.Request, name: str) -> str:
    value = request.query.get(name)
    if value is None:
        raise BadRequest(f"missing query parameter {name!r}")
    return value


async def _read_body(request: web.Request) -> bytes:
    limit = request.app[TIMEOUTS_KEY].body
    try:
        async with asyncio.timeout(limit):
            return await request.read()
    except TimeoutError:
        response = _error(408, f"request body not received within {limit:g} s")
        response.force_close()
        raise _Respond(response) from None


class _Respond(Exception):
    """Answer with this response (raised from a helper, returned by the middleware)."""

    def __init__(self, response: web.Response) -> None:
        self.response = response


def _user_text(text: str, what: str = "user") -> int:
    if len(text) > 20:  # also keeps int() away from its digit limit
        raise BadRequest(f"{what} must be a decimal unsigned 64-bit integer, got {text[:24]!r}...")
    return user_id_from_text(text, what)


def _count_text(text: str, what: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 20:
        raise BadRequest(f"{what} must be a non-negative decimal integer, got {text[:24]!r}")
    return int(text)


def _iso(ms: int) -> str:
    moment = dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Api:
    def __init__(self, queries: Queries, metrics: Metrics) -> None:
        self.queries = queries
        self.metrics = metrics
        self._check = metrics.op("http", "check")
        self._batch = metrics.op("http", "batch")
        self._segments = metrics.op("http", "segments")
        self._explain = metrics.op("http", "explain")
        self._eval = metrics.op("http", "eval")
        self._count = metrics.op("http", "count")
        self._audience = metrics.op("http", "audience")

    async def check_get(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        user = _user_text(_query(request, "user"))
        segment = self.queries.names.check(_query(request, "segment"))
        min_version = request.query.get("min_version")
        if min_version is not None:
            wait_ms = request.query.get("wait_ms")
            (member, version), source = await settle(
                self.queries.check_at(
                    user,
                    segment,
                    _count_text(min_version, "min_version"),
                    MAX_WAIT_MS if wait_ms is None else _count_text(wait_ms, "wait_ms"),
                    versioned=True,
                )
            )
        else:
            if "wait_ms" in request.query:
                raise BadRequest("wait_ms needs min_version")
            doc, source = await settle(self.queries.explain(user, segment))
            member, version = doc["member"], doc["version"]
        self._check.record(OK_KEYS[source], time.perf_counter() - started)
        return _json(
            {
                "user": user,
                "segment": segment,
                "member": member,
                "source": source,
                "version": version,
            }
        )

    async def check_post(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        body = await _read_body(request)
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise BadRequest(f"body is not valid JSON: {exc}") from None
        if type(doc) is not dict:
            raise BadRequest('body must be a JSON object {"checks": [...]}')
        checks = doc.get("checks")
        if type(checks) is not list:
            raise BadRequest('"checks" must be a list of {"user", "segment"} objects')
        if len(checks) > MAX_CHECKS:
            raise BadRequest(f"at most {MAX_CHECKS} checks per request, got {len(checks)}")
        pairs: list[list[Any]] = []
        for i, item in enumerate(checks):
            if type(item) is not dict or "user" not in item or "segment" not in item:
                raise BadRequest(f'checks[{i}] must be an object with "user" and "segment"')
            pairs.append([item["user"], item["segment"]])
        results, source = await settle(self.queries.batch(pairs, sources=True))
        self._batch.record(OK_KEYS[source], time.perf_counter() - started)
        return _json({"results": [{"member": m, "source": s} for m, s in results]})

    async def user_segments(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        user = _user_text(request.match_info["user"])
        segments, source = await settle(self.queries.segments(user))
        self._segments.record(OK_KEYS[source], time.perf_counter() - started)
        return _json({"user": user, "segments": segments, "complete": source != NONE})

    async def explain(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        user = _user_text(_query(request, "user"))
        segment = self.queries.names.check(_query(request, "segment"))
        result, source = await settle(self.queries.explain(user, segment))
        self._explain.record(OK_KEYS[source], time.perf_counter() - started)
        return _json({"user": user, "segment": segment, **result})

    # -- segment expressions -------------------------------------------------------------------
    async def eval(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        user = _user_text(_query(request, "user"))
        expr = _query(request, "expr")
        (member, versions), source = await settle(self.queries.eval(user, expr, versions=True))
        self._eval.record(OK_KEYS[source], time.perf_counter() - started)
        return _json(
            {"user": user, "expr": expr, "member": member, "source": source, "versions": versions}
        )

    async def audience_count(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        expr = _query(request, "expr")
        doc, source = self.queries.count(expr)
        self._count.record(OK_KEYS[source], time.perf_counter() - started)
        return _json({"expr": expr, **doc})

    async def audience(self, request: web.Request) -> web.StreamResponse:
        """The members, one decimal id per line, ascending, written a chunk at a time from
        the audience's bitmap (computed once, under the replica's lock)."""
        started = time.perf_counter()
        expr = compile_arg(_query(request, "expr"))
        after_text = request.query.get("after")
        after = None if after_text is None else _user_text(after_text, "after")
        limit_text = request.query.get("limit")
        limit = None if limit_text is None else _count_text(limit_text, "limit")
        members, versions = self.queries.audience(expr.source)
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/plain; charset=utf-8",
                "Seg-Versions": _dumps(versions),
                "Seg-Count": str(len(members)),
            }
        )
        try:
            await response.prepare(request)
            for chunk in id_chunks(members, after, limit):
                await response.write(as_lines(chunk))
            await response.write_eof()
        except ConnectionResetError:  # the client went away: nothing left to answer
            pass
        self._audience.record(OK_KEYS[LOCAL], time.perf_counter() - started)
        return response

    async def segment_list(self, request: web.Request) -> web.Response:
        replica = self.queries.replica
        items = replica.segment_items()
        return _json({"segments": [_segment_doc(n, st, replica) for n, st in sorted(items)]})

    async def segment_info(self, request: web.Request) -> web.Response:
        name = self.queries.names.check(request.match_info["segment"])
        st = self.queries.replica.state(name)
        if st is None:
            return _error(404, f"segment {name!r} is not known to this sidecar")
        return _json(_segment_doc(name, st, self.queries.replica))

    async def status(self, request: web.Request) -> web.Response:
        return _json(_jsonable(self.queries.status()))

    async def healthz(self, request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        replica = self.queries.replica
        lag = {str(p): n for p, n in replica.lag().items()}
        reason = replica.reason()
        if replica.ready:
            return _json({"ready": True, "lag": lag, **({"reason": reason} if reason else {})})
        doc = {"ready": False, "lag": lag, "error": replica.error, "reason": reason}
        return _json(doc, status=503)

    async def metrics_text(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )


def _segment_doc(name: str, st: Any, replica: Any) -> dict[str, Any]:
    """`replica` says whether the segment is a TTL one ("expiring") and its next expiry."""
    next_expiry = replica.next_expiry(name)
    return {
        "segment": name,
        "version": st.version,
        "cardinality": st.cardinality,
        "updated_at": _iso(st.updated_ms),
        "health": st.health.value,
        "ttl": name in replica.engine.expiries,
        "next_expiry_at": _iso(next_expiry) if next_expiry is not None else None,
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def openapi_bytes() -> bytes:
    return resources.files("sidecar.server").joinpath("openapi.json").read_bytes()


def make_app(
    queries: Queries,
    metrics: Metrics,
    *,
    max_body: int = DEFAULT_MAX_BODY,
    ui: bool = True,
    timeouts: HttpTimeouts = DEFAULT_TIMEOUTS,
) -> web.Application:
    app = web.Application(client_max_size=max_body, middlewares=[errors_middleware])
    app[TIMEOUTS_KEY] = timeouts
    app[QUERIES_KEY] = queries
    app[METRICS_KEY] = metrics
    api = Api(queries, metrics)
    spec = openapi_bytes()

    async def openapi(request: web.Request) -> web.Response:
        return web.Response(body=spec, content_type="application/json")

    app.router.add_get("/v1/check", api.check_get, allow_head=False)
    app.router.add_post("/v1/check", api.check_post)
    app.router.add_get("/v1/explain", api.explain, allow_head=False)
    app.router.add_get("/v1/users/{user}/segments", api.user_segments, allow_head=False)
    app.router.add_get("/v1/eval", api.eval, allow_head=False)
    app.router.add_get("/v1/audience/count", api.audience_count, allow_head=False)
    app.router.add_get("/v1/audience", api.audience, allow_head=False)
    app.router.add_get("/v1/segments", api.segment_list, allow_head=False)
    app.router.add_get("/v1/segments/{segment}", api.segment_info, allow_head=False)
    app.router.add_get("/v1/status", api.status, allow_head=False)
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/readyz", api.readyz)
    app.router.add_get("/metrics", api.metrics_text, allow_head=False)
    app.router.add_get("/openapi.json", openapi, allow_head=False)
    if ui:
        add_console(app)
    return app


class HttpServer:
    """The app on a TCP socket (127.0.0.1 by default)."""

    def __init__(
        self,
        queries: Queries,
        metrics: Metrics,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        *,
        max_body: int = DEFAULT_MAX_BODY,
        shutdown_timeout: float = 5.0,
        ui: bool = True,
        timeouts: HttpTimeouts = DEFAULT_TIMEOUTS,
    ) -> None:
        self.app = make_app(queries, metrics, max_body=max_body, ui=ui, timeouts=timeouts)
        self.timeouts = timeouts
        self.host = host
        self.port = port
        self.shutdown_timeout = shutdown_timeout
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        self._runner = web.AppRunner(
            self.app,
            access_log=None,
            shutdown_timeout=self.shutdown_timeout,
            keepalive_timeout=self.timeouts.idle,  # aiohttp's default is an hour
            lingering_time=self.timeouts.body,  # reading an unread body before closing
            # a 1,024-character expression of 4-byte characters is 12 KiB percent-encoded:
            # aiohttp's 8 KiB default would refuse it in text/plain before the API sees it
            max_line_size=MAX_REQUEST_LINE,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        addresses = self._runner.addresses
        if addresses and self.port == 0:
            self.port = addresses[0][1]
        log.info("http listening on %s:%d", self.host, self.port)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
