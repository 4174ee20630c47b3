"""`python -m perf.ab --before DIR [--op check|batch_packed] [--rounds N] [--out DIR]`: the
single check (or a `batch_packed` of 1,000 [user, segment] pairs, a segment per user, as
`seg-perf batch` sends it) of two versions of the sidecar in one interleaved run, for
before/after comparisons on a noisy machine.

DIR is a checkout of the older commit (`git worktree add /tmp/before <commit>`). Both sidecars
are `seg-sidecar` processes of this environment replaying the same Kafka topics (the latency
data set); the `before` one runs with `PYTHONPATH=DIR`, so it imports the older code. The
echo peer is interleaved with them as in `check`. Reported: p50 / p99 per target, the
per-round median of after/before p50, each server's main-thread CPU per request, and, when
Linux `perf` is installed, `perf record` samples per library of each server's main thread
over 100,000 checks (requests, for batch_packed). Writes OUT/ab_OP.json (default
perf/results/ab).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sidecar.client import SidecarClient
from sidecar.packed import pack_batch

from . import data
from .batch import BATCH
from .check import interleave
from .services import Context, log

PER_ROUND = 5_000
PROFILE_CHECKS = 100_000
#: requests per round and distinct requests of the batch_packed op
BATCH_PER_ROUND = 200
BATCHES = 400
OPS = ("check", "batch_packed")


def sidecar_with_path(ctx: Context, transport: Any, name: str, pythonpath: str) -> Any:
    """A seg-sidecar process importing the code at `pythonpath`."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = pythonpath
    try:
        return ctx.sidecar(transport, name)
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old


def profile(pid: int, call: Any, qs: list[tuple[Any, str]], path: Path) -> str:
    """perf-record the main thread of `pid` while `call` runs; samples per library."""
    rec = subprocess.Popen(
        ["perf", "record", "-F", "4999", "-t", str(pid), "-o", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)
    for u, s in qs[:PROFILE_CHECKS]:
        call(u, s)
    rec.send_signal(2)
    rec.wait(60)
    report = subprocess.run(
        ["perf", "report", "-i", str(path), "-n", "--sort", "dso", "--stdio"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return "\n".join(line for line in report.splitlines() if "%" in line and "#" not in line)


def _batch_targets(
    clients: dict[str, SidecarClient], segments: dict[str, Any]
) -> tuple[dict[str, Any], list[tuple[Any, str]], list[list[bool]]]:
    """batch_packed of BATCH pairs (a segment per user): the targets, the "queries" (a batch's
    number each) and the truth of the first round's batches."""
    flat = data.queries(segments, BATCH * BATCHES, seed=21)
    columns = [
        ([u for u, _ in flat[i : i + BATCH]], [s for _, s in flat[i : i + BATCH]])
        for i in range(0, len(flat), BATCH)
    ]
    echo = clients["echo"]
    targets: dict[str, Any] = {
        "echo": lambda i, _s: echo.call("batch_packed", *pack_batch(*columns[i])),
    }
    for n in ("before", "after"):
        targets[n] = lambda i, _s, c=clients[n]: c.batch_packed(*columns[i])
    truth = [[u in segments[s] for u, s in zip(*columns[i], strict=True)] for i in range(BATCHES)]
    return targets, [(i, "batch") for i in range(BATCHES)], truth


def run(before: Path, rounds: int, out: Path, op: str = "check") -> dict[str, Any]:
    ctx = Context(quick=False, out=out, source="kafka")
    try:
        segments = data.make_segments(100, 10_000_000, seed=7)
        transport = ctx.transport("ab")
        from publisher import Publisher

        Publisher(transport, writer_id="perf-ab", partitions=8).publish(segments)
        servers = {
            "after": ctx.sidecar(transport, "after"),
            "before": sidecar_with_path(ctx, transport, "before", str(before)),
        }
        echo = ctx.echo()
        clients = {n: SidecarClient(p.uds).connect() for n, p in servers.items()}
        clients["echo"] = SidecarClient(echo.path).connect()
        if op == "check":
            qs: list[tuple[Any, str]] = list(data.queries(segments, PROFILE_CHECKS * 2, seed=3))
            targets: dict[str, Any] = {n: clients[n].check for n in ("echo", "before", "after")}
            per_round, warmup = PER_ROUND, 200
            truth: list[Any] = [u in segments[s] for u, s in qs[:PER_ROUND]]
        else:
            targets, qs, batches = _batch_targets(clients, segments)
            per_round, warmup = BATCH_PER_ROUND, 20
            truth = batches[:per_round]
        pids = {"echo": echo.pid, **{n: p.pid for n, p in servers.items()}}
        log(f"ab {op}: {rounds} rounds x {per_round} requests x {len(targets)}")
        hists, round_p50, first, cpu = interleave(targets, qs, rounds, per_round, warmup, pids)
        res: dict[str, Any] = {
            "before": str(before),
            "op": op,
            "rounds": rounds,
            "requests_per_round": per_round,
            "checks_per_request": 1 if op == "check" else BATCH,
            "latency": {n: h.summary(cdf=False) for n, h in hists.items()},
            "server_cpu_us_per_request": cpu,
            "wrong_answers": {
                n: sum(a != e for a, e in zip(first[n], truth, strict=True)) for n in servers
            },
            "round_p50_us": round_p50,
            "per_round_median": {
                "after / before": statistics.median(
                    a / b for a, b in zip(round_p50["after"], round_p50["before"], strict=True)
                ),
                "before / echo": statistics.median(
                    a / b for a, b in zip(round_p50["before"], round_p50["echo"], strict=True)
                ),
                "after / echo": statistics.median(
                    a / b for a, b in zip(round_p50["after"], round_p50["echo"], strict=True)
                ),
            },
        }
        if shutil.which("perf"):
            n_profile = PROFILE_CHECKS if op == "check" else PROFILE_CHECKS // BATCH
            res["perf_record_by_library"] = {
                n: profile(pid, targets[n], (qs * 2)[:n_profile], ctx.workdir / f"ab-{n}.data")  # type: ignore[arg-type]
                for n, pid in pids.items()
            }
        for c in clients.values():
            c.close()
        return res
    finally:
        ctx.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.ab", description=__doc__)
    p.add_argument("--before", type=Path, required=True, help="checkout of the older commit")
    p.add_argument("--op", choices=OPS, default="check", help="the request compared")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ab")
    args = p.parse_args(argv)
    if not (args.before / "sidecar" / "__init__.py").is_file():
        p.error(f"{args.before} is not a checkout of this project (no sidecar/__init__.py)")
    res = run(args.before.resolve(), args.rounds, args.out, args.op)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"ab_{args.op}.json").write_text(json.dumps(res, indent=1) + "\n")
    for n, s in res["latency"].items():
        cpu = res["server_cpu_us_per_request"].get(n)
        print(f"{n:7s} p50 {s['p50_us']:.1f} us  p99 {s['p99_us']:.1f} us  server CPU {cpu} us")
    for k, v in res["per_round_median"].items():
        print(f"{k}: {v:.3f} (per-round median of p50)")
    for n, text in res.get("perf_record_by_library", {}).items():
        print(f"-- {n}: perf samples per library\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
