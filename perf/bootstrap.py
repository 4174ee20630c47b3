"""`bootstrap`: cold start from the real Kafka broker, and warm restart from a checkpoint.

The data set (N segments, M memberships; full size 10,000 / 1B over a base of 100M users in
four shapes, `data.population_segments`) is published first with the `Publisher` (one
transaction: deltas plus snapshots). Then, in this process:

- cold: `Replica(KafkaTransport, state_dir=...)`, timed from `start()` to ready (snapshots
  read to their end, deltas from the snapshots' offsets up to the end offsets seen at start);
- checkpoint: `stop(save=True)` writes the checkpoint (timed);
- warm: a new `Replica` with the same state directory, timed from `start()` to ready
  (checkpoint loaded, then the log from the stored offsets).

The `seg-sidecar` process's own cold start (process start to `/readyz` 200, imports
included) is measured on the same topics as well.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

from publisher import Publisher
from sidecar.memory import release_free_memory
from sidecar.replica import Replica

from . import data
from .report import table, target
from .services import Context, log, reset_peak_rss, rss_bytes

FULL = (10_000, 1_000_000_000)


def _ready(transport: Any, state_dir: Path, wait_s: float, what: str) -> tuple[Replica, float]:
    """A Replica of `transport` on `state_dir`, started and ready, and the seconds that took;
    RuntimeError (the replica stopped) when it is not ready within `wait_s`."""
    t0 = time.perf_counter()
    replica = Replica(transport, state_dir=state_dir).start()
    if not replica.wait_ready(wait_s):
        replica.stop(save=False)
        raise RuntimeError(f"{what} replica not ready in {wait_s} s: {replica.status()}")
    return replica, time.perf_counter() - t0


def run(ctx: Context) -> dict[str, Any]:
    n_seg, total = ctx.sizes.pick((100, 2_000_000), FULL)
    wait_s = ctx.sizes.pick(120, 900)  # a replica that cannot get ready fails the scenario
    full = (n_seg, total) == FULL
    t0 = time.perf_counter()
    segs = data.population_segments(n_seg, total, seed=91, prefix="boot")
    expected = data.memberships(segs)
    log(f"bootstrap: {expected:,} memberships generated in {time.perf_counter() - t0:.1f} s")
    transport = ctx.transport("boot", "kafka")
    log(f"bootstrap: publishing {n_seg} segments / {expected:,} memberships to Kafka")
    pub = Publisher(transport, writer_id="perf-boot", partitions=8).publish(segs)
    log(f"   {pub.summary()}")
    del segs
    release_free_memory()  # the generated segments' pages, so the deltas below are the replica's
    state_dir = ctx.workdir / "boot-state"

    rss0 = rss_bytes()
    reset_peak_rss()
    replica, cold = _ready(transport, state_dir, wait_s, "cold")
    cold_status = replica.status()
    rss1, cold_peak = rss_bytes(), rss_bytes(field="VmHWM")
    if cold_status["memberships"] != expected:
        replica.stop(save=False)
        raise RuntimeError(f"cold replica holds {cold_status['memberships']}, not {expected}")
    log(f"   cold start {cold:.2f} s")
    reset_peak_rss()
    t0 = time.perf_counter()
    replica.stop(save=True)
    save_s = time.perf_counter() - t0
    ckpt = state_dir / "checkpoint.seg"
    ckpt_bytes = ckpt.stat().st_size if ckpt.exists() else 0
    save_peak = rss_bytes(field="VmHWM")
    del replica
    release_free_memory()

    rss2 = rss_bytes()
    reset_peak_rss()
    warm_rep, warm = _ready(transport, state_dir, wait_s, "warm")
    warm_status = warm_rep.status()
    rss3, warm_peak = rss_bytes(), rss_bytes(field="VmHWM")
    warm_rep.stop(save=False)
    del warm_rep
    gc.collect()
    log(f"   warm restart {warm:.2f} s from {warm_status['started_from']}")
    if warm_status["memberships"] != expected:
        raise RuntimeError(f"warm replica holds {warm_status['memberships']}, not {expected}")

    sidecar = ctx.sidecar(transport, "boot")
    sidecar_ready = sidecar.ready_seconds
    sidecar_rss = sidecar.rss()
    sidecar.stop()
    log(f"   seg-sidecar process start -> /readyz {sidecar_ready:.2f} s")

    size = f"{n_seg:,} segments / {expected:,} memberships"
    note = "" if full else f" (at {size}; the target is for 10,000 / 1B)"
    return {
        "segments": n_seg,
        "memberships": expected,
        "users": data.POPULATION,
        "full_size": full,
        "publish": {
            "seconds": round(pub.seconds, 2),
            "log_bytes": pub.log_bytes,
            "records": pub.records,
            "snapshots": pub.snapshots,
        },
        "cold_seconds": round(cold, 3),
        "cold_memberships_per_s": round(expected / cold),
        "cold_rss_delta_bytes": rss1 - rss0,
        "cold_peak_rss_delta_bytes": cold_peak - rss0,
        # over the RSS of the ready replica: what writing the checkpoint adds
        "checkpoint_save_peak_rss_delta_bytes": save_peak - rss1,
        "warm_rss_delta_bytes": rss3 - rss2,
        "warm_peak_rss_delta_bytes": warm_peak - rss2,
        "checkpoint_save_seconds": round(save_s, 3),
        "checkpoint_bytes": ckpt_bytes,
        "warm_seconds": round(warm, 3),
        "warm_started_from": warm_status["started_from"],
        "sidecar_process_ready_seconds": round(sidecar_ready or 0, 3),
        "sidecar_process_rss_bytes": sidecar_rss,
        "partitions": 8,
        "targets": [
            target(
                "bootstrap: cold start from Kafka",
                round(cold, 2),
                "< 15 s",
                detail=f"{size}{note}",
                applies=full,
            ),
            target(
                "bootstrap: warm restart from a checkpoint",
                round(warm, 2),
                "< 3 s",
                detail=f"{size}, checkpoint {ckpt_bytes / 2**20:.1f} MiB{note}",
                applies=full,
            ),
        ],  # fmt: skip
    }


def section(res: dict[str, Any], out: Path, report_dir: Path) -> list[str]:
    p = res["publish"]
    lines = [
        f"{res['segments']:,} segments, {res['memberships']:,} memberships on {res['partitions']} "
        f"partitions{'' if res['full_size'] else ' (--quick size)'}, over a base of "
        f"{res.get('users', 0):,} users in four shapes taking turns (`data.population_segments`: "
        "sign-up cohorts as id ranges, 1-in-k samples, random bands at densities 1/16-1/2, "
        "members scattered over the whole base); published in "
        f"{p['seconds']} s ({p['records']:,} records, {p['log_bytes'] / 2**20:.1f} MiB before "
        f"compression, {p['snapshots']} snapshots).",
        "",
    ]
    lines += table(
        ["phase", "seconds", "detail"],
        [
            ["cold: Replica start -> ready (Kafka)", res["cold_seconds"],
             f"{res['cold_memberships_per_s']:,} memberships/s, RSS +"
             f"{res['cold_rss_delta_bytes'] / 2**20:.0f} MiB"
             f"{_peak(res, 'cold_peak_rss_delta_bytes')}"],
            ["checkpoint write (stop)", res["checkpoint_save_seconds"],
             f"{res['checkpoint_bytes'] / 2**20:.1f} MiB"
             f"{_peak(res, 'checkpoint_save_peak_rss_delta_bytes')}"],
            ["warm: Replica start -> ready", res["warm_seconds"],
             f"started from {res['warm_started_from']}, RSS "
             f"+{res.get('warm_rss_delta_bytes', 0) / 2**20:.0f} MiB"
             f"{_peak(res, 'warm_peak_rss_delta_bytes')}"],
            ["seg-sidecar process start -> /readyz 200 (cold)",
             res["sidecar_process_ready_seconds"],
             f"RSS {res['sidecar_process_rss_bytes'] / 2**20:.0f} MiB"],
        ],
    )  # fmt: skip
    return lines


def _peak(res: dict[str, Any], key: str) -> str:
    """ ", peak +N MiB" (peak RSS over the RSS before the phase), when measured."""
    return f", peak +{res[key] / 2**20:.0f} MiB" if key in res else ""
