"""`http`: the sidecar's HTTP API with one keep-alive client (`http.client`, blocking):
`GET /v1/check?user=U&segment=S`, `POST /v1/check` with one check and with 100 checks,
interleaved in rounds like `check`. Latency includes reading and JSON-decoding the body."""

from __future__ import annotations

import http.client
import json
from pathlib import Path
from typing import Any

from . import data
from .check import interleave, round_table
from .report import cpu_lines, image_lines, latency_rows, plot_latency
from .services import Context, log

POST_MANY = 100


class Api:
    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.headers = {"Content-Type": "application/json", "Connection": "keep-alive"}

    def _do(self, method: str, path: str, body: bytes | None = None) -> Any:
        self.conn.request(method, path, body=body, headers=self.headers)
        resp = self.conn.getresponse()
        raw = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{method} {path}: HTTP {resp.status} {raw[:200]!r}")
        return json.loads(raw)

    def get(self, user: int, segment: str) -> bool | None:
        return self._do("GET", f"/v1/check?user={user}&segment={segment}")["member"]

    def post(self, checks: list[dict[str, Any]]) -> list[bool | None]:
        body = json.dumps({"checks": checks}).encode()
        return [r["member"] for r in self._do("POST", "/v1/check", body)["results"]]

    def close(self) -> None:
        self.conn.close()


def run(ctx: Context) -> dict[str, Any]:
    rounds = 10
    # 2,500 a round: the per-round p50s of 5,000 stayed within +-10% over 10 rounds
    per_round = ctx.sizes.pick(300, 2_500)
    serve = ctx.serve()
    qs = data.queries(serve.segments, per_round * 2, seed=31)
    many = data.queries(serve.segments, POST_MANY * per_round * 2, seed=32)
    bodies = [
        [{"user": u, "segment": s} for u, s in many[i : i + POST_MANY]]
        for i in range(0, len(many), POST_MANY)
    ]
    api = Api(serve.sidecar.port)
    # interleave() passes (index, segment): the index picks the user or the POST body.
    indexed = [(i, s) for i, (_u, s) in enumerate(qs)]
    calls = {
        "GET /v1/check": lambda i, s: api.get(qs[i][0], s),
        "POST /v1/check (1)": lambda i, s: api.post([{"user": qs[i][0], "segment": s}])[0],
        f"POST /v1/check ({POST_MANY})": lambda i, _s: api.post(bodies[i % len(bodies)]),
    }
    log(f"http: {rounds} rounds x {per_round:,} requests x {len(calls)} request kinds")
    try:
        hists, round_p50, first, cpu_us = interleave(
            calls,
            indexed,
            rounds,
            per_round,
            warmup=200,
            pids={n: serve.sidecar.pid for n in calls},
        )
    finally:
        api.close()
    expected = [u in serve.segments[s] for u, s in qs[:per_round]]
    wrong = {
        n: sum(a is not e for a, e in zip(first[n], expected, strict=True))
        for n in ("GET /v1/check", "POST /v1/check (1)")
    }
    return {
        "rounds": rounds,
        "requests_per_round": per_round,
        "client": "http.client.HTTPConnection, keep-alive, one request in flight",
        "wrong_answers_first_round": wrong,
        "latency": {n: h.summary() for n, h in hists.items()},
        "round_p50_us": round_p50,
        "server_cpu_us_per_request": cpu_us,
        "targets": [],
    }


def section(res: dict[str, Any], out: Path, report_dir: Path) -> list[str]:
    lines = [
        f"{res['rounds']} interleaved rounds x {res['requests_per_round']:,} requests per kind; "
        f"client: {res['client']}. No DESIGN.md target; for comparison with `check`.",
        "",
    ]
    lines += latency_rows(res["latency"])
    lines += ["", "Per-round p50 (us) over the rounds:", ""]
    lines += round_table(res["round_p50_us"])
    lines += cpu_lines(
        res.get("server_cpu_us_per_request"), "Sidecar CPU per request (main thread)"
    )
    lines += ["", f"Wrong answers (first round): {res['wrong_answers_first_round']}."]
    png = plot_latency(res["latency"], "HTTP /v1/check", out / "http_latency.png")
    lines += image_lines(png, "http latency", report_dir)
    return lines
