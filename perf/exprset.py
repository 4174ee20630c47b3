"""The data set of the `eval` and `count` scenarios: 5 segments over 10M memberships (500k with
--quick), ids random over twice as many users so that the segments overlap, served by their
own `seg-sidecar` and loaded into the run's Redis as one set per segment.

The expressions measured: `EXPR`, all five segments with `|`, `&` and `!`, and `PAIR`, a
two-segment intersection (what Redis answers in one command, SINTERCARD)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pyroaring import BitMap64

from . import data
from .services import Context, SidecarProcess, ensure_redis_sets, log

NAMES = ("x0", "x1", "x2", "x3", "x4")
SHARES = (0.35, 0.25, 0.2, 0.12, 0.08)
EXPR = "(x0 | x1) & x2 & !x3 & !x4"
PAIR = "x0 & x1"


@dataclass
class ExprSet:
    segments: dict[str, BitMap64]
    sidecar: SidecarProcess
    memberships: int
    span: int  # ids are in [0, span)


def get(ctx: Context) -> ExprSet:
    """The data set and its sidecar, made once per run."""
    found = ctx.cache.get("exprset")
    if found is None:
        from publisher import Publisher

        total = ctx.sizes.pick(500_000, 10_000_000)
        span = 2 * total
        segments = {
            name: data.random_ids(int(total * share), 0, span, seed=300 + i)
            for i, (name, share) in enumerate(zip(NAMES, SHARES, strict=True))
        }
        transport = ctx.transport("expr")
        log(f"expression data set: 5 segments, {total:,} memberships -> {ctx.source}")
        Publisher(transport, writer_id="perf-expr", partitions=8).publish(segments)
        sidecar = ctx.sidecar(transport, "expr")
        found = ctx.cache["exprset"] = ExprSet(segments, sidecar, data.memberships(segments), span)
        ctx.services["expr_sidecar"] = {
            "command": " ".join(sidecar.command),
            "segments": len(segments),
            "memberships": found.memberships,
            "ready_seconds": round(sidecar.ready_seconds or 0, 2),
        }
    return found


def redis(ctx: Context, es: ExprSet) -> Any:
    """A redis-py client with the data set loaded, or None (reason in ctx.redis_error)."""
    server = ctx.redis()
    if server is None:
        return None
    import redis as redis_py

    # redis-py times reads out after a few seconds by default; a 5-segment count over 10M
    # members takes Redis longer than that on this machine
    client = redis_py.Redis(unix_socket_path=server.socket, socket_timeout=600)
    ensure_redis_sets(client, es.segments)
    return client


def member(segs: dict[str, Any], user: int) -> bool:
    """EXPR for one user, written out (the caller-side pyroaring peer and the truth)."""
    return (
        (user in segs["x0"] or user in segs["x1"])
        and user in segs["x2"]
        and user not in segs["x3"]
        and user not in segs["x4"]
    )


def audience(segs: dict[str, BitMap64]) -> BitMap64:
    """EXPR over whole segments with pyroaring."""
    return ((segs["x0"] | segs["x1"]) & segs["x2"]) - segs["x3"] - segs["x4"]
