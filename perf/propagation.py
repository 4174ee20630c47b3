"""`propagation`: publish -> visible in a running `seg-sidecar` process, on the real Kafka
broker, over many small publishes.

Each publish adds one new user to one segment (segments taken in turn, so partitions vary)
with the `Publisher` API (one Kafka transaction, as `seg-publish` does). A thread runs the
publish; the main thread polls the sidecar over its Unix socket (`SidecarClient.check`,
every 0.5 ms) until the new member is visible. Measured: from the `publish()` call to
visible (the target), from `publish()` returning (the commit acknowledged) to visible, and
the publish itself.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from publisher import Publisher
from sidecar.client import SidecarClient

from . import data
from .hist import Hist
from .report import plot_latency, table, target
from .services import Context, log

POLL_S = 0.0005
GIVE_UP_S = 30.0


def run(ctx: Context) -> dict[str, Any]:
    n = ctx.sizes.pick(20, 200)
    transport = ctx.transport("prop", "kafka")
    segments = data.make_segments(8, 80_000, seed=71, prefix="prop")
    publisher = Publisher(transport, writer_id="perf-prop", partitions=8)
    publisher.publish(segments)
    sidecar = ctx.sidecar(transport, "prop")
    names = sorted(segments)
    e2e, after_commit, pub = Hist("publish call -> visible"), Hist("commit -> visible"), Hist()
    early = 0
    invisible = 0
    switch = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)  # the poller must not wait 5 ms for the GIL
    log(f"propagation: {n} publishes of one new member each, polled every {POLL_S * 1e3} ms")
    try:
        with SidecarClient(sidecar.uds, timeout=5.0) as client:
            for i in range(n):
                seg = names[i % len(names)]
                user = 10**15 + i
                desired = {seg: segments[seg] | type(segments[seg])([user])}
                segments[seg] = desired[seg]
                done: dict[str, Any] = {}

                def publish(desired: dict[str, Any] = desired, done: dict[str, Any] = done) -> None:
                    try:
                        done["result"] = publisher.publish(desired)
                    except BaseException as exc:  # reported by the main thread
                        done["error"] = exc
                    done["t"] = time.perf_counter_ns()

                t0 = time.perf_counter_ns()
                th = threading.Thread(target=publish, daemon=True)
                th.start()
                deadline = t0 + int(GIVE_UP_S * 1e9)
                while True:
                    if client.check(user, seg) is True:
                        t_vis = time.perf_counter_ns()
                        break
                    if "error" in done:
                        raise RuntimeError(f"publish failed: {done['error']!r}")
                    if time.perf_counter_ns() > deadline:
                        t_vis = None
                        break
                    time.sleep(POLL_S)
                th.join(120)
                if "error" in done:
                    raise RuntimeError(f"publish failed: {done['error']!r}")
                if "t" not in done:
                    raise RuntimeError("publish did not return in 120 s")
                pub.record(done["t"] - t0)
                if t_vis is None:
                    invisible += 1
                    e2e.record(int(GIVE_UP_S * 1e9))
                    continue
                e2e.record(t_vis - t0)
                if t_vis < done["t"]:
                    early += 1
                after_commit.record(max(1, t_vis - done["t"]))
    finally:
        sys.setswitchinterval(switch)
    s = e2e.summary()
    c = after_commit.summary()
    return {
        "publishes": n,
        "segments": len(names),
        "poll_interval_ms": POLL_S * 1e3,
        "sidecar": "seg-sidecar process on Kafka, SidecarClient over its Unix socket",
        "visible_before_publish_returned": early,
        "never_visible": invisible,
        "latency": {
            "publish call -> visible": s,
            "commit -> visible": c,
            "publish() duration": pub.summary(),
        },
        "targets": [
            target(
                "propagation: committed -> visible p99",
                round(c["p99_us"] / 1e6, 3),
                "<",
                1.0,
                "s",
                detail=f"p50 {c['p50_us'] / 1e3:.0f} ms, from publish() returning (the Kafka "
                "transaction committed) to the sidecar answering true",
            ),
            target(
                "propagation: publish() call -> visible p99",
                round(s["p99_us"] / 1e6, 3),
                "<",
                1.0,
                "s",
                detail=f"p50 {s['p50_us'] / 1e3:.0f} ms; includes the publisher's own work "
                f"(recover from the log, diff, transaction): publish() p50 "
                f"{pub.p50_us / 1e3:.0f} ms, p99 {pub.p99_us / 1e3:.0f} ms",
            ),
        ],
    }


def section(res: dict[str, Any], out: Path, report_dir: Path) -> list[str]:
    lines = [
        f"{res['publishes']} publishes of one new member each over {res['segments']} segments; "
        f"{res['sidecar']}, polled every {res['poll_interval_ms']} ms.",
        "",
    ]
    lat = res["latency"]
    lines += _in_ms(lat)
    lines += [
        "",
        f"Visible before `publish()` returned: {res['visible_before_publish_returned']} of "
        f"{res['publishes']} (the commit reaches the replica before its acknowledgement reaches "
        f"the publisher). Never visible within {GIVE_UP_S:.0f} s: {res['never_visible']}.",
    ]
    png = plot_latency(
        {k: v for k, v in lat.items() if k != "publish() duration"},
        "publish -> visible",
        out / "propagation_latency.png",
        unit="ms",
    )
    if png:
        lines += ["", f"![propagation]({os.path.relpath(png, report_dir)})"]
    return lines


def _in_ms(lat: dict[str, Any]) -> list[str]:
    rows = [
        [n, s["count"], s["p50_us"] / 1e3, s["p99_us"] / 1e3, s["p999_us"] / 1e3, s["max_us"] / 1e3]
        for n, s in lat.items()
        if s.get("count")
    ]
    return table(["interval", "publishes", "p50 ms", "p99 ms", "p99.9 ms", "max ms"], rows)
