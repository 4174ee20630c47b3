"""`python -m perf.spark_batch --lake DIR [--definitions FILE] [--rounds N] [--out DIR]
[--skip WAY]`, and the `seg-perf spark_batch` scenario (`run`): the batch job's ways on the same
lake in one Spark session, one after the other per round, the headline first:

- `merged` (the headline, `seg-compute batch`'s default): one job for all segments over the
  lake's files, the simple segments of each table merged into one query (compute/merge.py);
- `per segment`: one Spark job per segment over the files (`one_pass=False`);
- `one pass, whole tables`: one job over the views cached whole on first read;
- `one pass`: one job over the views narrowed to the columns the queries read and cached, no
  merge (the default before the merge: the "before" of `seg-perf spark_batch`);
- `merged, cached`: the merge over the narrowed cached views.

Each computes every segment of the definitions file (default `compute/definitions/bench20.toml`)
from registering the views to the bitmaps (the segment set is not written: equal for all);
all their bitmaps must be equal, else it exits 1. The Spark start-up is timed once and added to
each way's figure for "end to end" (what `seg-compute batch` pays; the first way also pays the
JVM's warm-up; the driver JVM's class-data archive, compute/spark.py, is built before the
clock starts if missing, as `seg-compute batch` builds it on first use). Load averages
(`os.getloadavg`) are recorded before and after each run: the machine is shared. Writes
OUT/spark_batch.json (default perf/results) in a seg-perf scenario's shape. Heavy: a 1M-user
lake (`seg-compute gen-data --users 1000000 --orders-per-user 10`) takes about a minute per
way on two cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from compute import batch
from compute.definitions import EXAMPLE
from compute.lake import LakeParams, generate, lake_meta, read_lake_meta

from .report import loadavg, machine, stamp, table, target, write_json
from .services import Context, log

WAYS: dict[str, dict[str, bool]] = {
    "per segment": {"one_pass": False},
    "one pass, whole tables": {"prune_columns": False, "merged": False, "cache": True},
    "one pass": {"merged": False, "cache": True},
    "merged, cached": {"cache": True},
    "merged": {},  # seg-compute batch's default
}
HEADLINE = "merged"
BEFORE = "one pass"  # the comparison `seg-perf spark_batch` runs


def measure(
    lake: Path, definitions: Path, rounds: int, ways: list[str], *, judged: bool = True
) -> dict[str, Any]:
    """Run `ways` (in this order) `rounds` times in one session; `judged` False: a lake smaller
    than DESIGN.md's (the target is shown, not judged)."""
    from compute.spark import DEFAULT_DRIVER_MEMORY, build_session, ensure_cds_archive

    ensure_cds_archive(log)  # built once, like the lake, and not timed: what a batch finds
    t0 = time.perf_counter()
    conf = {"spark.driver.memory": DEFAULT_DRIVER_MEMORY}  # as seg-compute batch's default
    spark = build_session(app_name="perf-spark-batch", conf=conf)
    startup = time.perf_counter() - t0
    segments = batch.load_segments(lake, definitions)
    runs: list[dict[str, Any]] = []
    answers: dict[str, dict[str, Any]] = {}
    try:
        for r in range(rounds):
            for way in ways:
                options = WAYS[way]
                load_before = os.getloadavg()[0]
                t = time.perf_counter()
                bitmaps = batch.compute(spark, lake, segments, **options)
                seconds = time.perf_counter() - t
                answers[way] = bitmaps
                after = os.getloadavg()[0]
                runs.append({"round": r, "way": way, "seconds": round(seconds, 2),
                             "load_before": load_before, "load_after": after})  # fmt: skip
                print(f"round {r} {way}: {seconds:.1f} s (load {load_before:.1f})", flush=True)
    finally:
        spark.stop()
    equal = all(bitmaps == answers[HEADLINE] for bitmaps in answers.values())
    best = {way: min(x["seconds"] for x in runs if x["way"] == way) for way in ways}
    e2e = {w: round(s + startup, 2) for w, s in best.items()}
    return {
        "targets": [
            target(
                f"spark batch: {len(segments)} segments in one pass, end to end",
                e2e[HEADLINE],
                "< 30 s",
                applies=judged,
                detail=f"lake {lake}; "
                + "".join(f"{w} {e2e[w]} s, " for w in ways if w != HEADLINE)
                + f"in the same run ({len(runs)} runs, best of each way, Spark start-up "
                f"{startup:.1f} s included); same bitmaps: " + ("yes" if equal else "NO"),
                peer=_peer(e2e),
            )
        ],
        "lake": str(lake),
        "definitions": str(definitions),
        "segments": len(segments),
        "memberships": sum(len(b) for b in answers[HEADLINE].values()),
        "spark_startup_seconds": round(startup, 2),
        "runs": runs,
        "best_seconds": best,
        "end_to_end_seconds": e2e,
        "speedup_of_headline": {
            w: round(best[w] / best[HEADLINE], 2) for w in ways if w != HEADLINE
        },
        "same_bitmaps": equal,
        "cores": os.cpu_count(),
    }


def _peer(e2e: dict[str, float]) -> str:
    if BEFORE not in e2e:
        return "the other ways (same lake, same run)"
    ratio = e2e[BEFORE] / e2e[HEADLINE] if e2e[HEADLINE] else float("inf")
    return f"`{BEFORE}` (before the merge) {e2e[BEFORE]} s, same lake and run: {ratio:.2f}x"


#: `seg-perf spark_batch`'s lakes (`seg-compute gen-data` parameters): BATCH.md's 1M users /
#: 10M orders, and a small one for --quick
FULL_LAKE = LakeParams(users=1_000_000, orders_per_user=10)
QUICK_LAKE = LakeParams(users=20_000, orders_per_user=10)
LAKES_DIR = Path(__file__).resolve().parent.parent / ".cache" / "perf-lakes"


def cached_lake(params: LakeParams, root: Path = LAKES_DIR) -> Path:
    """The lake of these parameters under `root`, generated on first use and reused while its
    _lake.json says it was made with them (gen-data swaps a lake in whole, so a lake with its
    _lake.json is complete)."""
    path = root / (
        f"users{params.users}-orders{params.orders_per_user:g}-events{params.events_per_user:g}"
        f"-days{params.days}-seed{params.seed}-{params.as_of.isoformat()}"
    )
    want = {k: v for k, v in lake_meta(params).items()}
    meta = read_lake_meta(path) if path.is_dir() else None
    if meta is None or any(meta.get(k) != v for k, v in want.items()):
        log(f"spark_batch: generating {path} (seg-compute gen-data, {params.users:,} users)")
        root.mkdir(parents=True, exist_ok=True)
        generate(path, params, progress=lambda line: None)
    return path


def run(ctx: Context) -> dict[str, Any]:
    """`seg-perf spark_batch`: the headline way, then the way before the merge, on a cached
    lake: 1M users, once each, the headline first (so it, not the peer, pays the JVM's
    warm-up: its end to end is what a `seg-compute batch` process pays); --quick, 20k users,
    also once each (not judged: it shows the scenario runs and both ways agree)."""
    lake = cached_lake(QUICK_LAKE if ctx.quick else FULL_LAKE)
    return measure(lake, EXAMPLE.parent / "bench20.toml", 1, [HEADLINE, BEFORE],
                   judged=not ctx.quick)  # fmt: skip


def section(res: dict[str, Any], out: Path, report_dir: Path) -> list[str]:
    lines = [
        f"`{res['definitions'].rsplit('/', 1)[-1]}`: {res['segments']} segments, "
        f"{res['memberships']:,} memberships, lake `{res['lake']}`; one Spark session "
        f"(start-up {res['spark_startup_seconds']} s, added to each way for end to end); "
        f"same bitmaps from every way: {'yes' if res['same_bitmaps'] else 'NO'}.",
        "",
    ]
    rows = [[r["way"], r["round"], r["seconds"], res["end_to_end_seconds"][r["way"]] if r["seconds"]
             == res["best_seconds"][r["way"]] else "", r["load_before"], r["load_after"]]
            for r in res["runs"]]  # fmt: skip
    lines += table(
        ["way (in run order)", "round", "segments s", "end to end s", "load before", "load after"],
        rows,
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.spark_batch", description=__doc__)
    p.add_argument("--lake", type=Path, required=True)
    p.add_argument("--definitions", type=Path, default=EXAMPLE.parent / "bench20.toml")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=[w for w in WAYS if w != HEADLINE],
        help=f"leave this way out (repeatable); `{HEADLINE}` always runs",
    )
    args = p.parse_args(argv)
    doc: dict[str, Any] = {  # the shape of a seg-perf scenario's file (perf/cli.py run_one)
        "scenario": "spark_batch",
        "quick": False,
        "command": "python -m perf.spark_batch " + shlex.join(argv or sys.argv[1:]),
        "started_at": stamp(),
        "machine": machine(),
        "load_before": loadavg(),
    }
    t0 = time.monotonic()
    ways = [HEADLINE, *(w for w in WAYS if w not in {HEADLINE, *args.skip})]
    res = measure(args.lake, args.definitions, args.rounds, ways)
    doc |= {"targets": res.pop("targets"), "results": res, "error": None}
    doc |= {"seconds": round(time.monotonic() - t0, 1), "load_after": loadavg()}
    write_json(args.out, "spark_batch", doc)
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}, indent=2))
    return 0 if res["same_bitmaps"] else 1


if __name__ == "__main__":
    sys.exit(main())
