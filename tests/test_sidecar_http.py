"""The HTTP API (DESIGN.md "Interfaces"): every route, and that bad client input is always a
4xx with {"error": ...}, never a 500."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
from pyroaring import BitMap64

from sidecar.fallback.base import Fallback
from sidecar.replica.runner import Replica
from sidecar.transport.logdir import LogDirTransport
from tests.logtools import LogState, SidecarThread, started_replica

MAX = 2**64 - 1
SEGMENTS = {
    "vip": BitMap64([1, 2, 3, MAX]),
    "cart:30m": BitMap64(range(100, 200)),
}


class MapFallback(Fallback):
    name = "map"

    def __init__(self, maps: dict[int, dict[str, int]]) -> None:
        self.maps = maps
        self.calls = 0

    async def segments_of(self, user: int) -> dict[str, int] | None:
        self.calls += 1
        return self.maps.get(user, {})


class Http:
    def __init__(self, base: str) -> None:
        parts = urlsplit(base)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, body: Any = None, raw: bytes | None = None) -> Any:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        headers = {"Content-Type": "application/json"} if data is not None else {}
        status, _, payload = self.request(method, path, data, headers)
        return status, json.loads(payload)

    def get(self, path: str) -> tuple[int, Any]:
        return self.json("GET", path)

    def post(self, path: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
        return self.json("POST", path, body, raw)


@pytest.fixture
def server(replica: Replica, workdir: Path) -> Iterator[SidecarThread]:
    with SidecarThread(replica, uds_path=None) as s:
        yield s


@pytest.fixture
def api(server: SidecarThread) -> Http:
    return Http(server.http_url)


def test_binds_loopback_by_default(server: SidecarThread) -> None:
    assert server.sidecar.http is not None
    assert server.sidecar.http.host == "127.0.0.1"
    runner = server.sidecar.http._runner
    assert runner is not None
    assert {addr[0] for addr in runner.addresses} == {"127.0.0.1"}


def test_check_get(api: Http, logstate: LogState) -> None:
    status, doc = api.get("/v1/check?user=1&segment=vip")
    assert status == 200
    assert doc == {
        "user": 1,
        "segment": "vip",
        "member": True,
        "source": "local",
        "version": logstate.segments["vip"][0],
    }
    assert api.get("/v1/check?user=4&segment=vip")[1]["member"] is False
    assert api.get(f"/v1/check?user={MAX}&segment=vip")[1]["member"] is True
    status, doc = api.get("/v1/check?user=150&segment=" + quote("cart:30m"))
    assert status == 200 and doc["member"] is True


def test_check_unknown_segment_is_null_not_404(api: Http) -> None:
    status, doc = api.get("/v1/check?user=1&segment=nope")
    assert status == 200
    assert doc["member"] is None and doc["source"] == "none" and doc["version"] is None


def test_check_post_in_order(api: Http) -> None:
    checks = [
        {"user": 1, "segment": "vip"},
        {"user": 150, "segment": "cart:30m"},
        {"user": 4, "segment": "vip"},
        {"user": 1, "segment": "nope"},
    ]
    status, doc = api.post("/v1/check", {"checks": checks})
    assert status == 200
    assert doc == {
        "results": [
            {"member": True, "source": "local"},
            {"member": True, "source": "local"},
            {"member": False, "source": "local"},
            {"member": None, "source": "none"},
        ]
    }
    assert api.post("/v1/check", {"checks": []}) == (200, {"results": []})


def test_check_post_limit(api: Http) -> None:
    ok = [{"user": i, "segment": "cart:30m"} for i in range(10_000)]
    status, doc = api.post("/v1/check", {"checks": ok})
    assert status == 200 and len(doc["results"]) == 10_000
    assert [r["member"] for r in doc["results"][95:105]] == [False] * 5 + [True] * 5
    status, doc = api.post("/v1/check", {"checks": [*ok, {"user": 1, "segment": "vip"}]})
    assert status == 400 and "10000" in doc["error"]


def test_body_over_limit_is_413(api: Http) -> None:
    body = b'{"checks": [' + b" " * (1 << 20) + b"]}"
    status, _, payload = api.request(
        "POST", "/v1/check", body, {"Content-Type": "application/json"}
    )
    assert status == 413
    assert "error" in json.loads(payload)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"{",
        b"\xff\xfe",
        b"[]",
        b"5",
        b"null",
        b'"checks"',
        b"{}",
        b'{"checks": 5}',
        b'{"checks": {"user": 1, "segment": "vip"}}',
        b'{"checks": [5]}',
        b'{"checks": [[1, "vip"]]}',
        b'{"checks": [{"user": 1}]}',
        b'{"checks": [{"segment": "vip"}]}',
        b'{"checks": [{"user": "1", "segment": "vip"}]}',
        b'{"checks": [{"user": 1.0, "segment": "vip"}]}',
        b'{"checks": [{"user": 1e3, "segment": "vip"}]}',
        b'{"checks": [{"user": true, "segment": "vip"}]}',
        b'{"checks": [{"user": null, "segment": "vip"}]}',
        b'{"checks": [{"user": -1, "segment": "vip"}]}',
        b'{"checks": [{"user": 18446744073709551616, "segment": "vip"}]}',
        b'{"checks": [{"user": 1' + b"0" * 5000 + b', "segment": "vip"}]}',
        b'{"checks": [{"user": NaN, "segment": "vip"}]}',
        b'{"checks": [{"user": Infinity, "segment": "vip"}]}',
        b'{"checks": [{"user": 1, "segment": ""}]}',
        b'{"checks": [{"user": 1, "segment": "bad seg"}]}',
        b'{"checks": [{"user": 1, "segment": 5}]}',
        b'{"checks": [{"user": 1, "segment": ["vip"]}]}',
        b'{"checks": [{"user": 1, "segment": {"a": 1}}]}',
        b'{"checks": [{"user": 1, "segment": "' + b"a" * 200 + b'"}]}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"checks": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    ],
)
def test_check_post_bad_input_is_400(api: Http, raw: bytes) -> None:
    status, doc = api.post("/v1/check", raw=raw)
    assert status == 400, doc
    assert isinstance(doc["error"], str) and doc["error"]


@pytest.mark.parametrize(
    "query",
    [
        "",
        "user=1",
        "segment=vip",
        "user=&segment=vip",
        "user=abc&segment=vip",
        "user=-1&segment=vip",
        "user=%2B1&segment=vip",
        "user=1.0&segment=vip",
        "user=1e3&segment=vip",
        "user=true&segment=vip",
        "user=18446744073709551616&segment=vip",
        "user=" + "9" * 5000 + "&segment=vip",
        "user=%EF%BC%91&segment=vip",  # a full-width digit one
        "user=1&segment=",
        "user=1&segment=bad%20seg",
        "user=1&segment=" + "a" * 129,
        "user=1&segment=-x",
    ],
)
def test_check_get_bad_input_is_400(api: Http, query: str) -> None:
    status, doc = api.get("/v1/check?" + query)
    assert status == 400, doc
    assert doc["error"]


def test_user_segments(api: Http) -> None:
    assert api.get("/v1/users/150/segments") == (
        200,
        {"user": 150, "segments": ["cart:30m"], "complete": True},
    )
    assert api.get("/v1/users/1/segments")[1]["segments"] == ["vip"]
    assert api.get("/v1/users/5/segments")[1]["segments"] == []
    for bad in ["abc", "-1", "18446744073709551616", "1.5", "9" * 1000]:
        status, doc = api.get(f"/v1/users/{bad}/segments")
        assert status == 400 and doc["error"], bad


def test_segment_list_and_info(api: Http, logstate: LogState) -> None:
    status, doc = api.get("/v1/segments")
    assert status == 200
    names = [s["segment"] for s in doc["segments"]]
    assert names == ["cart:30m", "vip"]
    vip = doc["segments"][1]
    assert vip["version"] == logstate.segments["vip"][0] and vip["cardinality"] == 4
    assert vip["updated_at"].endswith("Z") and "T" in vip["updated_at"]
    status, one = api.get("/v1/segments/vip")
    assert status == 200 and one == vip
    assert api.get("/v1/segments/cart:30m")[1]["cardinality"] == 100
    status, doc = api.get("/v1/segments/unknown_seg")
    assert status == 404 and "unknown_seg" in doc["error"]
    status, doc = api.get("/v1/segments/bad%20seg")
    assert status == 400 and doc["error"]


def test_explain_and_status(api: Http) -> None:
    status, doc = api.get("/v1/explain?user=1&segment=vip")
    assert status == 200 and doc["source"] == "local" and doc["member"] is True
    assert doc["reason"] is None and doc["age_ms"] >= 0
    status, doc = api.get("/v1/explain?user=1&segment=nope")
    assert doc["reason"] == "unknown" and doc["member"] is None
    status, doc = api.get("/v1/status")
    assert status == 200 and doc["ready"] is True and doc["segments"] == 2
    assert doc["lag"] == {"0": 0, "1": 0}


def test_status_counts_requests_as_the_metrics_do(api: Http) -> None:
    for query in ("user=1&segment=vip", "user=9&segment=vip", "user=1&segment=nope"):
        api.get("/v1/check?" + query)
    api.get("/v1/explain?user=1&segment=vip")
    api.get("/v1/check?user=x&segment=vip")  # a 400 is not a served request
    requests = api.get("/v1/status")[1]["requests"]["http"]
    assert requests["check"] == {"local": 2, "none": 1}
    assert requests["explain"] == {"local": 1}
    assert requests["batch"] == {}
    text = api.request("GET", "/metrics")[2].decode()
    assert 'seg_requests_total{op="check",result="ok",source="local",transport="http"} 2.0' in text


def test_health_and_ready(api: Http) -> None:
    assert api.get("/healthz") == (200, {"status": "ok"})
    status, doc = api.get("/readyz")
    assert status == 200 and doc["ready"] is True


def test_readyz_503_when_not_ready(workdir: Path) -> None:
    with (
        started_replica(LogDirTransport(workdir / "missing")) as waiting,
        SidecarThread(waiting, uds_path=None) as s,
    ):
        api = Http(s.http_url)
        status, doc = api.get("/readyz")
        assert status == 503 and doc["ready"] is False and "lag" in doc
        assert api.get("/healthz")[0] == 200
        assert api.get("/v1/check?user=1&segment=vip")[1]["source"] == "none"


def test_metrics(api: Http) -> None:
    api.get("/v1/check?user=1&segment=vip")
    status, headers, body = api.request("GET", "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    text = body.decode()
    assert 'seg_requests_total{op="check",result="ok",source="local",transport="http"}' in text
    assert "seg_replica_ready 1.0" in text
    assert 'seg_replica_lag_records{partition="0"} 0.0' in text
    assert "seg_replica_bitmap_bytes" in text
    assert "process_resident_memory_bytes" not in text  # tests turn process metrics off


def test_unknown_route_and_method(api: Http) -> None:
    status, doc = api.get("/nope")
    assert status == 404 and doc["error"]
    status, doc = api.json("DELETE", "/v1/check")
    assert status == 405 and doc["error"]
    status, doc = api.post("/v1/segments", {})
    assert status == 405


def test_fallback_over_http(replica: Replica) -> None:
    fb = MapFallback({1: {"remote": 3}})
    with SidecarThread(replica, fb, uds_path=None) as s:
        api = Http(s.http_url)
        status, doc = api.get("/v1/check?user=1&segment=remote")
        assert doc == {
            "user": 1,
            "segment": "remote",
            "member": True,
            "source": "aerospike",
            "version": 3,
        }
        status, doc = api.post(
            "/v1/check",
            {
                "checks": [
                    {"user": 1, "segment": "remote"},
                    {"user": 1, "segment": "vip"},
                    {"user": 2, "segment": "remote"},
                ]
            },
        )
        assert doc["results"] == [
            {"member": True, "source": "aerospike"},
            {"member": True, "source": "local"},
            {"member": False, "source": "aerospike"},
        ]
        assert fb.calls == 3  # GET (user 1), then POST: one call each for users 1 and 2


def test_never_500_on_garbage(api: Http) -> None:
    paths = [
        "/v1/check?user=%00&segment=%00",
        "/v1/check?user=1&segment=%FF",
        "/v1/users/%00/segments",
        "/v1/users//segments",
        "/v1/segments/%FF%FE",
        "/v1/check?user=1&user=2&segment=vip",
    ]
    for path in paths:
        status, _, _ = api.request("GET", path)
        assert status < 500, path
    for body in [b"\x00" * 100, b'{"checks": [' + b'{"user": 1, "segment": "vip"},' * 3 + b"]}"]:
        status, _, _ = api.request("POST", "/v1/check", body)
        assert status < 500


def test_http_only_and_port_zero(replica: Replica) -> None:
    with SidecarThread(replica, uds_path=None, http_port=0) as s:
        port = s.sidecar.http_port
        assert port and port > 0
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # closed on shutdown
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("port still open after shutdown")
