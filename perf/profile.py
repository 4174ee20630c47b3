"""`python -m perf.profile [check|batch|batch_packed|http|fanout] [--seconds S] [--out DIR]`:
where a `seg-sidecar` process spends its time under a closed-loop load (`fanout`: fanout's
open-loop client processes at `--fanout-rate` checks/s, the socket peer), sampled with py-spy.

Starts a sidecar on a log directory holding the latency data set (the --quick size), drives
it from this process with the project's client (`check`: single checks; `batch`: 1,000
checks per request; `batch_packed`: the same 1,000 [user, segment] pairs packed, a segment
per user, as perf.ab and `seg-perf batch` send them; `http`: GET /v1/check), and records the
sidecar with `py-spy record --native --format raw` for the duration. Writes the collapsed
stacks and a summary of the hottest frames (self and inclusive) to DIR (default
perf/results/profile), and prints the summary. py-spy comes with the `perf` extra.

`pieces` instead times, in-process, each step of a check and a batch request in the server
(no sockets) beside the echo peer's, and writes DIR/pieces.txt.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import data
from .services import SidecarProcess, log, tool


def drive(
    kind: str,
    sidecar: SidecarProcess,
    segments: dict,
    stop: threading.Event,
    rate: int = 0,
    seconds: float = 0.0,
) -> int:
    from sidecar.client import SidecarClient

    if kind == "fanout":  # one open-loop step of fanout's socket peer, as long as the recording
        from types import SimpleNamespace

        from .fanout import PROCS, steps_of

        res = steps_of(SimpleNamespace(segments=segments), "socket", str(sidecar.uds), PROCS,
                       [rate], seconds)  # fmt: skip
        FANOUT_STEPS.extend(res["steps"])
        return sum(s["requests"] for s in res["steps"])

    qs = data.queries(segments, 20_000, seed=99)
    n = 0
    if kind == "http":
        from .http import Api

        api = Api(sidecar.port)
        while not stop.is_set():
            for u, s in qs[:1000]:
                api.get(u, s)
            n += 1000
        api.close()
        return n
    with SidecarClient(sidecar.uds, timeout=5.0) as client:
        if kind in ("batch", "batch_packed"):
            batches = [[list(q) for q in qs[i : i + 1000]] for i in range(0, len(qs), 1000)]
            columns = [([u for u, _ in b], [s for _, s in b]) for b in batches]
            while not stop.is_set():
                for b, c in zip(batches, columns, strict=True):
                    client.batch(b) if kind == "batch" else client.batch_packed(*c)
                n += len(qs)
        else:
            while not stop.is_set():
                for u, s in qs[:1000]:
                    client.check(u, s)
                n += 1000
    return n


#: the fanout load's step results (latency, achieved rate), for the summary
FANOUT_STEPS: list[dict] = []

#: Frames of a thread that waits (event loop idle, sleeping, or blocked on the GIL).
IDLE = ("epoll_pwait", "epoll_wait", "clock_nanosleep", "pthread_cond_timedwait", "select (")


def summarize(raw: Path, top: int = 30) -> str:
    """Self and inclusive sample shares per frame from py-spy's collapsed stacks, idle
    samples (a thread waiting in epoll, sleeping, or waiting for the GIL) left out."""
    self_c: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = idle = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        c = int(count)
        frames = stack.split(";")
        if any(f.startswith(i) for f in frames[-3:] for i in IDLE):
            idle += c
            continue
        total += c
        self_c[frames[-1]] += c
        for f in set(frames):
            incl[f] += c
    total = max(total, 1)
    out = [f"{total} busy samples ({idle} idle left out)", "", "self:"]
    out += [f"  {100 * c / total:5.1f}%  {f}" for f, c in self_c.most_common(top)]
    out += ["", "inclusive:"]
    out += [f"  {100 * c / total:5.1f}%  {f}" for f, c in incl.most_common(top)]
    return "\n".join(out)


def pieces() -> str:
    """In-process cost (timeit, best of 7) of each step a `check` and a `batch` request take
    in the sidecar's server, beside what the echo peer does: no sockets, no wake-ups."""
    import struct
    import timeit

    import msgpack

    from publisher import Publisher
    from sidecar.replica import Replica
    from sidecar.server.metrics import Metrics
    from sidecar.server.queries import Queries
    from sidecar.transport.logdir import LogDirTransport

    work = Path(tempfile.mkdtemp(prefix="seg-pieces-"))
    try:
        (work / "log").mkdir()
        segs = data.make_segments(20, 1_000_000, seed=7)
        t = LogDirTransport(work / "log")
        Publisher(t, writer_id="perf-pieces", partitions=8).publish(segs)
        rep = Replica(t).start()
        rep.wait_ready(60)
        m = Metrics(rep, process=False)
        svc = Queries(rep, None, metrics=m)
        pack = msgpack.Packer(use_bin_type=True).pack
        u, s = data.queries(segs, 1, seed=1)[0]
        stats = m.op("uds", "check")
        key = next(iter(stats.counts))
        pairs = [list(q) for q in data.queries(segs, 1000, seed=2)]
        g = {
            "msgpack": msgpack, "svc": svc, "rep": rep, "u": u, "s": s, "stats": stats,
            "key": key, "pack": pack, "hp": struct.Struct(">I").pack, "time": time,
            "body": pack([12345, "check", u, s]), "bm": rep.engine.segments[s].bitmap,
            "bbody": msgpack.packb([1, "batch", pairs]),
            "dec": msgpack.unpackb(msgpack.packb(pairs), use_list=False),
            "bms": {n: st.bitmap for n, st in rep.engine.segments.items()},
        }  # fmt: skip
        g["res"] = svc.batch(g["dec"])[0]

        def ns(stmt: str, n: int) -> float:
            return min(timeit.repeat(stmt, globals=g, number=n, repeat=7)) / n * 1e9

        rows = [
            ("check: unpackb(frame, use_list=False, ...) (sidecar)",
             ns("msgpack.unpackb(body, raw=False, use_list=False, strict_map_key=False)", 10**5)),
            ("check: unpackb(frame) (echo)", ns("msgpack.unpackb(body)", 10**5)),
            ("check: Queries.check(user, segment)", ns("svc.check(u, s)", 10**5)),
            ("check:   of which `user in bitmap`", ns("u in bm", 10**5)),
            ("check: metrics OpStats.record", ns("stats.record(key, 1e-5)", 10**5)),
            ("check: 2 x time.perf_counter()",
             ns("time.perf_counter(); time.perf_counter()", 10**5)),
            ("check: pack [id, 0, true] + header",
             ns("b = pack([12345, 0, True]); hp(len(b)) + b", 10**5)),
            ("embedded: Replica.contains(user, segment)", ns("rep.contains(u, s)", 10**5)),
            ("batch: unpackb of 1,000 pairs",
             ns("msgpack.unpackb(bbody, raw=False, use_list=False, strict_map_key=False)", 300)),
            ("batch: Queries.batch(1,000 pairs)", ns("svc.batch(dec)", 300)),
            ("batch: floor [u in bms[s] for u, s in pairs]",
             ns("[u in bms[s] for u, s in dec]", 300)),
            ("batch: pack 1,000 answers", ns("msgpack.packb([1, 0, res])", 300)),
        ]  # fmt: skip
        rep.stop(save=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {v / 1000:10.3f} us" for name, v in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.profile", description=__doc__)
    p.add_argument(
        "kind",
        choices=["check", "batch", "batch_packed", "http", "fanout", "pieces"],
        nargs="?",
        default="check",
    )
    p.add_argument("--fanout-rate", type=int, default=15_000, help="fanout: checks/s in all")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "profile")
    p.add_argument(
        "--rate", type=int, default=1000, help="py-spy samples per second (0: the load only)"
    )
    args = p.parse_args(argv)
    if args.kind == "pieces":
        text = pieces()
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "pieces.txt").write_text(text + "\n")
        print(text)
        return 0
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        print("py-spy not found: pip install py-spy", file=sys.stderr)
        return 2
    from publisher import Publisher
    from sidecar.transport.logdir import LogDirTransport

    work = Path(tempfile.mkdtemp(prefix="seg-profile-"))
    sidecar = None
    try:
        segments = data.make_segments(20, 1_000_000, seed=7)
        t = LogDirTransport(work / "log")
        (work / "log").mkdir()
        Publisher(t, writer_id="perf-profile", partitions=8).publish(segments)
        sidecar = SidecarProcess(["--log-dir", str(work / "log")], work, "profiled").start()
        log(f"sidecar pid {sidecar.pid} ({tool('seg-sidecar')}); load: {args.kind}")
        stop = threading.Event()
        done: list[int] = []
        load_s = args.seconds + 4.0  # fanout: the step outlasts the recording
        th = threading.Thread(
            target=lambda: done.append(
                drive(args.kind, sidecar, segments, stop, args.fanout_rate, load_s)
            )
        )
        th.start()
        time.sleep(4.0 if args.kind == "fanout" else 1.0)  # client processes start
        args.out.mkdir(parents=True, exist_ok=True)
        raw = args.out / f"{args.kind}.collapsed.txt"
        # open loop: py-spy's pauses of the process (--native needs them) would be the latency
        # measured, so the fanout load is sampled without pausing, Python frames only
        how = ["--nonblocking"] if args.kind == "fanout" else ["--native"]
        cmd = [pyspy, "record", "--pid", str(sidecar.pid), "--duration", str(int(args.seconds)),
               "--rate", str(args.rate), *how, "--format", "raw",
               "--output", str(raw)]  # fmt: skip
        t0 = time.monotonic()
        if args.rate == 0:  # the load only, unsampled (fanout: its latency without py-spy)
            time.sleep(args.seconds)
            raw.write_text("")
        else:
            rec = subprocess.run(cmd, check=False, capture_output=True, text=True)
            if rec.returncode != 0:
                raise RuntimeError(
                    f"py-spy failed: {rec.stderr[-500:]}; sidecar: {sidecar.log_tail()}"
                )
        took = time.monotonic() - t0
        stop.set()
        th.join()
        summary = summarize(raw)
        rate = (done[0] if done else 0) / max(took + 1.0, 1e-9)
        from .fanout import PROCS

        head = f"about {rate:,.0f} checks/s while recording"
        for st in FANOUT_STEPS:
            la = st["latency"]
            head = (
                f"{st['offered_rps']:,} checks/s offered by {PROCS} open-loop "
                f"processes, {st['achieved_rps']:,} achieved, p50 {la['p50_us']:.0f} us, "
                f"p99 {la['p99_us']:.0f} us, send lag p99 {st['send_lag']['p99_us']:.0f} us"
            )
        text = f"load {args.kind}: {head}\n\n{summary}\n"
        (args.out / f"{args.kind}.summary.txt").write_text(text)
        print(text)
    finally:
        if sidecar is not None:
            sidecar.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
