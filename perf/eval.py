"""`eval`: a segment expression of 5 segments (perf/exprset.py) for one user per request,
and for 1,000 users per request, against the same answers computed in the caller, all
interleaved in rounds:

- sidecar: `SidecarClient.eval(user, expr)` and `eval_many(users, expr)` over the Unix socket
  of a `seg-sidecar` replaying the log;
- pyroaring in the caller: the caller holds the 5 bitmaps itself (as an embedded replica
  would) and evaluates the expression with `in` (the floor: no I/O at all);
- redis: the 5 memberships from Redis over its Unix socket with redis-py, combined in the
  caller: one pipeline of 5 SISMEMBER for one user, of 5 SMISMEMBER for 1,000 users.

Half the users are members of x2 (the segment every member must be in), the rest random."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from sidecar.client import SidecarClient

from . import exprset
from .check import interleave
from .report import fmt, image_lines, latency_rows, plot_latency, table
from .services import Context, log

MANY = 1_000


def _users(es: exprset.ExprSet, n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    x2 = es.segments["x2"].to_array()
    return [x2[rng.randrange(len(x2))] if rng.random() < 0.5 else rng.randrange(es.span)
            for _ in range(n)]  # fmt: skip


def run(ctx: Context) -> dict[str, Any]:
    es = exprset.get(ctx)
    segs = es.segments
    rounds = 10
    per_round = ctx.sizes.pick(300, 2_000)
    many_per_round = ctx.sizes.pick(20, 100)
    users = _users(es, per_round * 2, seed=41)
    lists = [_users(es, MANY, seed=42 + i) for i in range(many_per_round * 2)]
    client = SidecarClient(es.sidecar.uds, timeout=10.0).connect()
    rd = exprset.redis(ctx, es)
    expr = exprset.EXPR
    member = exprset.member

    def redis_one(u: int) -> bool:
        pipe = rd.pipeline(transaction=False)
        for name in exprset.NAMES:
            pipe.sismember(name, u)
        a, b, c, d, e = pipe.execute()
        return bool((a or b) and c and not d and not e)

    def redis_many(us: list[int]) -> list[bool]:
        pipe = rd.pipeline(transaction=False)
        for name in exprset.NAMES:
            pipe.smismember(name, us)
        a, b, c, d, e = pipe.execute()
        return [
            bool((x0 or x1) and x2 and not x3 and not x4)
            for x0, x1, x2, x3, x4 in zip(a, b, c, d, e, strict=True)
        ]

    one: dict[str, Any] = {
        "sidecar eval": lambda u, _s: client.eval(u, expr),
        "pyroaring in the caller": lambda u, _s: member(segs, u),
    }
    many: dict[str, Any] = {
        "sidecar eval_many": lambda i, _s: client.eval_many(lists[i], expr),
        "pyroaring in the caller": lambda i, _s: [member(segs, u) for u in lists[i]],
    }
    if rd is not None:
        one["redis 5 x SISMEMBER, pipelined"] = lambda u, _s: redis_one(u)
        many["redis 5 x SMISMEMBER, pipelined"] = lambda i, _s: redis_many(lists[i])
    pid = {"sidecar": es.sidecar.pid}
    log(f"eval: {rounds} rounds x {per_round} one-user requests x {len(one)} targets")
    try:
        qs = [(u, "") for u in users]
        h1, r1, first1, cpu1 = interleave(
            one, qs, rounds, per_round, warmup=50, pids={n: pid.get(n.split()[0]) for n in one}
        )
        log(f"eval: {rounds} rounds x {many_per_round} requests of {MANY} users")
        qm = [(i, "") for i in range(len(lists))]
        hm, rm, firstm, cpum = interleave(
            many, qm, rounds, many_per_round, warmup=5,
            pids={n: pid.get(n.split()[0]) for n in many},
        )  # fmt: skip
    finally:
        client.close()
    truth_one = [member(segs, u) for u, _ in qs[:per_round]]
    truth_many = [[member(segs, u) for u in lists[i]] for i in range(many_per_round)]
    wrong = {
        n: sum(a is not b for a, b in zip(v, truth_one, strict=True)) for n, v in first1.items()
    }
    for n, v in firstm.items():
        wrong[f"{n} (1,000 users)"] = sum(
            a is not b for got, want in zip(v, truth_many, strict=True)
            for a, b in zip(got, want, strict=True)
        )  # fmt: skip
    return {
        "expr": expr,
        "segments": len(segs),
        "memberships": es.memberships,
        "rounds": rounds,
        "requests_per_round": per_round,
        "many_requests_per_round": many_per_round,
        "users_per_many_request": MANY,
        "latency": {n: h.summary() for n, h in h1.items()},
        "latency_many": {n: h.summary() for n, h in hm.items()},
        "round_p50_us": r1,
        "round_p50_us_many": rm,
        "server_cpu_us_per_request": {**cpu1, **{f"{n} (1,000 users)": v for n, v in cpum.items()}},
        "us_per_user_p50_many": {n: round(h.p50_us / MANY, 3) for n, h in hm.items()},
        "wrong_answers": wrong,
        "redis": {"available": rd is not None, "reason": ctx.redis_error},
    }


def section(res: dict[str, Any], out: Path, report_dir: Path) -> list[str]:
    lines = [
        f"`{res['expr']}` over {res['segments']} segments, {res['memberships']:,} memberships; "
        f"{res['rounds']} interleaved rounds. One user per request:",
        "",
    ]
    lines += latency_rows(res["latency"])
    lines += ["", f"{res['users_per_many_request']:,} users per request:", ""]
    lines += latency_rows(res["latency_many"])
    lines += [""]
    lines += table(
        ["peer", "us per user at p50 (1,000 users per request)"],
        [[n, fmt(v, 3)] for n, v in res["us_per_user_p50_many"].items()],
    )
    if not res["redis"]["available"]:
        lines += ["", f"**Redis peer unavailable:** {res['redis']['reason']}"]
    lines += ["", f"Wrong answers against the data (first round): {res['wrong_answers']}."]
    png = plot_latency(res["latency"], "eval, one user", out / "eval_latency.png")
    lines += image_lines(png, "eval latency", report_dir)
    return lines
