"""`aerospike`: the publisher's Aerospike writes against the client's own `batch_operate`.

DESIGN.md "Performance targets": Aerospike writes at least as fast as the client's own
`batch_operate` of the same records. Both write the same data set (random segments whose
members overlap, so users carry several segments: 1M memberships over ~500k records in the
full run) to an emptied set, in interleaved rounds (sink, client, client, sink, ...):

- sink: `AerospikeSink.apply` of the publish's changes, everything included (grouping the users
  by their operations with bitmaps, building keys, the batches on its threads, checking rows);
- client: the same groups (computed beforehand, outside the timing), each written in chunks of
  5,000 with one thread's `batch_operate` (keys built inside the timing, with the same policies:
  key stored, never expire).

Where: the wire-level test server (tests/aerospike_server/) in its own process, and a real
Aerospike when `SEG_PERF_AEROSPIKE=HOST:PORT` points at one (namespace `SEG_PERF_AEROSPIKE_NS`,
default `test`; set `perf_users`, truncated before every round). The test server is a Python
double, so its figures say little about a real server's speed; the ratio is what to read.

The test server is one Python process (its batches run on executor threads under one GIL), so
it bounds both ways: its CPU time per run is recorded beside the wall time (`server_busy`,
server CPU / wall: near 1 means the server, not the writer, set the pace), and the ratio is
reported per round with its spread (lowest, highest) as well as the median. When both ways
keep the server busy the ratio is the double's cost of each way's requests (the sink's
concurrent batches contend for the double's GIL), not the writer's speed.
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pyroaring import BitMap64

from publisher.aerospike_sink import DEFAULT_BATCH_SIZE, AerospikeSink, group_users
from publisher.plan import Change
from sidecar.aerospike_layout import POLICY_KEY_SEND, TTL_NEVER_EXPIRE, AerospikeTarget, user_key

from .report import table, target
from .services import Context, log

SET = "perf_users"
REPO = Path(__file__).resolve().parent.parent
_SERVER = """
import sys, time
from tests.aerospike_server import ThreadedAerospikeServer
server = ThreadedAerospikeServer().start()
print(server.port, flush=True)
sys.stdin.read()
server.stop()
"""


def make_changes(n_segments: int, per_segment: int, universe: int, seed: int) -> list[Change]:
    rng = random.Random(seed)
    changes = []
    for i in range(n_segments):
        members = BitMap64(rng.sample(range(universe), per_segment))
        changes.append(Change(f"perf_{i:02d}", 0, 1, members, BitMap64(), len(members)))
    return changes


class TestServerProcess:
    """The wire-level test server in a child process (its Python must not share our GIL)."""

    __test__ = False  # a benchmark helper, not a pytest class (tests import it)

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def cpu_seconds(self) -> float:
        """The server process's CPU time so far (user + system, all its threads)."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def truncate(sink: AerospikeSink) -> None:
    t = sink.target
    sink.client.info_all(
        f"truncate:namespace={t.namespace};set={t.set_name}", policy={"timeout": 120_000}
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # a real server truncates in the background
        if not sink.client.query(t.namespace, t.set_name).results({"max_records": 1}):
            return
        time.sleep(0.2)


def client_batch_operate(sink: AerospikeSink, groups: list[tuple[Any, list[int]]]) -> int:
    """The plain client: one thread, chunks of 5,000, the same operations and policies."""
    t = sink.target
    written = 0
    for ops, users in groups:
        for i in range(0, len(users), DEFAULT_BATCH_SIZE):
            keys = [
                (t.namespace, t.set_name, user_key(u)) for u in users[i : i + DEFAULT_BATCH_SIZE]
            ]
            result = sink.client.batch_operate(
                keys, ops, None, {"key": POLICY_KEY_SEND}, TTL_NEVER_EXPIRE
            )
            written += sum(1 for r in result.batch_records if r.result == 0)
    return written


def measure(
    sink: AerospikeSink,
    changes: list[Change],
    rounds: int,
    server: TestServerProcess | None = None,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    classes = group_users(changes)
    group_s = time.perf_counter() - t0
    groups = [(sink.operations(sig)[0], [int(u) for u in members]) for sig, members in classes]
    records = sum(len(m) for _, m in groups)
    memberships = sum(len(c.add) for c in changes)
    runs: dict[str, list[float]] = {"sink": [], "client": []}
    busy: dict[str, list[float]] = {"sink": [], "client": []}
    for r in range(rounds):
        order = ["sink", "client"] if r % 2 == 0 else ["client", "sink"]
        for name in order:
            truncate(sink)
            cpu0 = server.cpu_seconds() if server else 0.0
            t0 = time.perf_counter()
            if name == "sink":
                written = sink.apply(changes, lambda _d, _t: None)
            else:
                written = client_batch_operate(sink, groups)
            seconds = time.perf_counter() - t0
            assert written == records, (name, written, records)
            runs[name].append(seconds)
            note = ""
            if server:
                busy[name].append((server.cpu_seconds() - cpu0) / seconds)
                note = f", server busy {busy[name][-1]:.2f}"
            log(f"aerospike: round {r + 1} {name} {memberships / seconds:,.0f} memberships/s{note}")
    ratios = [c / s for s, c in zip(runs["sink"], runs["client"], strict=True)]
    return {
        "memberships": memberships,
        "records": records,
        "groups": len(groups),
        "group_seconds": round(group_s, 3),
        "sink_seconds": [round(s, 3) for s in runs["sink"]],
        "client_seconds": [round(s, 3) for s in runs["client"]],
        "sink_memberships_per_s": round(memberships / statistics.median(runs["sink"])),
        "client_memberships_per_s": round(memberships / statistics.median(runs["client"])),
        "ratio_per_round": [round(x, 3) for x in ratios],
        "ratio_median": round(statistics.median(ratios), 3),
        "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
        # server CPU / wall per run (the test server only): near 1, the server set the pace
        "server_busy": {k: [round(x, 2) for x in v] for k, v in busy.items()} if server else None,
    }


def run(ctx: Context) -> dict[str, Any]:
    n_seg, per_seg, universe = ctx.sizes.pick((20, 2_000, 26_000), (20, 50_000, 650_000))
    # 3 rounds (6 writes of the whole set, about a minute each at full size on this machine):
    # the test server's speed bounds both ways alike (perf/README.md, "Run time")
    rounds = 3
    changes = make_changes(n_seg, per_seg, universe, seed=111)
    results: dict[str, Any] = {"segments": n_seg, "per_segment": per_seg, "rounds": rounds}
    where: list[tuple[str, AerospikeTarget, TestServerProcess | None]] = []
    server = TestServerProcess()
    where.append(
        ("test server", AerospikeTarget([("127.0.0.1", server.port)], set_name=SET), server)
    )
    real = os.environ.get("SEG_PERF_AEROSPIKE")
    if real:
        ns = os.environ.get("SEG_PERF_AEROSPIKE_NS", "test")
        where.append(("real server", AerospikeTarget.at(real, namespace=ns, set_name=SET), None))
    try:
        for name, tgt, proc in where:
            sink = AerospikeSink.connect(tgt)
            try:
                log(f"aerospike: {name} at {tgt.describe()}")
                results[name] = measure(sink, changes, rounds, proc)
            finally:
                truncate(sink)
                sink.close()
    finally:
        server.stop()
    main = results.get("real server") or results["test server"]
    results["targets"] = [
        target(
            "Aerospike writes vs the client's own batch_operate"
            + (" (real server)" if "real server" in results else " (test server)"),
            main["ratio_median"],
            ">= 1 x",
            detail="median per-round ratio of memberships/s, sink / plain client "
            f"(rounds {main['ratio_range'][0]}-{main['ratio_range'][1]}x"
            + (
                f"; test server busy {_busy(main)} of the wall time: it bounds both)"
                if main.get("server_busy")
                else ")"
            ),
            peer=f"the client's own batch_operate: {main['client_memberships_per_s']:,} "
            f"memberships/s (sink {main['sink_memberships_per_s']:,})",
            applies="real server" in results or not ctx.quick,
        )
    ]
    return results


def _busy(r: dict[str, Any]) -> str:
    """The test server's CPU / wall over every run, as `lowest-highest`."""
    every = [x for v in r["server_busy"].values() for x in v]
    return f"{min(every):.2f}-{max(every):.2f}"


def section(res: dict[str, Any], out: Path, report_dir: Path) -> list[str]:
    lines = [
        f"{res['segments']} random segments of {res['per_segment']:,} members each (overlapping), "
        f"{res['rounds']} interleaved rounds, the set emptied before each run.",
        "",
    ]
    rows = []
    for name in ("test server", "real server"):
        r = res.get(name)
        if not r:
            continue
        rows.append([name, r["memberships"], r["records"], r["groups"], r["group_seconds"],
                     r["sink_memberships_per_s"], r["client_memberships_per_s"],
                     f"{r['ratio_median']:.2f}",
                     "{}-{}".format(*r["ratio_range"]) if r.get("ratio_range") else "",
                     _busy(r) if r.get("server_busy") else ""])  # fmt: skip
    lines += table(
        ["server", "memberships", "records", "groups", "grouping s", "sink memberships/s",
         "batch_operate memberships/s", "ratio (median)", "ratio (rounds)", "server busy"],
        rows,
    )  # fmt: skip
    if res.get("test server", {}).get("server_busy"):
        lines += [
            "",
            "Server busy: the test server's CPU time over the wall time of each run (both "
            "ways); near 1, the one-process server set the pace, and the ratio says what each "
            "way's requests cost that double, not how fast the writer is.",
        ]
    if "real server" not in res:
        lines += ["", "No real server in this run (SEG_PERF_AEROSPIKE=HOST:PORT adds one)."]
    return lines
