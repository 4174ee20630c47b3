"""`count`: the size of an audience, over the 5 segments of perf/exprset.py, against the
same counts computed in the same run by

- pyroaring in the caller: the caller holds the bitmaps and runs the same set algebra
  (`((x0 | x1) & x2) - x3 - x4`, `x0.intersection_cardinality(x1)`): the floor, no I/O;
- redis over its Unix socket (redis-py): `SINTERCARD 2 x0 x1` for the intersection, and for
  the 5-segment expression the commands it takes in Redis, pipelined: SUNIONSTORE, SINTERSTORE,
  SDIFFSTORE into a scratch key, SCARD, DEL.

The sidecar answers `SidecarClient.count(expr)` over its Unix socket, computed under the
replica's lock from one consistent view (sidecar/replica/view.py). All interleaved in rounds.

Beside them, in this process, the same 5-segment expression over segments of ids random over
2^64 (the shape the replica holds compact, sidecar/replica/forms.py) as the replica's count
runs it now, on their id arrays (sidecar/replica/sorted_ids.py), and as it ran before,
converting each compact segment to a BitMap64 per count; pyroaring on the BitMap64s is the
floor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pyroaring import BitMap64

from sidecar.client import SidecarClient
from sidecar.expr import compile_expr
from sidecar.replica.forms import Forms, to_bitmap
from sidecar.replica.sorted_ids import operands

from . import data, exprset
from .check import interleave
from .report import latency_rows, table
from .services import Context, log

SCRATCH = "perf-count-scratch"
SPREAD = "5 segments, ids over 2^64"


def _spread(ctx: Context) -> dict[str, BitMap64]:
    """exprset's 5 segments, ids random over 2^64 (half of them shared, so they overlap)."""
    total = ctx.sizes.pick(200_000, 1_000_000)
    pool = data.random_ids(total, 0, 2**64, seed=400).to_array()
    out = {}
    for i, (name, share) in enumerate(zip(exprset.NAMES, exprset.SHARES, strict=True)):
        start = (i * len(pool)) // 10
        out[name] = BitMap64(pool[start : start + int(total * share * 2)])
    return out


def run(ctx: Context) -> dict[str, Any]:
    es = exprset.get(ctx)
    segs = es.segments
    # Redis takes seconds per count at full size: few counts, in few rounds (its own ~1000x
    # the sidecar's: more counts would not move the ratio)
    rounds = 3
    per_round = ctx.sizes.pick(3, 1)
    client = SidecarClient(es.sidecar.uds, timeout=60.0).connect()
    rd = exprset.redis(ctx, es)

    def redis_expr() -> int:
        pipe = rd.pipeline(transaction=False)
        pipe.sunionstore(SCRATCH, ["x0", "x1"])
        pipe.sinterstore(SCRATCH, [SCRATCH, "x2"])
        pipe.sdiffstore(SCRATCH, [SCRATCH, "x3", "x4"])
        pipe.scard(SCRATCH)
        pipe.delete(SCRATCH)
        return pipe.execute()[3]

    exprs = {"5 segments": exprset.EXPR, "x0 & x1": exprset.PAIR}
    spread = _spread(ctx)
    compact = [Forms().settle(BitMap64(bm), 1) for bm in spread.values()]
    compiled = compile_expr(exprset.EXPR)
    targets: dict[str, Any] = {
        "sidecar count, 5 segments": lambda _u, _s: client.count(exprset.EXPR).count,
        "pyroaring in the caller, 5 segments": lambda _u, _s: len(exprset.audience(segs)),
        "sidecar count, x0 & x1": lambda _u, _s: client.count(exprset.PAIR).count,
        "pyroaring in the caller, x0 & x1": lambda _u, _s: segs["x0"].intersection_cardinality(
            segs["x1"]
        ),
    }
    spread_names = {
        f"replica count on sorted ids, {SPREAD}": lambda _u, _s: compiled.count(operands(compact)),
        f"replica count converting to BitMap64 (before), {SPREAD}": lambda _u, _s: compiled.count(
            [to_bitmap(c) for c in compact]
        ),
        f"pyroaring in the caller, {SPREAD}": lambda _u, _s: len(exprset.audience(spread)),
    }
    targets |= spread_names
    if rd is not None:
        targets["redis SUNIONSTORE/SINTERSTORE/SDIFFSTORE/SCARD, 5 segments"] = lambda _u, _s: (
            redis_expr()
        )
        targets["redis SINTERCARD, x0 & x1"] = lambda _u, _s: rd.sintercard(2, ["x0", "x1"])
    qs = [(0, "")] * (per_round * 2)
    log(f"count: {rounds} rounds x {per_round} counts x {len(targets)} targets")
    try:
        hists, round_p50, first, cpu = interleave(
            targets, qs, rounds, per_round, warmup=1,
            pids={n: es.sidecar.pid for n in targets if n.startswith("sidecar")},
        )  # fmt: skip
        versions = client.count(exprset.EXPR).versions
    finally:
        client.close()
    truth = {
        "5 segments": len(exprset.audience(segs)),
        "x0 & x1": len(segs["x0"] & segs["x1"]),
        SPREAD: len(exprset.audience(spread)),
    }
    wrong = {
        n: sum(v != truth[next(k for k in truth if n.endswith(k))] for v in answers)
        for n, answers in first.items()
    }
    return {
        "exprs": exprs,
        "counts": truth,
        "versions": versions,
        "segments": len(segs),
        "memberships": es.memberships,
        "spread_memberships": data.memberships(spread),
        "spread_compact": sum(type(c) is not BitMap64 for c in compact),
        "rounds": rounds,
        "requests_per_round": per_round,
        "latency": {n: h.summary() for n, h in hists.items()},
        "round_p50_us": round_p50,
        "server_cpu_us_per_request": cpu,
        "wrong_answers": wrong,
        "redis": {"available": rd is not None, "reason": ctx.redis_error},
    }


def section(res: dict[str, Any], out: Path, report_dir: Path) -> list[str]:
    lines = [
        f"Counts over {res['segments']} segments, {res['memberships']:,} memberships: "
        + "; ".join(f"`{e}` = {res['counts'][k]:,}" for k, e in res["exprs"].items())
        + f". {res['rounds']} interleaved rounds x {res['requests_per_round']} counts per target.",
        "",
    ]
    if "spread_memberships" in res:
        lines += [
            f"In process: `{res['exprs']['5 segments']}` over 5 segments of ids random over "
            f"2^64 ({res['spread_memberships']:,} memberships, {res['spread_compact']} held "
            f"compact) = {res['counts'].get(SPREAD, 0):,}: the replica's count on sorted ids, "
            "as it was (each compact segment converted to a BitMap64 per count), and "
            "pyroaring on the BitMap64s.",
            "",
        ]
    lines += latency_rows(res["latency"])
    lines += ["", "p50 in milliseconds:", ""]
    lines += table(
        ["peer", "p50 ms"], [[n, round(s["p50_us"] / 1000, 2)] for n, s in res["latency"].items()]
    )
    if not res["redis"]["available"]:
        lines += ["", f"**Redis peer unavailable:** {res['redis']['reason']}"]
    lines += ["", f"Wrong answers against the data: {res['wrong_answers']}."]
    return lines
