"""`fanout`: several client processes (multiprocessing) against one sidecar, open loop, at
increasing total rates; the highest rate at which p99 stays under 1 ms.

Open loop, no coordinated omission: every process sends its i-th check at a fixed time
`start + i / rate` (the processes' schedules interleaved) and measures latency from that
scheduled time, not from when the send happened, so a slow server (or a late client) is
charged for the whole wait. Each process uses the project's blocking `SidecarClient` on its
own connection. How late the sends themselves started (the client woke up late, or its
previous request was still in flight; the client processes set a 1 ns timer slack) is
reported beside the latency. The
steps end at the first rate the processes could not keep up with (under 80% achieved).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any

from . import data
from .hist import Hist
from .report import plot_fanout, table
from .services import Context, log

LIMIT_US = 1000.0


def worker(conn: Any, uds: str, qs: list[tuple[int, str]]) -> None:
    """A client process: runs steps sent by the parent until told to stop."""
    import ctypes
    import gc

    from sidecar.client import SidecarClient, SidecarError

    with contextlib.suppress(OSError, AttributeError):  # wake up on time: 1 ns timer slack
        ctypes.CDLL("libc.so.6").prctl(29, 1, 0, 0, 0)  # PR_SET_TIMERSLACK

    client = SidecarClient(uds, timeout=5.0).connect()
    client.check(*qs[0])
    clock = time.monotonic_ns
    sleep = time.sleep
    nq = len(qs)
    conn.send("ready")
    while True:
        cmd = conn.recv()
        if cmd[0] == "stop":
            break
        _, rate, seconds, start_ns, phase_ns = cmd
        interval = 1e9 / rate
        n = max(1, int(seconds * rate))
        lat: list[int] = []
        lag: list[int] = []
        errors = 0
        gc.disable()
        for i in range(n):
            sched = start_ns + phase_ns + int(i * interval)
            now = clock()
            if now < sched:
                sleep((sched - now) / 1e9)
                now = clock()
            lag.append(now - sched)
            try:
                client.check(*qs[i % nq])
            except SidecarError:
                errors += 1
                client.close()
            lat.append(clock() - sched)
        end = clock()
        gc.enable()
        h, g = Hist(), Hist()
        h.record_many(lat)
        g.record_many(lag)
        conn.send({"hist": h.encode(), "lag": g.encode(), "n": n, "errors": errors, "end": end})
    client.close()
    conn.close()


def run(ctx: Context) -> dict[str, Any]:
    procs = 3  # with the sidecar: more runnable processes than this machine's 2 cores
    rates = ctx.sizes.pick(
        [2_000, 5_000, 10_000, 15_000, 20_000, 30_000],
        [1_000, 2_000, 5_000, 10_000, 15_000, 20_000, 25_000, 30_000, 40_000, 50_000, 60_000],
    )
    seconds = ctx.sizes.pick(1.5, 5.0)
    serve = ctx.serve()
    mpc = mp.get_context("spawn")
    workers = []
    log(f"fanout: {procs} client processes, rates {rates} checks/s, {seconds} s per step")
    steps: list[dict[str, Any]] = []
    try:
        for j in range(procs):
            parent, child = mpc.Pipe()
            qs = data.queries(serve.segments, 20_000, seed=60 + j)
            p = mpc.Process(target=worker, args=(child, str(serve.sidecar.uds), qs), daemon=True)
            p.start()
            workers.append((p, parent))
        for _p, parent in workers:
            if not parent.poll(120) or parent.recv() != "ready":
                raise RuntimeError("a fanout client process did not start")
        for rate in rates:
            per = rate / procs
            start = time.monotonic_ns() + 200_000_000
            for j, (_p, parent) in enumerate(workers):
                parent.send(("run", per, seconds, start, int(j * 1e9 / rate)))
            outs = []
            for _p, parent in workers:
                if not parent.poll(seconds * 20 + 60):
                    raise RuntimeError(f"a fanout client did not finish the {rate}/s step")
                outs.append(parent.recv())
            hist = Hist.merged(Hist.decode(o["hist"]) for o in outs)
            lag = Hist.merged(Hist.decode(o["lag"]) for o in outs)
            n = sum(o["n"] for o in outs)
            took = (max(o["end"] for o in outs) - start) / 1e9
            step = {
                "offered_rps": rate,
                "achieved_rps": round(n / took),
                "requests": n,
                "errors": sum(o["errors"] for o in outs),
                "latency": hist.summary(),
                "send_lag": lag.summary(cdf=False),
            }
            step["p99_ok"] = step["latency"]["p99_us"] < LIMIT_US and step["errors"] == 0
            steps.append(step)
            log(
                f"   {rate:>6}/s offered, {step['achieved_rps']:>6}/s achieved: "
                f"p50 {step['latency']['p50_us']:.0f} us, p99 {step['latency']['p99_us']:.0f} us,"
                f" send lag p99 {step['send_lag']['p99_us']:.0f} us"
            )
            if step["achieved_rps"] < 0.8 * rate:
                break
    finally:
        for p, parent in workers:
            with contextlib.suppress(OSError):
                parent.send(("stop",))
            p.join(10)
            if p.is_alive():
                p.terminate()
                p.join(5)
    ok = [s for s in steps if s["p99_ok"] and s["achieved_rps"] >= 0.95 * s["offered_rps"]]
    best = max(ok, key=lambda s: s["achieved_rps"]) if ok else None
    return {
        "client_processes": procs,
        "seconds_per_step": seconds,
        "p99_limit_us": LIMIT_US,
        "nproc": os.cpu_count(),
        "steps": steps,
        "max_rps_p99_under_limit": best["achieved_rps"] if best else 0,
        "max_offered_rps_p99_under_limit": best["offered_rps"] if best else 0,
        "targets": [],
    }


def section(res: dict[str, Any], out: Path, report_dir: Path) -> list[str]:
    lines = [
        f"{res['client_processes']} client processes (one connection each, blocking client) "
        f"against one sidecar on a {res['nproc']}-core machine (clients and sidecar share the "
        f"cores); {res['seconds_per_step']} s per step. Latency from the scheduled send time.",
        "",
        f"**Highest rate with p99 under {res['p99_limit_us']:.0f} us: "
        f"{res['max_rps_p99_under_limit']:,} checks/s** (offered "
        f"{res['max_offered_rps_p99_under_limit']:,}/s).",
        "",
    ]
    rows = []
    for s in res["steps"]:
        la = s["latency"]
        rows.append(
            [s["offered_rps"], s["achieved_rps"], la["p50_us"], la["p99_us"], la["p999_us"],
             la["max_us"], s["send_lag"]["p99_us"], s["errors"], "yes" if s["p99_ok"] else "no"]
        )  # fmt: skip
    lines += table(
        ["offered/s", "achieved/s", "p50 us", "p99 us", "p99.9 us", "max us",
         "send lag p99 us", "errors", "p99 < 1 ms"],
        rows,
    )  # fmt: skip
    over = [
        s for s in res["steps"] if not s["p99_ok"] and s["achieved_rps"] >= 0.95 * s["offered_rps"]
    ]
    client_bound = [
        s for s in over if s["send_lag"].get("p99_us", 0) >= 0.5 * s["latency"]["p99_us"]
    ]
    if over:
        lines += [
            "",
            f"Of the {len(over)} steps over the limit that the clients kept up with, "
            f"{len(client_bound)} had a send lag p99 of at least half the p99. Send lag is how "
            "late a send started: the client woke up late, or its previous request had not "
            "returned yet (a stall of the sidecar or of the machine, which then delays the "
            "sends queued behind it: that is what the open loop charges).",
        ]
    png = plot_fanout(res["steps"], res["p99_limit_us"], out / "fanout_throughput_p99.png")
    if png:
        lines += ["", f"![fanout]({os.path.relpath(png, report_dir)})"]
    return lines
