"""`seg-perf <scenario>... [--quick] [--out DIR]`: the benchmark harness.

Scenarios: check, batch, http, embedded, shared, memory, fanout, propagation, publish, aerospike,
bootstrap, eval, count, spark_batch, and `all` (every one, in that order); `report` only
rebuilds the report from the JSON files.
Each scenario writes `<out>/<scenario>.json`; then the report (`perf/REPORT.md` for the
default output directory, else `<out>/REPORT.md`) and its plots are rebuilt from every JSON
file in the output directory.

The harness starts what it needs (the real Kafka broker via deploy/local/kafka in a
temporary data directory, `seg-sidecar` subprocesses, redis-server, the echo peer) and stops
all of it at the end, also on errors, Ctrl-C and SIGTERM, and before spark_batch, which uses
none of it (it would share the cores with Spark). Exit 0 when every scenario ran
(whether or not its targets were met), 1 when one failed, 2 on bad usage. Every option can
also come from the environment as SEG_<OPTION> (sidecar/cliutil.py has the rules).
"""

from __future__ import annotations

import importlib
import os
import shlex
import signal
import sys
import time
import traceback
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

from sidecar.cliutil import Parser, directory, positive_float

from . import report
from .services import Context, log

PERF_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = PERF_DIR / "results"
DEFAULT_REPORT = PERF_DIR / "REPORT.md"
SCENARIOS = report.SCENARIOS
#: a scenario still running after this long is stopped and recorded as failed, and the run goes
#: on: the longest takes about 6 minutes at full size on this machine (perf/README.md)
SCENARIO_TIMEOUT_S = {"quick": 600.0, "full": 1800.0}
#: scenarios that use none of the run's services: what the scenarios before them left running
#: (the Kafka broker with their logs, the sidecars, Redis with its sets) is stopped first, so
#: it does not share the two cores with them (`seg-perf all` ran Spark's start-up 3.9x and its
#: batch 1.6x slower than `seg-perf spark_batch` alone: perf/ANALYSIS.md, sixth session)
WITHOUT_SERVICES = frozenset({"spark_batch"})


class ScenarioTimeout(Exception):
    """A scenario ran past --scenario-timeout (raised in it by SIGALRM)."""


def module(name: str) -> ModuleType:
    return importlib.import_module(f"perf.{name}")


def build_parser() -> Parser:
    p = Parser(
        prog="seg-perf",
        description="Benchmarks of DESIGN.md's performance targets against peers measured in "
        "the same run.",
    )
    p.add_argument(
        "scenario",
        nargs="+",
        choices=[*SCENARIOS, "all", "report", "reliability"],
        help="what to run, one or more in one run ('report' only rebuilds the report from the "
        "JSON files; 'reliability' runs the long fault suite, docs/RELIABILITY.md)",
    )
    p.add_argument(
        "--quick", action="store_true", help="small sizes (all of them in under 5 minutes)"
    )
    p.add_argument(
        "--out",
        type=lambda text: Path(directory(text)),
        default=DEFAULT_OUT,
        metavar="DIR",
        help=f"results directory (default {os.path.relpath(DEFAULT_OUT)})",
    )
    p.add_argument(
        "--report",
        type=Path,
        metavar="FILE",
        help="report path (default perf/REPORT.md for the default --out, else OUT/REPORT.md)",
    )
    p.add_argument(
        "--source",
        choices=["kafka", "logdir"],
        default="kafka",
        help="what the latency scenarios' sidecar replays (default kafka, as in production)",
    )
    p.add_argument(
        "--kafka",
        metavar="HOST:PORT",
        help="use this broker for the segment log instead of starting one",
    )
    p.add_argument(
        "--before",
        type=Path,
        metavar="DIR",
        help="an older checkout (git worktree add DIR COMMIT): propagation also runs its "
        "seg-publish, for a before/after in one run",
    )
    p.add_argument(
        "--scenario-timeout",
        type=positive_float,
        metavar="SECONDS",
        help="stop a scenario still running after this long, record it as failed and go on "
        f"(default {SCENARIO_TIMEOUT_S['full']:.0f}, {SCENARIO_TIMEOUT_S['quick']:.0f} with "
        "--quick)",
    )
    return p


def _sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(143)


def _alarm(_signum: int, _frame: FrameType | None) -> None:
    raise ScenarioTimeout("still running at --scenario-timeout")


def run_one(
    name: str, ctx: Context, command: str, timeout: float | None = None, run: str = ""
) -> tuple[dict[str, Any], bool]:
    """Run one scenario; any Exception it raises (a ScenarioTimeout after `timeout` seconds
    too) is recorded in its doc, never raised: the run goes on with the next. `run`: when
    the run (one `seg-perf` command) started, the same in every scenario's doc."""
    doc: dict[str, Any] = {
        "scenario": name,
        "quick": ctx.quick,
        "command": command,
        "run": run,
        "started_at": report.stamp(),
        "machine": report.machine(),
        "load_before": report.loadavg(),
    }
    started = time.monotonic()
    ok = True
    log(f"== {name} ({'quick' if ctx.quick else 'full'})")
    previous = signal.signal(signal.SIGALRM, _alarm) if timeout else None
    try:
        try:
            if timeout:
                signal.setitimer(signal.ITIMER_REAL, timeout)
            results = module(name).run(ctx)
        finally:
            if timeout:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)
        doc["targets"] = results.pop("targets", [])
        doc["results"] = results
        doc["error"] = None
        if results.get("failed_peers"):  # a peer failed, the scenario's other results stand
            ok = False
            doc["error"] = "peers failed: " + "; ".join(
                f"{n} ({why})" for n, why in results["failed_peers"].items()
            )
            log(f"{name}: {doc['error']}")
    except Exception as exc:
        ok = False
        doc["error"] = f"{type(exc).__name__}: {exc}"
        doc["traceback"] = traceback.format_exc()
        doc["results"] = {}
        doc["targets"] = []
        log(f"{name} FAILED: {doc['error']}\n{doc['traceback']}")
    doc["seconds"] = round(time.monotonic() - started, 1)
    doc["load_after"] = report.loadavg()
    doc["services"] = dict(ctx.services)
    for t in doc["targets"]:
        verdict = "n/a" if t["met"] is None else ("met" if t["met"] else "NOT MET")
        log(f"   {t['name']}: {t['measured']} {t['unit']} (goal {t['op']} {t['goal']}) {verdict}")
    log(f"== {name} done in {doc['seconds']} s")
    return doc, ok


def _prefer_source_tree() -> None:
    """Run this checkout's packages, in this process and in the harness's children: an
    editable install made before a package had its `__init__.py` resolves that top-level name
    as a namespace package (`from publisher import Publisher` then fails)."""
    repo = str(PERF_DIR.parent)
    if not (PERF_DIR.parent / "pyproject.toml").exists():
        return
    if repo not in sys.path:
        sys.path.insert(0, repo)
    for name in ("publisher", "sidecar"):
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, "__file__", None) is None:
            del sys.modules[name]  # a namespace stand-in: import the real package again
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if repo not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([repo, *parts])


def main(argv: list[str] | None = None) -> int:
    _prefer_source_tree()
    from sidecar.shm.build import build_if_stale

    if build_if_stale():  # the sidecars it starts import this build
        print("seg-perf: built the C extension in place (it was older than its source)")
    parser = build_parser()
    args = parser.parse_args(argv)
    out: Path = args.out.resolve()
    report_path: Path = (
        args.report.resolve()
        if args.report
        else (DEFAULT_REPORT if out == DEFAULT_OUT.resolve() else out / "REPORT.md")
    )
    command = "seg-perf " + shlex.join(sys.argv[1:] if argv is None else argv)
    chosen: list[str] = args.scenario
    if any(c in chosen for c in ("all", "report", "reliability")) and len(chosen) > 1:
        parser.error("'all', 'report' and 'reliability' go alone")
    if chosen == ["reliability"]:
        from . import reliability

        return reliability.run(out)
    if chosen == ["report"]:
        sections = {n: module(n).section for n in SCENARIOS}
        path = report.write_report(out, report_path, sections)
        log(f"report {path} rebuilt from {out}")
        return 0
    if args.before is not None and not (args.before / "publisher" / "cli.py").is_file():
        parser.error(f"--before {args.before}: not a checkout of this project")
    names = list(SCENARIOS) if chosen == ["all"] else [n for n in SCENARIOS if n in chosen]
    signal.signal(signal.SIGTERM, _sigterm)
    ctx = Context(
        quick=args.quick, out=out, source=args.source, kafka_addr=args.kafka, before=args.before
    )
    timeout = args.scenario_timeout or SCENARIO_TIMEOUT_S["quick" if args.quick else "full"]
    failed: list[str] = []
    started = time.monotonic()
    run = report.stamp()
    try:
        for name in names:
            if name in WITHOUT_SERVICES:
                ctx.stop_services()
            doc, ok = run_one(name, ctx, command, timeout, run)
            report.write_json(out, name, doc)
            if not ok:
                failed.append(name)
    except KeyboardInterrupt:
        log("interrupted")
        failed.append("interrupted")
    finally:
        ctx.close()
    sections = {n: module(n).section for n in SCENARIOS}
    path = report.write_report(out, report_path, sections)
    log(f"results in {out}, report {path}; {time.monotonic() - started:.0f} s in all")
    if failed:
        log(f"failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
