"""`python -m perf.spark_batch --lake DIR [--definitions FILE] [--rounds N] [--out DIR]
[--skip WAY]`: the batch job's ways on the same lake in one Spark session, one after the other
per round:

- `per segment`: one Spark job per segment over the lake's files (`one_pass=False`, as before);
- `one pass, whole tables`: every segment in one job over the views cached whole on first read
  (`prune_columns=False`: the one pass before the column-pruned cache);
- `one pass`: the same over the views narrowed to the columns the queries read, each cached
  (`seg-compute batch`'s default).

Each computes every segment of the definitions file (default `compute/definitions/bench20.toml`)
from registering the views to the bitmaps (the segment set is not written: equal for all);
all their bitmaps must be equal, else it exits 1. The Spark start-up is timed once and added to each
way's figure for "end to end" (what `seg-compute batch` pays). Load averages (`os.getloadavg`)
are recorded before and after each run: the machine is shared. Writes OUT/spark_batch.json
(default perf/results). Heavy: a 1M-user lake (`seg-compute gen-data --users 1000000
--orders-per-user 10`) takes minutes per round on two cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from compute import batch
from compute.definitions import EXAMPLE

from .report import loadavg, stamp, target

WAYS: dict[str, dict[str, bool]] = {
    "per segment": {"one_pass": False},
    "one pass, whole tables": {"one_pass": True, "prune_columns": False},
    "one pass": {"one_pass": True},
}


def run(lake: Path, definitions: Path, rounds: int, ways: list[str]) -> dict[str, Any]:
    from compute.spark import DEFAULT_DRIVER_MEMORY, build_session

    t0 = time.perf_counter()
    conf = {"spark.driver.memory": DEFAULT_DRIVER_MEMORY}  # as seg-compute batch's default
    spark = build_session(app_name="perf-spark-batch", conf=conf)
    startup = time.perf_counter() - t0
    segments = batch.load_segments(lake, definitions)
    runs: list[dict[str, Any]] = []
    answers: dict[str, dict[str, Any]] = {}
    try:
        for r in range(rounds):
            for way, options in WAYS.items():
                if way not in ways:
                    continue
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
    equal = all(bitmaps == answers["one pass"] for bitmaps in answers.values())
    best = {way: min(x["seconds"] for x in runs if x["way"] == way) for way in ways}
    e2e = {w: round(s + startup, 2) for w, s in best.items()}
    return {
        "targets": [
            target(
                f"spark batch: {len(segments)} segments in one pass, end to end",
                e2e["one pass"],
                "< 30 s",
                detail=f"lake {lake}; "
                + "".join(f"{w} {e2e[w]} s, " for w in ways if w != "one pass")
                + f"in the same run ({len(runs)} runs, best of each way, Spark start-up "
                f"{startup:.1f} s included); same bitmaps: " + ("yes" if equal else "NO"),
                peer="the other ways (same lake, same run)",
            )
        ],
        "lake": str(lake),
        "definitions": str(definitions),
        "segments": len(segments),
        "memberships": sum(len(b) for b in answers["one pass"].values()),
        "spark_startup_seconds": round(startup, 2),
        "runs": runs,
        "best_seconds": best,
        "end_to_end_seconds": e2e,
        "speedup_over_one_pass": {
            w: round(best[w] / best["one pass"], 2) for w in ways if w != "one pass"
        },
        "same_bitmaps": equal,
        "cores": os.cpu_count(),
    }


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
        choices=[w for w in WAYS if w != "one pass"],
        help="leave this way out (repeatable); `one pass` always runs",
    )
    args = p.parse_args(argv)
    started, load_before = stamp(), loadavg()
    res = run(args.lake, args.definitions, args.rounds, [w for w in WAYS if w not in args.skip])
    res.update(started_at=started, load_before=load_before, load_after=loadavg())
    res["command"] = "python -m perf.spark_batch " + " ".join(argv or sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "spark_batch.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}, indent=2))
    return 0 if res["same_bitmaps"] else 1


if __name__ == "__main__":
    sys.exit(main())
