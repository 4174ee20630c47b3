"""`check`: one membership check per request over a Unix socket, against two peers measured
in the same run, interleaved in rounds.

- sidecar: `seg-sidecar` (a subprocess, replaying the log), queried with the project's
  blocking `SidecarClient.check`.
- echo: the bare uvloop Unix-socket server of `perf.peers` (same framing, msgpack decode,
  `[id, 0, true]` back), queried with the very same `SidecarClient` code path, so the
  difference is what the sidecar's server adds.
- redis: `SISMEMBER` over Redis's Unix socket with redis-py, the same members loaded.
- sidecar ttl: the same sidecar and client on TTL twins of the segments (the same members,
  published with `ttl_seconds` of a day into the sidecar's log for this scenario and dropped
  after it): a check on a TTL segment against a check on a plain one (DESIGN.md "Freshness").

Every target runs the same (user, segment) list; each round runs every target once for
`per_round` requests, the order rotating from round to round, the garbage collector off
inside a round. Latency is `perf_counter_ns` around one call.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sidecar.client import SidecarClient

from . import data
from .embedded import TWIN_TTL_SECONDS, ttl_twin
from .hist import Hist, ratio
from .report import cpu_lines, fmt, image_lines, latency_rows, plot_latency, table, target
from .services import Context, log

Call = Callable[[int, str], Any]


def timed_loop(call: Call, qs: list[tuple[int, str]], out: list[int]) -> list[Any]:
    """Run `call` over `qs`, appending each latency (ns) to `out`; returns the answers."""
    clock = time.perf_counter_ns
    answers = []
    add = answers.append
    rec = out.append
    for u, s in qs:
        t0 = clock()
        r = call(u, s)
        rec(clock() - t0)
        add(r)
    return answers


def thread_cpu_ns(pid: int | None) -> int | None:
    """CPU time (ns) of the main thread of `pid` (the one running a server's event loop),
    from /proc/PID/task/PID/schedstat; None when it cannot be read."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/task/{pid}/schedstat") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def interleave(
    targets: dict[str, Call],
    qs: list[tuple[int, str]],
    rounds: int,
    per_round: int,
    warmup: int,
    pids: dict[str, int | None] | None = None,
) -> tuple[dict[str, Hist], dict[str, list[float]], dict[str, list[Any]], dict[str, float]]:
    """Histograms, per-round p50 (us), the answers of the first round and, for targets with
    a server pid, the server's main-thread CPU time per request (us)."""
    pids = pids or {}
    cpu: dict[str, int] = {}
    names = list(targets)
    hists = {n: Hist(n) for n in names}
    round_p50: dict[str, list[float]] = {n: [] for n in names}
    first: dict[str, list[Any]] = {}
    for n in names:  # warm up: connections, caches, branch predictors
        timed_loop(targets[n], qs[:warmup], [])
    for r in range(rounds):
        start = (r * per_round) % max(1, len(qs) - per_round)
        batch = qs[start : start + per_round]
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            lat: list[int] = []
            gc.collect()
            c0 = thread_cpu_ns(pids.get(n))
            gc.disable()
            try:
                answers = timed_loop(targets[n], batch, lat)
            finally:
                gc.enable()
            c1 = thread_cpu_ns(pids.get(n))
            if c0 is not None and c1 is not None:
                cpu[n] = cpu.get(n, 0) + c1 - c0
            if r == 0:
                first[n] = answers
            h = Hist(n)
            h.record_many(lat)
            round_p50[n].append(round(h.p50_us, 2))
            hists[n].merge(h)
    done = rounds * per_round
    cpu_us = {n: round(v / done / 1000, 2) for n, v in cpu.items()}
    return hists, round_p50, first, cpu_us


def round_table(round_p50: dict[str, list[float]]) -> list[str]:
    rows = []
    for n, v in round_p50.items():
        if v:
            rows.append([n, min(v), statistics.median(v), max(v)])
    return table(["peer", "min", "median", "max"], rows)


def fmt_paired(p: dict[str, float] | None) -> str:
    return "n/a" if not p else f"{p['median']:.2f} (quartiles {p['q1']:.2f}-{p['q3']:.2f})"


def run(ctx: Context) -> dict[str, Any]:
    # Many short rounds: a slow spell of this shared machine hits every peer alike, and the
    # per-round ratios (paired, adjacent in time) can be compared as well as the pooled ones.
    rounds = ctx.sizes.pick(20, 40)
    per_round = ctx.sizes.pick(1_000, 5_000)
    serve = ctx.serve()
    qs = data.queries(serve.segments, per_round * 2, seed=11)
    expected = [u in serve.segments[s] for u, s in qs]

    sidecar = SidecarClient(serve.sidecar.uds, timeout=5.0).connect()
    twins = publish_twins(serve, sidecar)
    echo_server = ctx.echo()
    echo = SidecarClient(echo_server.path, timeout=5.0).connect()
    check = sidecar.check
    # both through a lambda and a dict lookup, so the only difference is the segment
    plain = {s: s for s in serve.segments}
    targets: dict[str, Call] = {
        "sidecar": sidecar.check,
        "echo": echo.check,
        "sidecar plain": lambda u, s: check(u, plain[s]),
        "sidecar ttl": lambda u, s: check(u, twins[s]),
    }
    redis_client = ctx.serve_redis()
    peers: dict[str, Any] = {
        "sidecar": {
            "what": "seg-sidecar subprocess, SidecarClient.check over its Unix socket",
            "source": serve.source,
            "pid": serve.sidecar.pid,
        },
        "echo": {
            "what": "bare uvloop Unix-socket server, same framing (msgpack decode, "
            "[id, 0, true] back), queried with the same SidecarClient code path",
        },
        "sidecar plain": {
            "what": "the same sidecar and client, the call wrapped as for the TTL peer",
        },
        "sidecar ttl": {
            "what": "the same sidecar and client on TTL twins of the segments (same members, "
            f"ttl_seconds {TWIN_TTL_SECONDS}: nothing expires during the run)",
        },
    }
    if redis_client is not None:
        sismember = redis_client.sismember
        targets["redis"] = lambda u, s: sismember(s, u)
        peers["redis"] = {
            "what": "redis-server over its Unix socket, redis-py SISMEMBER",
            "version": ctx.services.get("redis", {}).get("version"),
        }
    else:
        peers["redis"] = {"available": False, "reason": ctx.redis_error}

    log(f"check: {rounds} rounds x {per_round:,} requests x {len(targets)} targets")
    try:
        pids = {"sidecar": serve.sidecar.pid, "echo": echo_server.pid}
        server = ctx.redis()
        if server is not None:
            pids["redis"] = server.pid
        hists, round_p50, first, cpu_us = interleave(
            targets, qs, rounds, per_round, warmup=1_000, pids=pids
        )
    finally:
        sidecar.close()
        echo.close()
        if redis_client is not None:
            redis_client.close()
        drop_twins(serve, twins)

    start_exp = expected[:per_round]
    wrong = {
        n: sum(a is not e for a, e in zip(first[n], start_exp, strict=True))
        for n in ("sidecar", "sidecar plain", "sidecar ttl")
    }
    if "redis" in first:
        got = first["redis"]
        wrong["redis"] = sum(bool(a) is not e for a, e in zip(got, start_exp, strict=True))

    s, e = hists["sidecar"], hists["echo"]

    def paired(a: str, b: str) -> dict[str, float] | None:
        """Median and quartiles over rounds of (a's p50 / b's p50) in the same round."""
        if a not in round_p50 or b not in round_p50:
            return None
        rs = sorted(x / y for x, y in zip(round_p50[a], round_p50[b], strict=True) if y)
        if not rs:
            return None
        q = statistics.quantiles(rs, n=4) if len(rs) > 1 else [rs[0]] * 3
        return {"median": round(q[1], 3), "q1": round(q[0], 3), "q3": round(q[2], 3)}

    results: dict[str, Any] = {
        "rounds": rounds,
        "requests_per_round": per_round,
        "segments": len(serve.segments),
        "memberships": serve.memberships,
        "member_share": round(sum(start_exp) / len(start_exp), 3),
        "wrong_answers_first_round": wrong,
        "peers": peers,
        "latency": {n: h.summary() for n, h in hists.items()},
        "round_p50_us": round_p50,
        "server_cpu_us_per_request": cpu_us,
        "ratios": {
            "sidecar_over_echo_p50": ratio(s.p50_us, e.p50_us),
            "sidecar_over_echo_p99": ratio(s.p99_us, e.p99_us),
        },
        "paired_round_ratios_p50": {
            "sidecar_over_echo": paired("sidecar", "echo"),
            "redis_over_sidecar": paired("redis", "sidecar"),
            "ttl_over_plain": paired("sidecar ttl", "sidecar plain"),
        },
    }
    tt, tp = hists["sidecar ttl"], hists["sidecar plain"]
    results["ratios"]["ttl_over_plain_p50"] = ratio(tt.p50_us, tp.p50_us)
    results["ratios"]["ttl_over_plain_p99"] = ratio(tt.p99_us, tp.p99_us)
    targets_out = [
        target(
            "check: sidecar p50 / echo p50",
            ratio(s.p50_us, e.p50_us),
            "<= 1.1 x",
            detail=f"sidecar p50 {s.p50_us:.1f} us, echo p50 {e.p50_us:.1f} us; "
            f"per-round ratio median {fmt_paired(paired('sidecar', 'echo'))}",
            peer=f"bare uvloop echo, same framing: p50 {e.p50_us:.1f} us",
        ),
        target(
            "check: sidecar p99",
            round(s.p99_us, 1),
            "< 100 us",
            detail=f"p999 {s.p999_us:.1f} us; echo p99 {e.p99_us:.1f} us",
        ),
        target(
            "check: TTL segment p50 / plain segment p50",
            ratio(tt.p50_us, tp.p50_us),
            "<= 1.1 x",
            detail=f"ttl p50 {tt.p50_us:.1f} us, plain p50 {tp.p50_us:.1f} us; per-round "
            f"ratio median {fmt_paired(paired('sidecar ttl', 'sidecar plain'))}",
        ),
    ]
    if "redis" in hists:
        rd = hists["redis"]
        results["ratios"]["redis_over_sidecar_p50"] = ratio(rd.p50_us, s.p50_us)
        results["ratios"]["redis_over_sidecar_p99"] = ratio(rd.p99_us, s.p99_us)
        targets_out.append(
            target(
                "check: redis p50 / sidecar p50",
                ratio(rd.p50_us, s.p50_us),
                ">= 3 x",
                detail=f"redis p50 {rd.p50_us:.1f} us, sidecar p50 {s.p50_us:.1f} us; "
                f"per-round ratio median {fmt_paired(paired('redis', 'sidecar'))}",
                peer=f"Redis SISMEMBER (redis-py, Unix socket): p50 {rd.p50_us:.1f} us",
            )
        )
    else:
        targets_out.append(
            target(
                "check: redis p50 / sidecar p50",
                None,
                ">= 3 x",
                detail=f"Redis peer unavailable: {ctx.redis_error}",
            )
        )
    results["targets"] = targets_out
    return results


def publish_twins(serve: Any, client: SidecarClient, timeout: float = 300) -> dict[str, str]:
    """Publish a TTL twin of every served segment into the sidecar's log and wait until the
    sidecar answers them all; returns segment -> twin."""
    from publisher import Publisher

    twins = {s: ttl_twin(s) for s in serve.segments}
    members = {twins[s]: m for s, m in serve.segments.items()}
    log(f"check: publishing {len(twins)} TTL twins of the served segments")
    Publisher(serve.transport, writer_id="perf-serve").publish(
        members, ttl=dict.fromkeys(members, TWIN_TTL_SECONDS)
    )
    deadline = time.monotonic() + timeout
    for twin, m in members.items():
        while client.explain(m.min(), twin).source != "local":
            if time.monotonic() > deadline:
                raise RuntimeError(f"the sidecar did not load the TTL twin {twin}")
            time.sleep(0.05)
    return twins


def drop_twins(serve: Any, twins: dict[str, str]) -> None:
    """Drop the twins again: the scenarios after this one serve the data set as it was."""
    from publisher import Publisher

    Publisher(serve.transport, writer_id="perf-serve").publish({}, drop=list(twins.values()))


def section(res: dict[str, Any], out: Path, report_dir: Path) -> list[str]:
    lines = [
        f"{res['rounds']} interleaved rounds x {res['requests_per_round']:,} requests per "
        f"target; {res['segments']} segments, {res['memberships']:,} memberships; "
        f"{res['member_share']:.0%} of the checks are members.",
        "",
    ]
    lines += latency_rows(res["latency"])
    lines.append("")
    r = res["ratios"]
    lines.append(
        "Ratios (same run): sidecar/echo p50 "
        f"{fmt(r.get('sidecar_over_echo_p50'), 2)}, p99 {fmt(r.get('sidecar_over_echo_p99'), 2)}; "
        f"redis/sidecar p50 {fmt(r.get('redis_over_sidecar_p50'), 2)}, "
        f"p99 {fmt(r.get('redis_over_sidecar_p99'), 2)}."
    )
    pr = res.get("paired_round_ratios_p50") or {}
    if pr:
        lines += [""]
        lines.append(
            "Per-round ratios of p50 (each round's peers adjacent in time), median and "
            f"quartiles over rounds: sidecar/echo {fmt_paired(pr.get('sidecar_over_echo'))}, "
            f"redis/sidecar {fmt_paired(pr.get('redis_over_sidecar'))}."
        )
    if r.get("ttl_over_plain_p50") is not None:
        lines += [
            "",
            "A check on a TTL segment (a twin of each segment, same members, published with "
            "`ttl_seconds`) against the same check on the plain one, same sidecar and client, "
            f"same rounds: p50 {fmt(r.get('ttl_over_plain_p50'), 3)}x, p99 "
            f"{fmt(r.get('ttl_over_plain_p99'), 3)}x; per-round median "
            f"{fmt_paired(pr.get('ttl_over_plain'))}.",
        ]
    lines += cpu_lines(
        res.get("server_cpu_us_per_request"),
        "Server CPU per request (main thread, /proc schedstat; the syscalls that read the "
        "request and write the answer included)",
        digits=1,
    )
    redis = res["peers"].get("redis", {})
    if redis.get("available") is False:
        lines += ["", f"**Redis peer unavailable:** {redis.get('reason')}"]
    lines += ["", "Per-round p50 (us) over the rounds, showing the drift of the machine:", ""]
    lines += round_table(res["round_p50_us"])
    wrong = res.get("wrong_answers_first_round", {})
    lines += ["", f"Wrong answers against the generated data (first round): {wrong}.", ""]
    for name, peer in res["peers"].items():
        lines.append(f"- {name}: {peer.get('what', peer.get('reason', ''))}")
    png = plot_latency(res["latency"], "check over a Unix socket", out / "check_latency.png")
    lines += image_lines(png, "check latency", report_dir)
    return lines
