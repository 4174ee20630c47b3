"""`embedded`: `Replica.contains(user, segment)` in-process (the library path for Python
services), against `user in BitMap64` and `user in set` over the same (user, segment) list,
and against itself on a TTL segment: every segment has a twin with the same members published
with `ttl_seconds` (a day: nothing expires during the run), checked with the same users
(DESIGN.md "Freshness": a check on a TTL segment stays one bitmap lookup).

The replica replays a log directory holding the data set, like an embedded service would.
Each round times a loop of `LOOP` checks per target (order rotating, GC off) and divides:
nanoseconds per check including the Python loop (`for u, s in qs: f(u, s)`); the bare loop
(`pass`) is measured too, and subtracted in the "net" figures. Per-call latencies with a
`perf_counter_ns` pair around each call are reported as well (they include the timer).
"""

from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path
from typing import Any

from publisher import Publisher
from sidecar.replica import Replica

from . import data
from .hist import Hist
from .report import table, target
from .services import Context, log

LOOP = 10_000
#: the TTL twins' ttl_seconds: long enough that no member expires during a run
TWIN_TTL_SECONDS = 86_400


def ttl_twin(segment: str) -> str:
    return f"ttl-{segment}"


def run(ctx: Context) -> dict[str, Any]:
    n_seg, total = ctx.sizes.pick((20, 1_000_000), (50, 5_000_000))
    rounds = ctx.sizes.pick(30, 100)
    segments = data.make_segments(n_seg, total, seed=7)
    qs = data.queries(segments, LOOP, seed=41)
    qs_ttl = [(u, ttl_twin(s)) for u, s in qs]
    twins = {ttl_twin(s): members for s, members in segments.items()}
    transport = ctx.transport("embedded", "logdir")
    Publisher(transport, writer_id="perf-embedded", partitions=4).publish(
        {**segments, **twins}, ttl=dict.fromkeys(twins, TWIN_TTL_SECONDS)
    )
    replica = Replica(transport).start()
    try:
        if not replica.wait_ready(300):
            raise RuntimeError(f"replica not ready: {replica.status()}")
        contains = replica.contains
        bitmaps = {s: st.bitmap for s, st in replica.engine.segments.items()}
        sets = {s: set(bm) for s, bm in segments.items()}
        expected = [u in segments[s] for u, s in qs]
        got = [contains(u, s) for u, s in qs]
        wrong = sum(a is not e for a, e in zip(got, expected, strict=True))
        got_ttl = [contains(u, s) for u, s in qs_ttl]
        wrong_ttl = sum(a is not e for a, e in zip(got_ttl, expected, strict=True))
        ttl_segments = sum(t in replica.engine.expiries for t in twins)

        def t_contains_ttl() -> int:
            t0 = time.perf_counter_ns()
            for u, s in qs_ttl:
                contains(u, s)
            return time.perf_counter_ns() - t0

        def t_contains() -> int:
            t0 = time.perf_counter_ns()
            for u, s in qs:
                contains(u, s)
            return time.perf_counter_ns() - t0

        def t_bitmap() -> int:
            t0 = time.perf_counter_ns()
            for u, s in qs:
                u in bitmaps[s]  # noqa: B015 - the expression is what is timed
            return time.perf_counter_ns() - t0

        def t_set() -> int:
            t0 = time.perf_counter_ns()
            for u, s in qs:
                u in sets[s]  # noqa: B015
            return time.perf_counter_ns() - t0

        def t_loop() -> int:
            t0 = time.perf_counter_ns()
            for _u, _s in qs:
                pass
            return time.perf_counter_ns() - t0

        loops = {
            "Replica.contains": t_contains,
            "Replica.contains (TTL)": t_contains_ttl,
            "x in BitMap64": t_bitmap,
            "x in set": t_set,
            "empty loop": t_loop,
        }
        names = list(loops)
        per_check: dict[str, list[float]] = {n: [] for n in names}
        log(f"embedded: {rounds} rounds x {LOOP:,} checks x {len(names)} loops")
        for n in names:
            loops[n]()  # warm up
        for r in range(rounds):
            gc.collect()
            gc.disable()
            try:
                for n in names[r % len(names) :] + names[: r % len(names)]:
                    per_check[n].append(loops[n]() / LOOP)
            finally:
                gc.enable()

        # Per-call latency (timer pair included), for the distribution.
        calls = {
            "Replica.contains": (contains, qs),
            "Replica.contains (TTL)": (contains, qs_ttl),
            "x in BitMap64": (lambda u, s: u in bitmaps[s], qs),
            "x in set": (lambda u, s: u in sets[s], qs),
        }
        hists = {}
        clock = time.perf_counter_ns
        for n, (fn, checks) in calls.items():
            lat: list[int] = []
            gc.disable()
            try:
                for u, s in checks:
                    t0 = clock()
                    fn(u, s)
                    lat.append(clock() - t0)
            finally:
                gc.enable()
            h = Hist(n)
            h.record_many(lat)
            hists[n] = h.summary(cdf=False)
        pairs: list[int] = []
        for _ in range(LOOP):
            t0 = clock()
            pairs.append(clock() - t0)
        timer = Hist("timer")
        timer.record_many(pairs)
    finally:
        replica.stop(save=False)

    loop_ns = statistics.median(per_check["empty loop"])
    summary = {}
    for n in names:
        vals = sorted(per_check[n])
        med = statistics.median(vals)
        summary[n] = {
            "median_ns": round(med, 1),
            "min_ns": round(vals[0], 1),
            "p90_ns": round(vals[int(0.9 * (len(vals) - 1))], 1),
            "max_ns": round(vals[-1], 1),
            "net_of_loop_ns": round(med - loop_ns, 1) if n != "empty loop" else 0.0,
        }
    c = summary["Replica.contains"]
    c_ttl = summary["Replica.contains (TTL)"]
    return {
        "segments": n_seg,
        "memberships": total,
        "rounds": rounds,
        "checks_per_loop": LOOP,
        "wrong_answers": wrong,
        "wrong_answers_ttl": wrong_ttl,
        "ttl_segments": ttl_segments,
        "ttl_over_plain": round(c_ttl["net_of_loop_ns"] / c["net_of_loop_ns"], 3)
        if c["net_of_loop_ns"] > 0
        else None,  # fmt: skip
        "per_check": summary,
        "per_call_with_timer": hists,
        "timer_pair_ns_p50": timer.percentile_ns(50),
        "contains_over_bitmap": round(
            c["net_of_loop_ns"] / summary["x in BitMap64"]["net_of_loop_ns"], 2
        )
        if summary["x in BitMap64"]["net_of_loop_ns"] > 0
        else None,  # fmt: skip
        "targets": [
            target(
                "embedded: Replica.contains per check",
                round(c["median_ns"] / 1000, 3),
                "< 0.5 us",
                detail=f"{c['median_ns']:.0f} ns with the loop, {c['net_of_loop_ns']:.0f} ns net; "
                f"x in BitMap64 {summary['x in BitMap64']['median_ns']:.0f} ns, "
                f"x in set {summary['x in set']['median_ns']:.0f} ns",
                peer=f"x in BitMap64 {summary['x in BitMap64']['median_ns'] / 1000:.3f} us",
            ),
            target(
                "embedded: Replica.contains on a TTL segment / on a plain one",
                round(c_ttl["net_of_loop_ns"] / c["net_of_loop_ns"], 3)
                if c["net_of_loop_ns"] > 0
                else None,
                "<= 1.1 x",
                detail=f"TTL {c_ttl['median_ns']:.0f} ns with the loop, "
                f"{c_ttl['net_of_loop_ns']:.0f} ns net; plain {c['net_of_loop_ns']:.0f} ns "
                f"net; same members and users",
            ),
        ],
    }


def section(res: dict[str, Any], out: Path, report_dir: Path) -> list[str]:
    lines = [
        f"{res['rounds']} rounds x {res['checks_per_loop']:,} checks per loop over "
        f"{res['segments']} segments / {res['memberships']:,} memberships "
        "(same (user, segment) list for every loop; order rotating; GC off).",
        "",
    ]
    rows = [
        [n, s["median_ns"], s["net_of_loop_ns"], s["min_ns"], s["p90_ns"], s["max_ns"]]
        for n, s in res["per_check"].items()
    ]
    lines += table(
        ["loop", "ns/check (median)", "net of the loop", "min", "p90 of rounds", "max"], rows
    )
    lines += [
        "",
        f"Replica.contains costs {res['contains_over_bitmap']}x a bare `x in BitMap64` "
        "(net of the loop): a dict lookup, the freshness check and the ready flag.",
        "",
        f"Per call with a perf_counter_ns pair around it (the pair alone: "
        f"{res['timer_pair_ns_p50']} ns):",
        "",
    ]
    lines += table(
        ["call", "p50 ns", "p99 ns", "p99.9 ns"],
        [
            [n, h["p50_us"] * 1000, h["p99_us"] * 1000, h["p999_us"] * 1000]
            for n, h in res["per_call_with_timer"].items()
        ],
    )
    if res.get("ttl_over_plain") is not None:
        lines += [
            "",
            f"On a TTL segment (a twin of each segment with the same members, published with "
            f"`ttl_seconds`; {res.get('ttl_segments')} held with an expiry index), "
            f"Replica.contains costs {res['ttl_over_plain']}x what it costs on the plain one "
            "(net of the loop, same run): the expiry index is off the check path.",
        ]
    lines += [
        "",
        f"Wrong answers: {res['wrong_answers']} (TTL twins: {res.get('wrong_answers_ttl')}).",
    ]
    return lines
