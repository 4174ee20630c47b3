"""`publish`: publisher throughput for a large change, on Kafka and on the log directory.

For each log: a first publish of the whole data set (every membership an add, snapshots
written), then a large change (10% of each segment's members, drawn at random, removed and
as many random ids of the segment's range added) published with `Publisher.publish`.
Memberships per second are the adds plus removes of a publish over its wall time (recover
the state by replaying the log, diff, write one transaction). The change is also broken
down: recovering the state from the log (`sidecar.replica.RecoveredLog`) and the diff
(`publisher.plan.diff`) timed on their own; the rest of the publish is encoding and writing
the log. The first publish's segments are arithmetic progressions (compact in roaring), so
its rate flatters; the change is the figure to read.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pyroaring import BitMap64

from publisher import Publisher
from publisher.plan import SnapshotPacing, diff
from sidecar.replica import RecoveredLog

from . import data
from .report import table
from .services import Context, log


def changed(segments: dict[str, BitMap64], share: float, seed: int) -> dict[str, BitMap64]:
    """Each segment with `share` of its members, drawn at random, removed and as many random
    ids from the segment's id range added: churn scattered over the id space, as when users
    enter and leave a segment."""
    out = {}
    for i, (name, bm) in enumerate(segments.items()):
        k = int(len(bm) * share)
        if k < 1:
            out[name] = bm
            continue
        gone = data.random_members(bm, k, seed + 2 * i)
        new = data.random_ids(k, bm.min(), bm.max() + 1, seed + 2 * i + 1)
        out[name] = (bm - gone) | new
    return out


def run(ctx: Context) -> dict[str, Any]:
    n_seg, total = ctx.sizes.pick((20, 2_000_000), (100, 20_000_000))
    segs0 = data.make_segments(n_seg, total, seed=81, prefix="pub")
    segs1 = changed(segs0, 0.10, seed=82)
    results: dict[str, Any] = {"segments": n_seg, "memberships": data.memberships(segs0)}
    for kind in ("kafka", "logdir"):
        transport = ctx.transport(f"pub-{kind}", kind)
        publisher = Publisher(transport, writer_id=f"perf-pub-{kind}", partitions=8)
        log(f"publish on {kind}: first publish of {results['memberships']:,} memberships")
        first = publisher.publish(segs0)
        t0 = time.perf_counter()
        pacing = SnapshotPacing()
        with RecoveredLog(transport, observer=pacing) as state:
            recover_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            plan = diff(state, segs1, pacing=pacing)
            diff_s = time.perf_counter() - t0
        changes = plan.adds + plan.removes
        del state, plan
        log(f"publish on {kind}: change of {changes:,} memberships")
        second = publisher.publish(segs1)
        moved = second.adds + second.removes
        results[kind] = {
            "first": {
                "adds": first.adds,
                "seconds": round(first.seconds, 3),
                "memberships_per_s": round(first.adds / first.seconds),
                "log_bytes": first.log_bytes,
                "records": first.records,
                "snapshots": first.snapshots,
            },
            "change": {
                "adds": second.adds,
                "removes": second.removes,
                "seconds": round(second.seconds, 3),
                "memberships_per_s": round(moved / second.seconds),
                "log_bytes": second.log_bytes,
                "records": second.records,
                "snapshots": second.snapshots,
                "recover_seconds": round(recover_s, 3),
                "diff_seconds": round(diff_s, 3),
                "diff_memberships_per_s": round(changes / diff_s) if diff_s else None,
                "write_seconds": round(max(0.0, second.seconds - recover_s - diff_s), 3),
            },
        }
        log(f"   {kind}: first {first.summary()}; change {second.summary()}")
    results["targets"] = []
    return results


def section(res: dict[str, Any], out: Path, report_dir: Path) -> list[str]:
    lines = [
        f"{res['segments']} segments, {res['memberships']:,} memberships; then ~10% of each "
        "segment's members replaced. No DESIGN.md target.",
        "",
    ]
    rows = []
    for kind in ("kafka", "logdir"):
        r = res.get(kind)
        if not r:
            continue
        f, c = r["first"], r["change"]
        rows.append([f"{kind}: first publish", f["adds"], f["seconds"], f["memberships_per_s"],
                     f["log_bytes"], f["records"], "", "", ""])  # fmt: skip
        rows.append([f"{kind}: change", c["adds"] + c["removes"], c["seconds"],
                     c["memberships_per_s"], c["log_bytes"], c["records"], c["recover_seconds"],
                     c["diff_seconds"], c["write_seconds"]])  # fmt: skip
    lines += table(
        ["publish", "memberships", "seconds", "memberships/s", "log bytes", "records",
         "recover s", "diff s", "write s (rest)"],
        rows,
    )  # fmt: skip
    diffs = [
        f"{k} {res[k]['change']['diff_memberships_per_s']:,}/s"
        for k in ("kafka", "logdir")
        if k in res
    ]
    lines += ["", f"Diff alone: {', '.join(diffs)} memberships changed."]
    return lines
