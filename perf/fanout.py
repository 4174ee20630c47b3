"""`fanout`: several client processes (multiprocessing) against one sidecar, open loop, at
increasing total rates; the highest rate at which p99 stays under 1 ms. Three peers in the
same harness and run, one after the other:

- `socket`: the project's blocking `SidecarClient.check`, one connection per process;
- `redis`: `SISMEMBER` with redis-py over Redis's Unix socket, one connection per process, the
  same members loaded (the same steps as the socket);
- `shared`: `SharedReplica.contains` (docs/SHARED_REPLICA.md) in `SHARED_PROCS` processes, at
  rates up to millions a second (no server in the loop: the processes only compete for
  the cores). At these rates a sleep lasts longer than the interval, so a process that wakes
  up sends every check already due back to back (each still timed from its own scheduled
  time): pacing by spinning instead made the processes CPU hogs that an oversubscribed
  machine's scheduler then kept off the cores for milliseconds.

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
import traceback
from array import array
from pathlib import Path
from typing import Any

from . import data
from .hist import Hist
from .report import image_lines, plot_fanout, table, target
from .services import Context, log

LIMIT_US = 1000.0
PROCS = 4  # DESIGN.md: 4 client processes (with the sidecar, more runnable than the 2 cores)
SHARED_PROCS = 4  # DESIGN.md: 1M checks/s from 4 reader processes


def _checker(peer: str, target: str) -> tuple[Any, Any]:
    """(check(user, segment), reset()) of one peer, in a client process."""
    if peer == "socket":
        from sidecar.client import SidecarClient

        client = SidecarClient(target, timeout=5.0).connect()
        return client.check, client.close
    if peer == "redis":
        import redis

        r = redis.Redis(unix_socket_path=target, socket_timeout=5.0)
        sismember = r.sismember
        return (lambda u, s: sismember(s, u)), (lambda: None)
    if peer == "shared":
        from sidecar.client import SharedReplica

        shared = SharedReplica(target)
        return shared.contains, (lambda: None)
    raise ValueError(f"unknown fanout peer {peer!r}")


def worker(conn: Any, peer: str, target: str, qs: list[tuple[int, str]]) -> None:
    """A client process: runs steps sent by the parent until told to stop."""
    import ctypes
    import gc

    with contextlib.suppress(OSError, AttributeError):  # wake up on time: 1 ns timer slack
        ctypes.CDLL("libc.so.6").prctl(29, 1, 0, 0, 0)  # PR_SET_TIMERSLACK

    check, reset = _checker(peer, target)
    deadline = time.monotonic() + 60
    while check(*qs[0]) is None and peer == "shared" and time.monotonic() < deadline:
        time.sleep(0.05)  # until the shared replica is mapped and the segment published
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
        lat = array("q")  # millions a step for the shared peer: 8 bytes each
        lag = array("q")
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
                check(*qs[i % nq])
            except Exception:  # the peer's own error types: counted, connection renewed
                errors += 1
                reset()
            lat.append(clock() - sched)
        end = clock()
        gc.enable()
        h, g = Hist(), Hist()
        h.record_many(lat)
        g.record_many(lag)
        conn.send({"hist": h.encode(), "lag": g.encode(), "n": n, "errors": errors, "end": end})
    reset()
    conn.close()


def run(ctx: Context) -> dict[str, Any]:
    rates = ctx.sizes.pick(
        [2_000, 10_000, 20_000, 30_000],
        [1_000, 2_000, 5_000, 10_000, 15_000, 20_000, 25_000, 30_000, 40_000, 50_000, 60_000],
    )
    shared_rates = ctx.sizes.pick(
        [250_000, 1_000_000],
        [100_000, 250_000, 500_000, 750_000, 1_000_000, 1_250_000, 1_500_000, 2_000_000],
    )
    seconds = ctx.sizes.pick(1.0, 5.0)
    serve = ctx.serve()
    uds = str(serve.sidecar.uds)
    failed: dict[str, str] = {}

    def peer_steps(name: str, path: str, procs: int, peer_rates: list[int]) -> dict[str, Any]:
        """A peer's steps; a peer that fails is recorded as such, the others' steps kept."""
        try:
            return steps_of(serve, name, path, procs, peer_rates, seconds)
        except Exception as exc:
            failed[name] = f"{type(exc).__name__}: {exc}"
            log(f"fanout {name} FAILED: {failed[name]}\n{traceback.format_exc()}")
            return {"available": False, "reason": f"failed: {failed[name]}"}

    peers: dict[str, dict[str, Any]] = {}
    peers["socket"] = steps_of(serve, "socket", uds, PROCS, rates, seconds)  # the scenario's own
    redis = ctx.serve_redis()
    if redis is None:
        peers["redis"] = {"available": False, "reason": ctx.redis_error or "unavailable"}
    else:
        redis.close()
        peers["redis"] = peer_steps("redis", ctx.redis().socket, PROCS, rates)
    peers["shared"] = peer_steps("shared", uds, SHARED_PROCS, shared_rates)
    sock = peers["socket"]
    best = {n: p.get("max_rps_p99_under_limit", 0) for n, p in peers.items()}
    return {
        "client_processes": PROCS,
        "seconds_per_step": seconds,
        "p99_limit_us": LIMIT_US,
        "nproc": os.cpu_count(),
        # the socket's, as before the peers joined
        "steps": sock["steps"],
        "max_rps_p99_under_limit": sock["max_rps_p99_under_limit"],
        "max_offered_rps_p99_under_limit": sock["max_offered_rps_p99_under_limit"],
        "peers": peers,
        "failed_peers": failed,
        "targets": [
            socket_vs_redis(sock, peers["redis"]),
            target(
                f"fanout: shared replica, {SHARED_PROCS} reader processes, checks/s in all "
                "(open loop, the highest step kept up with)",
                peers["shared"].get("max_achieved_rps"),
                ">= 1000000 checks/s",
                detail=f"with p99 < 1 ms: {best['shared']:,}/s (DESIGN.md asks the p99 bound "
                "of the socket only)",
                peer=f"the socket's highest rate kept up with: {sock['max_achieved_rps']:,}/s",
            ),
        ],
    }


def socket_vs_redis(sock: dict[str, Any], redis: dict[str, Any]) -> dict[str, Any]:
    """DESIGN.md's fanout target: the socket's highest p99 < 1 ms rate at least Redis's in
    the same steps. When Redis sustained no step under 1 ms, the socket meets it with one
    such step (> 0/s), not with none either; not judged when Redis did not run."""
    mine, theirs = sock["max_rps_p99_under_limit"], redis.get("max_rps_p99_under_limit", 0)
    redis_peer = _redis_peer(redis)
    return target(
        "fanout: socket rate with p99 < 1 ms vs Redis's in the same harness",
        mine,
        f">= {theirs} checks/s" if theirs else "> 0 checks/s",
        detail=f"{redis_peer}; socket {mine:,}/s; {PROCS} client processes each, the same steps",
        applies=bool(redis.get("steps")),  # Redis ran (even if no step met 1 ms)
        peer=redis_peer,
    )


def _redis_peer(redis: dict[str, Any]) -> str:
    """The Redis peer's figure in words: its highest p99 < 1 ms rate, or that it had none."""
    if not redis.get("steps"):
        return f"Redis SISMEMBER unavailable: {redis.get('reason') or 'no step ran'}"
    if redis["max_rps_p99_under_limit"]:
        return f"Redis SISMEMBER p99 < 1 ms up to {redis['max_rps_p99_under_limit']:,}/s"
    low = redis["steps"][0]
    return (
        "Redis SISMEMBER sustained no step with p99 < 1 ms (its lowest, "
        f"{low['offered_rps']:,}/s: p99 {low['latency']['p99_us']:,.0f} us)"
    )


def steps_of(
    serve: Any, peer: str, target_path: str, procs: int, rates: list[int], seconds: float
) -> dict[str, Any]:
    """One peer through the rising steps (it stops at the first it cannot keep up with)."""
    mpc = mp.get_context("spawn")
    workers = []
    log(f"fanout {peer}: {procs} client processes, rates {rates} checks/s, {seconds} s per step")
    steps: list[dict[str, Any]] = []
    try:
        for j in range(procs):
            parent, child = mpc.Pipe()
            qs = data.queries(serve.segments, 20_000, seed=60 + j)
            p = mpc.Process(target=worker, args=(child, peer, target_path, qs), daemon=True)
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
    kept = [s for s in steps if s["achieved_rps"] >= 0.95 * s["offered_rps"]]
    ok = [s for s in kept if s["p99_ok"]]
    best = max(ok, key=lambda s: s["achieved_rps"]) if ok else None
    return {
        "client_processes": procs,
        "steps": steps,
        "max_rps_p99_under_limit": best["achieved_rps"] if best else 0,
        "max_offered_rps_p99_under_limit": best["offered_rps"] if best else 0,
        "max_achieved_rps": max((s["achieved_rps"] for s in kept), default=0),
    }


PEER_NAMES = {
    "socket": "Unix socket (SidecarClient.check)",
    "redis": "Redis SISMEMBER (redis-py, Unix socket)",
    "shared": "shared replica (SharedReplica.contains)",
}


def _steps_table(steps: list[dict[str, Any]]) -> list[str]:
    rows = []
    for s in steps:
        la = s["latency"]
        rows.append(
            [s["offered_rps"], s["achieved_rps"], la["p50_us"], la["p99_us"], la["p999_us"],
             la["max_us"], s["send_lag"]["p99_us"], s["errors"], "yes" if s["p99_ok"] else "no"]
        )  # fmt: skip
    return table(
        ["offered/s", "achieved/s", "p50 us", "p99 us", "p99.9 us", "max us",
         "send lag p99 us", "errors", "p99 < 1 ms"],
        rows,
    )  # fmt: skip


def section(res: dict[str, Any], out: Path, report_dir: Path) -> list[str]:
    peers = res.get("peers") or {"socket": {**res, "client_processes": res["client_processes"]}}
    lines = [
        f"Open-loop client processes on a {res['nproc']}-core machine (clients and servers share "
        f"the cores); {res['seconds_per_step']} s per step; latency from the scheduled send "
        "time. Each peer in the same run, one after the other, through rising steps until the "
        "clients cannot keep up.",
        "",
    ]
    rows = []
    for name, p in peers.items():
        if p.get("available") is False:
            rows.append([PEER_NAMES.get(name, name), "", f"unavailable: {p.get('reason')}", ""])
            continue
        rows.append(
            [PEER_NAMES.get(name, name), p["client_processes"], p["max_rps_p99_under_limit"],
             p.get("max_achieved_rps", "")]
        )  # fmt: skip
    lines += table(
        ["peer", "processes", f"highest rate, p99 < {res['p99_limit_us']:.0f} us",
         "highest rate kept up with"],
        rows,
    )  # fmt: skip
    for name, p in peers.items():
        if p.get("available") is False or not p.get("steps"):
            continue
        lines += ["", f"**{PEER_NAMES.get(name, name)}**, {p['client_processes']} processes:", ""]
        lines += _steps_table(p["steps"])
        over = [
            s for s in p["steps"]
            if not s["p99_ok"] and s["achieved_rps"] >= 0.95 * s["offered_rps"]
        ]  # fmt: skip
        client_bound = [
            s for s in over if s["send_lag"].get("p99_us", 0) >= 0.5 * s["latency"]["p99_us"]
        ]
        if over:
            lines += [
                "",
                f"Of the {len(over)} steps over the limit that the clients kept up with, "
                f"{len(client_bound)} had a send lag p99 of at least half the p99. Send lag is "
                "how late a send started: the client woke up late, or its previous request had "
                "not returned yet (a stall of the server or of the machine, which then delays "
                "the sends queued behind it: that is what the open loop charges).",
            ]
        suffix = "" if name == "socket" else f"_{name}"
        png = plot_fanout(
            p["steps"],
            res["p99_limit_us"],
            out / f"fanout{suffix}_throughput_p99.png",
            f"fanout: {PEER_NAMES.get(name, name)}",
        )
        lines += image_lines(png, f"fanout {name}", report_dir)
    return lines
