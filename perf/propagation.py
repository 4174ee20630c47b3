"""`propagation`: publish -> visible in a running `seg-sidecar` process, on the real Kafka
broker, over many small publishes.

Each publish adds one new user to one segment (segments taken in turn, so partitions vary)
with the `Publisher` API (one Kafka transaction per publish), by two publishers taking turns:

- `one-shot`: `Publisher(...)`, as `seg-publish` runs: every publish recovers the current state
  by replaying the log, opens a transactional producer, diffs and commits;
- `one-shot, state file`: `Publisher(..., state_dir=DIR)`, as `seg-publish
  --publisher-state-dir DIR` runs: each publish loads the state file written by the last one
  (verified against the log) while its transactional producer starts, then reads only the
  log's records after it (here, the other publishers');
- `session`: `Publisher(..., session=True)`, as a long-running job (the stream job) runs it:
  the producer and the recovered state are kept, and each publish first reads only the log's
  new records (here, the other publishers');
- `seg-publish process, state file`: the `seg-publish --publisher-state-dir DIR` command, a
  new process per publish (its interpreter start, imports and Kafka clients included), given a
  segment-set directory of the one changed segment written before the clock starts (the
  modules' bytecode written by a first run, as an installed package has it). With
  `seg-perf --before DIR` (an older checkout) the same command also runs that checkout's code
  (`PYTHONPATH=DIR`), a mode of its own: before and after in one run.

The modes take turns, so `one-shot` (before the state file) and `one-shot, state file` (after)
are measured in the same run on the same log.

A thread runs the publish; the main thread polls the sidecar over its Unix socket
(`SidecarClient.check`, every 0.5 ms) until the new member is visible. Measured per mode: from
the `publish()` call to visible, from `publish()` returning (the commit acknowledged) to
visible, and the publish itself.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyroaring import BitMap64

from compute.segment_set import write_segment_set
from publisher import Publisher
from sidecar.client import SidecarClient

from . import data
from .hist import Hist
from .report import image_lines, plot_latency, table, target
from .services import Context, log, tool

POLL_S = 0.0005
GIVE_UP_S = 30.0
#: what each mode's publish reads before its diff
RECOVERY = {
    "one-shot": "replay the log",
    "one-shot, state file": "load the state file, read the log's tail",
    "session": "read the new records",
    "seg-publish process, state file": "start a process, load the state file, read the tail",
    "seg-publish process, state file (before)": "the same with the --before checkout's code",
}
PROCESS = "seg-publish process, state file"
BEFORE = f"{PROCESS} (before)"


class Command:
    """`seg-publish --publisher-state-dir` in a new process per publish, on `transport`'s log;
    `pythonpath` runs another checkout's code."""

    def __init__(self, ctx: Context, transport: Any, name: str, pythonpath: str | None) -> None:
        self.input = ctx.workdir / f"{name}-input"
        self.env = {**os.environ, **({"PYTHONPATH": pythonpath} if pythonpath else {})}
        # as installed (pip compiles the modules): the warm-up run writes the bytecode the
        # measured ones read, where a PYTHONDONTWRITEBYTECODE shell would recompile every time
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)
        self.argv = [
            tool("seg-publish"),
            "--input", str(self.input),
            "--kafka", transport.bootstrap,
            "--topic-prefix", transport.prefix,
            "--writer-id", f"perf-{name}",
            "--partitions", "8",
            "--publisher-state-dir", str(ctx.workdir / f"{name}-state"),
            "--quiet",
        ]  # fmt: skip

    def prepare(self, desired: dict[str, BitMap64]) -> None:
        write_segment_set(self.input, desired, dt.datetime.now(dt.UTC))

    def publish(self) -> None:
        run = subprocess.run(self.argv, env=self.env, capture_output=True, text=True, check=False)
        if run.returncode != 0:
            raise RuntimeError(f"seg-publish exited {run.returncode}: {run.stderr.strip()}")


def run(ctx: Context) -> dict[str, Any]:
    per_mode = ctx.sizes.pick(7, 50)
    transport = ctx.transport("prop", "kafka")
    segments = data.make_segments(8, 80_000, seed=71, prefix="prop")
    publishers = {
        "one-shot": Publisher(transport, writer_id="perf-prop", partitions=8),
        "one-shot, state file": Publisher(
            transport,
            writer_id="perf-prop-state",
            partitions=8,
            state_dir=ctx.workdir / "prop-publisher-state",
        ),
        "session": Publisher(transport, writer_id="perf-prop-session", partitions=8, session=True),
    }
    commands = {PROCESS: Command(ctx, transport, "prop-process", None)}
    if ctx.before is not None:
        commands[BEFORE] = Command(ctx, transport, "prop-before", str(ctx.before))
    modes = [*publishers, *commands]
    for publisher in publishers.values():  # the first state file; the session's recovery
        publisher.publish(segments)
    for command in commands.values():
        command.prepare(segments)
        command.publish()
    sidecar = ctx.sidecar(transport, "prop")
    names = sorted(segments)
    e2e = {m: Hist(f"{m}: publish call -> visible") for m in modes}
    after_commit = {m: Hist(f"{m}: commit -> visible") for m in modes}
    pub = {m: Hist(f"{m}: publish()") for m in modes}
    early = 0
    invisible = 0
    switch = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)  # the poller must not wait 5 ms for the GIL
    n = per_mode * len(modes)
    log(f"propagation: {n} publishes of one new member each, polled every {POLL_S * 1e3} ms")
    try:
        with SidecarClient(sidecar.uds, timeout=5.0) as client:
            for i in range(n):
                mode = modes[i % len(modes)]
                seg = names[i % len(names)]
                user = 10**15 + i
                desired = {seg: segments[seg] | type(segments[seg])([user])}
                segments[seg] = desired[seg]
                call: Callable[[], object]
                if mode in commands:
                    commands[mode].prepare(desired)
                    call = commands[mode].publish
                else:
                    call = lambda p=publishers[mode], d=desired: p.publish(d)  # noqa: E731
                done: dict[str, Any] = {}

                def publish(call: Callable[[], object] = call, done: dict[str, Any] = done) -> None:
                    try:
                        done["result"] = call()
                    except BaseException as exc:  # reported by the main thread
                        done["error"] = exc
                    done["t"] = time.perf_counter_ns()

                t0 = time.perf_counter_ns()
                th = threading.Thread(target=publish, daemon=True)
                th.start()
                deadline = t0 + int(GIVE_UP_S * 1e9)
                while True:
                    if client.check(user, seg) is True:
                        t_vis = time.perf_counter_ns()
                        break
                    if "error" in done:
                        raise RuntimeError(f"{mode} publish failed: {done['error']!r}")
                    if time.perf_counter_ns() > deadline:
                        t_vis = None
                        break
                    time.sleep(POLL_S)
                th.join(120)
                if "error" in done:
                    raise RuntimeError(f"{mode} publish failed: {done['error']!r}")
                if "t" not in done:
                    raise RuntimeError("publish did not return in 120 s")
                pub[mode].record(done["t"] - t0)
                if t_vis is None:
                    invisible += 1
                    e2e[mode].record(int(GIVE_UP_S * 1e9))
                    continue
                e2e[mode].record(t_vis - t0)
                if t_vis < done["t"]:
                    early += 1
                after_commit[mode].record(max(1, t_vis - done["t"]))
    finally:
        sys.setswitchinterval(switch)
        publishers["session"].close()
    latency: dict[str, Any] = {}
    for m in modes:
        latency[e2e[m].name] = e2e[m].summary()
        latency[after_commit[m].name] = after_commit[m].summary()
        latency[pub[m].name] = pub[m].summary()
    c = {m: after_commit[m].summary() for m in modes}
    s = {m: e2e[m].summary() for m in modes}
    return {
        "publishes": n,
        "segments": len(names),
        "poll_interval_ms": POLL_S * 1e3,
        "sidecar": "seg-sidecar process on Kafka, SidecarClient over its Unix socket",
        "visible_before_publish_returned": early,
        "never_visible": invisible,
        "latency": latency,
        "targets": [
            target(
                f"propagation ({m} publisher): committed -> visible p99",
                round(c[m]["p99_us"] / 1e6, 3),
                "< 1 s",
                detail=f"p50 {c[m]['p50_us'] / 1e3:.0f} ms, from publish() returning (the Kafka "
                "transaction committed) to the sidecar answering true",
            )
            for m in modes
        ]
        + [
            target(
                f"propagation ({m} publisher): publish() call -> visible p99",
                round(s[m]["p99_us"] / 1e6, 3),
                "< 1 s",
                detail=f"p50 {s[m]['p50_us'] / 1e3:.0f} ms; includes the publisher's own work "
                f"({RECOVERY[m]}, diff, "
                f"transaction): publish() p50 {pub[m].p50_us / 1e3:.0f} ms, p99 "
                f"{pub[m].p99_us / 1e3:.0f} ms",
                peer=""
                if m == "session" or "session" not in s
                else f"session publisher: p99 {s['session']['p99_us'] / 1e6:.3f} s",
            )
            for m in modes
        ],
    }


def section(res: dict[str, Any], out: Path, report_dir: Path) -> list[str]:
    lines = [
        f"{res['publishes']} publishes of one new member each over {res['segments']} segments; "
        f"{res['sidecar']}, polled every {res['poll_interval_ms']} ms.",
        "",
    ]
    lat = res["latency"]
    lines += _in_ms(lat)
    lines += [
        "",
        f"Visible before `publish()` returned: {res['visible_before_publish_returned']} of "
        f"{res['publishes']} (the commit reaches the replica before its acknowledgement reaches "
        f"the publisher). Never visible within {GIVE_UP_S:.0f} s: {res['never_visible']}.",
    ]
    png = plot_latency(
        {k: v for k, v in lat.items() if "-> visible" in k},
        "publish -> visible",
        out / "propagation_latency.png",
        unit="ms",
    )
    lines += image_lines(png, "propagation", report_dir)
    return lines


def _in_ms(lat: dict[str, Any]) -> list[str]:
    rows = [
        [n, s["count"], s["p50_us"] / 1e3, s["p99_us"] / 1e3, s["p999_us"] / 1e3, s["max_us"] / 1e3]
        for n, s in lat.items()
        if s.get("count")
    ]
    return table(["interval", "publishes", "p50 ms", "p99 ms", "p99.9 ms", "max ms"], rows)
