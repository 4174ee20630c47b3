"""openapi.json matches the server: every route is documented, and real responses validate
against the documented schemas."""

from __future__ import annotations

import http.client
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from pyroaring import BitMap64
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from sidecar.fallback.base import Fallback
from sidecar.replica.runner import Replica
from sidecar.server.http import openapi_bytes
from sidecar.transport.logdir import LogDirTransport
from tests.logtools import SidecarThread, publish_raw

SPEC: dict[str, Any] = json.loads(openapi_bytes())
URI = "urn:seg-sidecar:openapi"
REGISTRY = Registry().with_resource(
    URI, Resource.from_contents(SPEC, default_specification=DRAFT202012)
)


class MapFallback(Fallback):
    async def segments_of(self, user: int) -> dict[str, int] | None:
        return {"remote": 2} if user == 1 else None


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        parts = node["$ref"].lstrip("#/").split("/")
        node = SPEC
        for part in parts:
            node = node[part]
    return node


def response_schema(path: str, method: str, status: int) -> dict[str, Any]:
    op = SPEC["paths"][path][method.lower()]
    response = _resolve(op["responses"][str(status)])
    schema = response["content"]["application/json"]["schema"]
    if "$ref" in schema:
        return {"$ref": URI + schema["$ref"]}
    return schema


def validate(doc: Any, path: str, method: str, status: int) -> None:
    schema = response_schema(path, method, status)
    validator = jsonschema.Draft202012Validator(schema, registry=REGISTRY)
    validator.validate(doc)


@pytest.fixture(scope="module")
def server() -> Iterator[SidecarThread]:
    d = Path(tempfile.mkdtemp(prefix="so", dir="/tmp"))
    publish_raw(
        LogDirTransport(d / "log"),
        {"vip": BitMap64([1, 2, 2**64 - 1]), "cart:30m": BitMap64(range(100, 200))},
    )
    replica = Replica(LogDirTransport(d / "log")).start()
    assert replica.wait_ready(10)
    with SidecarThread(replica, MapFallback(), uds_path=None) as s:
        yield s
    replica.stop(save=False)
    shutil.rmtree(d, ignore_errors=True)


def fetch(server: SidecarThread, method: str, url: str, body: Any = None) -> tuple[int, Any]:
    port = server.sidecar.http_port
    assert port is not None
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, url, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        payload = resp.read()
        ctype = resp.getheader("Content-Type", "")
        return resp.status, json.loads(payload) if "json" in ctype else payload.decode()
    finally:
        conn.close()


def test_spec_is_openapi_31_and_schemas_are_valid() -> None:
    assert SPEC["openapi"].startswith("3.1")
    for name, schema in SPEC["components"]["schemas"].items():
        jsonschema.Draft202012Validator.check_schema(schema)
        assert name


def test_every_route_is_documented(server: SidecarThread) -> None:
    routes = set()
    for resource in server.sidecar.http.app.router.resources():  # type: ignore[union-attr]
        info = resource.get_info()
        path = info.get("path") or info.get("formatter")
        for route in resource:
            if route.method != "HEAD":
                routes.add((path, route.method.lower()))
    documented = {(p, m) for p, ops in SPEC["paths"].items() for m in ops}
    assert routes == documented


CASES: list[tuple[str, str, Any, str, int]] = [
    ("GET", "/v1/check?user=1&segment=vip", None, "/v1/check", 200),
    ("GET", "/v1/check?user=7&segment=nope", None, "/v1/check", 200),  # fallback: None
    ("GET", "/v1/check?user=1&segment=remote", None, "/v1/check", 200),  # fallback: aerospike
    ("GET", "/v1/check?user=x&segment=vip", None, "/v1/check", 400),
    ("GET", "/v1/check?user=1&segment=vip&min_version=1&wait_ms=0", None, "/v1/check", 200),
    ("GET", "/v1/check?user=1&segment=vip&min_version=9&wait_ms=10", None, "/v1/check", 200),
    ("GET", "/v1/check?user=1&segment=remote&min_version=2&wait_ms=0", None, "/v1/check", 200),
    ("GET", "/v1/check?user=1&segment=vip&min_version=1&wait_ms=1001", None, "/v1/check", 400),
    ("GET", "/v1/check?user=1&segment=vip&wait_ms=5", None, "/v1/check", 400),
    (
        "POST",
        "/v1/check",
        {"checks": [{"user": 1, "segment": "vip"}, {"user": 1, "segment": "remote"}]},
        "/v1/check",
        200,
    ),
    ("POST", "/v1/check", {"checks": 1}, "/v1/check", 400),
    ("GET", "/v1/explain?user=1&segment=vip", None, "/v1/explain", 200),
    ("GET", "/v1/explain?user=1&segment=remote", None, "/v1/explain", 200),
    ("GET", "/v1/explain?user=1", None, "/v1/explain", 400),
    ("GET", "/v1/eval?user=1&expr=vip%20%26%20!cart:30m", None, "/v1/eval", 200),
    ("GET", "/v1/eval?user=1&expr=vip%20%26%20remote", None, "/v1/eval", 200),  # fallback
    ("GET", "/v1/eval?user=7&expr=vip%20%7C%20nope", None, "/v1/eval", 200),  # unknown
    ("GET", "/v1/eval?user=1&expr=vip%20%26", None, "/v1/eval", 400),
    ("GET", "/v1/audience/count?expr=vip%20%7C%20cart:30m", None, "/v1/audience/count", 200),
    ("GET", "/v1/audience/count?expr=!vip", None, "/v1/audience/count", 400),
    ("GET", "/v1/audience/count?expr=vip%20%26%20remote", None, "/v1/audience/count", 409),
    ("GET", "/v1/audience?expr=(vip", None, "/v1/audience", 400),
    ("GET", "/v1/audience?expr=nope", None, "/v1/audience", 409),
    ("GET", "/v1/users/150/segments", None, "/v1/users/{user}/segments", 200),
    ("GET", "/v1/users/18446744073709551615/segments", None, "/v1/users/{user}/segments", 200),
    ("GET", "/v1/users/x/segments", None, "/v1/users/{user}/segments", 400),
    ("GET", "/v1/segments", None, "/v1/segments", 200),
    ("GET", "/v1/segments/vip", None, "/v1/segments/{segment}", 200),
    ("GET", "/v1/segments/nope", None, "/v1/segments/{segment}", 404),
    ("GET", "/v1/segments/bad%20seg", None, "/v1/segments/{segment}", 400),
    ("GET", "/v1/status", None, "/v1/status", 200),
    ("GET", "/healthz", None, "/healthz", 200),
    ("GET", "/readyz", None, "/readyz", 200),
]


@pytest.mark.parametrize(("method", "url", "body", "path", "status"), CASES)
def test_responses_match_the_spec(
    server: SidecarThread, method: str, url: str, body: Any, path: str, status: int
) -> None:
    got, doc = fetch(server, method, url, body)
    assert got == status, doc
    validate(doc, path, method, status)


def test_audience_is_text_with_the_documented_headers(server: SidecarThread) -> None:
    port = server.sidecar.http_port
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)  # type: ignore[arg-type]
    conn.request("GET", "/v1/audience?expr=vip%20%26%20!cart:30m&after=1")
    resp = conn.getresponse()
    spec = SPEC["paths"]["/v1/audience"]["get"]["responses"]["200"]
    assert resp.status == 200 and resp.getheader("Content-Type", "").startswith("text/plain")
    assert "text/plain" in spec["content"]
    for header in spec["headers"]:
        assert resp.getheader(header) is not None, header
    assert json.loads(resp.getheader("Seg-Versions", "")) == {"vip": 1, "cart:30m": 1}
    assert resp.read() == b"2\n18446744073709551615\n"
    conn.close()


def test_413_matches_the_spec(server: SidecarThread) -> None:
    port = server.sidecar.http_port
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)  # type: ignore[arg-type]
    conn.request("POST", "/v1/check", body=b" " * ((1 << 20) + 10))
    resp = conn.getresponse()
    assert resp.status == 413
    validate(json.loads(resp.read()), "/v1/check", "POST", 413)
    conn.close()


def test_readyz_503_matches_the_spec(tmp_path: Path) -> None:
    d = Path(tempfile.mkdtemp(prefix="so", dir="/tmp"))
    waiting = Replica(LogDirTransport(d / "missing")).start()
    try:
        with SidecarThread(waiting, uds_path=None) as s:
            status, doc = fetch(s, "GET", "/readyz")
            assert status == 503
            validate(doc, "/readyz", "GET", 503)
            status, doc = fetch(s, "GET", "/v1/users/1/segments")
            assert doc["complete"] is False
            validate(doc, "/v1/users/{user}/segments", "GET", 200)
    finally:
        waiting.stop(save=False)
        shutil.rmtree(d, ignore_errors=True)


def test_openapi_route_serves_the_file(server: SidecarThread) -> None:
    status, doc = fetch(server, "GET", "/openapi.json")
    assert status == 200 and doc == SPEC


def test_metrics_is_text(server: SidecarThread) -> None:
    status, text = fetch(server, "GET", "/metrics")
    assert status == 200 and "seg_requests_total" in text
