"""`batch`: 1,000 checks in one `batch` request over the Unix socket (`SidecarClient.batch`):
latency per request and checks per second from one blocking client. The echo peer (same
framing; decodes the 1,000-pair request and answers `[id, 0, true]`) is interleaved as the
floor of moving and decoding such a request in Python.

(Redis with 1,000 pipelined SISMEMBER through redis-py was tried as a peer: tens of
milliseconds per batch, almost all of it redis-py's per-command Python work, so it said
nothing about the servers and was dropped.)"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sidecar.client import SidecarClient

from . import data
from .check import interleave
from .report import latency_rows, plot_latency, table, target
from .services import Context, log

BATCH = 1_000


def run(ctx: Context) -> dict[str, Any]:
    rounds = 10
    per_round = ctx.sizes.pick(100, 1_000)
    serve = ctx.serve()
    flat = data.queries(serve.segments, BATCH * per_round * 2, seed=21)
    # One "query" of interleave() is a whole batch here: (index, tag).
    batches = [[list(q) for q in flat[i : i + BATCH]] for i in range(0, len(flat), BATCH)]
    expected0 = [u in serve.segments[s] for u, s in flat[:BATCH]]
    qs = [(i, "batch") for i in range(len(batches))]

    client = SidecarClient(serve.sidecar.uds, timeout=5.0).connect()
    echo = SidecarClient(ctx.echo().path, timeout=5.0).connect()
    targets: dict[str, Any] = {
        "sidecar": lambda i, _s: client.batch(batches[i]),
        "echo": lambda i, _s: echo.batch(batches[i]),
    }
    log(f"batch: {rounds} rounds x {per_round} requests of {BATCH} checks x {len(targets)}")
    try:
        pids = {"sidecar": serve.sidecar.pid, "echo": ctx.echo().pid}
        hists, round_p50, first, cpu_us = interleave(
            targets, qs, rounds, per_round, warmup=20, pids=pids
        )
        got0 = client.batch(batches[0])
    finally:
        client.close()
        echo.close()
    wrong = sum(a is not e for a, e in zip(got0, expected0, strict=True))
    s = hists["sidecar"]
    results: dict[str, Any] = {
        "checks_per_request": BATCH,
        "rounds": rounds,
        "requests_per_round": per_round,
        "wrong_answers": wrong,
        "latency": {n: h.summary() for n, h in hists.items()},
        "round_p50_us": round_p50,
        "server_cpu_us_per_request": cpu_us,
        "checks_per_second": {
            n: round(BATCH * 1e6 / h.summary(cdf=False)["mean_us"]) for n, h in hists.items()
        },
        "us_per_check_p50": {n: round(h.p50_us / BATCH, 3) for n, h in hists.items()},
    }
    results["targets"] = [
        target(
            "batch of 1,000: sidecar p50 per request",
            round(s.p50_us, 1),
            "<",
            300.0,
            "us",
            detail=f"p99 {s.p99_us:.0f} us; {results['checks_per_second']['sidecar']:,} checks/s "
            "from one blocking client",
        )
    ]
    return results


def section(res: dict[str, Any], out: Path, report_dir: Path) -> list[str]:
    lines = [
        f"{res['rounds']} interleaved rounds x {res['requests_per_round']} requests of "
        f"{res['checks_per_request']:,} checks (one blocking client, one request in flight).",
        "",
    ]
    lines += latency_rows(res["latency"])
    lines += [""]
    lines += table(
        ["peer", "checks/s (one client)", "us per check at p50"],
        [[n, v, res["us_per_check_p50"][n]] for n, v in res["checks_per_second"].items()],
    )
    cpu = res.get("server_cpu_us_per_request") or {}
    if cpu:
        lines += [
            "",
            "Server CPU per request (main thread): "
            + ", ".join(f"{n} {v:.0f} us" for n, v in cpu.items())
            + ".",
        ]
    lines += ["", f"Wrong answers: {res['wrong_answers']}."]
    png = plot_latency(res["latency"], "batch of 1,000 checks", out / "batch_latency.png")
    if png:
        lines += ["", f"![batch latency]({os.path.relpath(png, report_dir)})"]
    return lines
