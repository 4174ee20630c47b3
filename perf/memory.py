"""`memory`: bytes per membership in the replica against a Redis set of the same members.

Four densities of one segment of N members: dense (consecutive ids), medium (1 id in 16),
sparse32 (uniformly random over a 2**32 range) and sparse64 (uniformly random over the whole
64-bit space). For each:

- replica: a fresh process (`python -m perf.memory child LOGDIR`) imports everything,
  reads its RSS, starts a `Replica` on a log directory holding the segment, waits until
  ready, runs the GC and `malloc_trim(0)` (so replay garbage already freed is not counted),
  and reads its RSS again. The same is done for a log with a 1-member segment, and that
  baseline is subtracted. `engine.bitmap_bytes()` (roaring's container bytes, without the
  64-bit index above them) and the serialized size are reported beside it.
- Redis: `INFO memory` before and after `SADD`-ing the same members into one key of an
  otherwise empty redis-server (`used_memory` and `used_memory_rss` deltas).

The target compares Redis's `used_memory` delta with the replica's RSS delta (both what the
process really holds for these members; the replica figure also carries allocator slack).
"""

from __future__ import annotations

import ctypes
import gc
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from pyroaring import BitMap64

from . import data
from .report import table, target
from .services import Context, load_redis, log, rss_bytes

SEGMENT = "mem-seg"
#: RSS deltas smaller than this are noise (page granularity, allocator arenas).
NOISE_FLOOR = 512 * 1024


def densities(n: int) -> dict[str, BitMap64]:
    base = data.USER_BASE
    return {
        "dense": BitMap64(range(base, base + n)),
        "medium (1 in 16)": data.random_ids(n, base, base + 16 * n, seed=51),
        "sparse32 (random in 2^32)": data.random_ids(n, base, base + 2**32, seed=52),
        "sparse64 (random in 2^64)": data.random_ids(n, 0, 2**64, seed=53),
    }


def child(logdir: str) -> None:
    """In a fresh process: RSS delta of a replica holding the log's segments."""
    from sidecar.replica import Replica
    from sidecar.transport.logdir import LogDirTransport

    try:
        libc = ctypes.CDLL("libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        trim = None

    def settle() -> int:
        gc.collect()
        if trim is not None:
            trim(0)
        return rss_bytes()

    replica = Replica(LogDirTransport(logdir), poll_interval=0.05)
    before = settle()
    replica.start()
    if not replica.wait_ready(600):
        raise SystemExit(f"replica not ready: {replica.status()}")
    after = settle()
    engine = replica.engine
    doc = {
        "rss_before": before,
        "rss_after": after,
        "bitmap_bytes": engine.bitmap_bytes(),
        "memberships": engine.memberships(),
        "serialized_bytes": sum(len(s.bitmap.serialize()) for s in engine.segments.values()),
    }
    replica.stop(save=False)
    print(json.dumps(doc), flush=True)


def measure_replica(logdir: Path) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "perf.memory", "child", str(logdir)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory child failed: {proc.stderr[-1000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(ctx: Context) -> dict[str, Any]:
    from publisher import Publisher

    n = ctx.sizes.pick(300_000, 2_000_000)
    log(f"memory: 4 densities x {n:,} members")
    sets = densities(n)
    base_t = ctx.transport("mem-baseline", "logdir")
    Publisher(base_t, writer_id="perf-mem", partitions=4).publish(
        {SEGMENT: BitMap64([data.USER_BASE])}
    )
    baseline = measure_replica(base_t.path)
    base_delta = baseline["rss_after"] - baseline["rss_before"]
    redis = ctx.redis()
    rows: dict[str, Any] = {}
    targets = []
    for i, (name, members) in enumerate(sets.items()):
        t = ctx.transport(f"mem-{i}", "logdir")
        Publisher(t, writer_id="perf-mem", partitions=4).publish({SEGMENT: members})
        rep = measure_replica(t.path)
        if rep["memberships"] != n:
            raise RuntimeError(f"{name}: replica holds {rep['memberships']} members, not {n}")
        rss_raw = rep["rss_after"] - rep["rss_before"] - base_delta
        # Below the noise floor of an RSS delta (pages, allocator arenas) the container bytes
        # are the better figure: the run-length encoded dense case holds a few hundred bytes.
        small = rss_raw < NOISE_FLOOR
        rss = max(rep["bitmap_bytes"], rep["serialized_bytes"], 1) if small else rss_raw
        row: dict[str, Any] = {
            "members": n,
            "replica_rss_delta_bytes": rss_raw,
            "replica_bytes": rss,
            "replica_bytes_from": "container bytes (RSS delta below noise)" if small else "RSS",
            "replica_bytes_per_member": round(rss / n, 3),
            "bitmap_bytes_per_member": round(rep["bitmap_bytes"] / n, 3),
            "serialized_bytes_per_member": round(rep["serialized_bytes"] / n, 3),
        }
        if redis is not None:
            client = redis.client()
            try:
                client.flushall()
                m0 = redis.used_memory()
                load_redis(client, {SEGMENT: members})
                m1 = redis.used_memory()
                card = client.scard(SEGMENT)
                enc = client.object("encoding", SEGMENT)
                client.flushall()
            finally:
                client.close()
            used = m1["used_memory"] - m0["used_memory"]
            used_rss = m1["used_memory_rss"] - m0["used_memory_rss"]
            row.update(
                {
                    "redis_cardinality": card,
                    "redis_encoding": enc.decode() if isinstance(enc, bytes) else enc,
                    "redis_used_memory_delta_bytes": used,
                    "redis_bytes_per_member": round(used / n, 3),
                    "redis_rss_bytes_per_member": round(used_rss / n, 3),
                    "redis_over_replica": round(used / rss, 2) if rss > 0 else None,
                    "redis_rss_over_replica": round(used_rss / rss, 2) if rss > 0 else None,
                    "redis_over_bitmap_bytes": round(used / rep["bitmap_bytes"], 2),
                }
            )
            measured = row["redis_over_replica"]
            detail = (
                f"replica {row['replica_bytes_per_member']} B/member "
                f"({row['replica_bytes_from']}), "
                f"Redis {row['redis_bytes_per_member']} B/member (used_memory)"
            )
        else:
            measured = None
            detail = f"Redis unavailable: {ctx.redis_error}"
        rows[name] = row
        log(f"   {name}: {row}")
        targets.append(
            target(
                f"memory {name}: Redis bytes / replica bytes",
                measured,
                ">=",
                15.0,
                "x",
                detail=detail,
            )  # fmt: skip
        )
    return {
        "members_per_density": n,
        "baseline_rss_delta_bytes": base_delta,
        "densities": rows,
        "redis": "available" if redis is not None else f"unavailable: {ctx.redis_error}",
        "targets": targets,
    }


def section(res: dict[str, Any], out: Path, report_dir: Path) -> list[str]:
    lines = [
        f"One segment of {res['members_per_density']:,} members per density. Replica: RSS "
        "delta of a fresh process holding it in a `Replica` (after GC and malloc_trim; the "
        f"delta for a 1-member log, {res['baseline_rss_delta_bytes']:,} bytes, subtracted). "
        "Redis: `used_memory` delta of an empty redis-server after SADD.",
        "",
    ]
    rows = []
    for name, r in res["densities"].items():
        rows.append(
            [
                name,
                r["replica_bytes_per_member"]
                if r["replica_bytes_from"] == "RSS"
                else f"{r['replica_bytes_per_member']} (1)",
                r["bitmap_bytes_per_member"],
                r["serialized_bytes_per_member"],
                r.get("redis_bytes_per_member"),
                r.get("redis_rss_bytes_per_member")
                if (r.get("redis_rss_bytes_per_member") or 0) > 0
                else "n/a (2)",
                r.get("redis_encoding"),
                r.get("redis_over_replica"),
            ]
        )
    lines += table(
        [
            "density",
            "replica B/member (RSS delta)",
            "bitmap_bytes() B/member",
            "serialized B/member",
            "Redis B/member (used_memory)",
            "Redis B/member (RSS)",
            "Redis encoding",
            "Redis / replica",
        ],
        rows,
    )
    lines += [
        "",
        f"(1) RSS delta under {NOISE_FLOOR // 1024} KiB, i.e. noise: the larger of "
        "`bitmap_bytes()` and the serialized size is used instead. (2) Redis's RSS fell: pages "
        "of the previous density's data were returned to the system during this one.",
        "",
        "`engine.bitmap_bytes()` counts roaring's containers only: for ids spread over the "
        "64-bit space every member sits in its own container, and the index above the "
        "containers (not counted there) dominates; the RSS column shows what it costs.",
    ]
    if res["redis"] != "available":
        lines += ["", f"**Redis peer {res['redis']}**"]
    return lines


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "child":
        child(sys.argv[2])
    else:
        print("usage: python -m perf.memory child LOGDIR", file=sys.stderr)
        sys.exit(2)
