"""Results: one JSON file per scenario, the combined REPORT.md and the PNG plots.

The report is rebuilt from every `<scenario>.json` in the output directory, so running one
scenario again refreshes its section and keeps the others.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

SCENARIOS = (
    "check",
    "batch",
    "http",
    "embedded",
    "shared",
    "memory",
    "fanout",
    "propagation",
    "publish",
    "aerospike",
    "bootstrap",
    "eval",
    "count",
    "spark_batch",
)


# -- targets -----------------------------------------------------------------------------------
_OPS: dict[str, Callable[[float, float], bool]] = {
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


def target(
    name: str,
    measured: float | None,
    goal: str,
    *,
    detail: str = "",
    applies: bool = True,
    peer: str = "",
) -> dict[str, Any]:
    """One DESIGN.md target beside its measured figure; `goal` as DESIGN.md words it, an
    operator, a number and a unit ("< 100 us", ">= 15 x"). `applies` False: measured at a
    smaller size than the target's (--quick), shown but not judged. `peer`: what the goal
    (or the measured ratio) was measured against in the same run, when not a fixed figure."""
    op, number, unit = goal.split(" ", 2)
    if op not in _OPS:
        raise ValueError(f"target {name!r}: goal {goal!r} does not start with one of {list(_OPS)}")
    goal_value = float(number)
    met = None if measured is None else _OPS[op](measured, goal_value)
    return {
        "name": name,
        "peer": peer,
        "goal": goal_value,
        "op": op,
        "unit": unit,
        "measured": measured,
        "met": met if applies else None,
        "met_at_this_size": met,
        "applies": applies,
        "measured_over_goal": (
            round(measured / goal_value, 3) if measured is not None and goal_value else None
        ),
        "detail": detail,
    }


# -- machine -----------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    versions = {}
    for mod in ("pyroaring", "msgpack", "uvloop", "aiohttp", "confluent_kafka", "redis"):
        try:
            m = __import__(mod)
            versions[mod] = getattr(m, "__version__", None) or getattr(m, "version", lambda: "")()
        except Exception:
            versions[mod] = None
    if isinstance(versions.get("confluent_kafka"), tuple):
        versions["confluent_kafka"] = versions["confluent_kafka"][0]
    return {
        "nproc": os.cpu_count(),
        "memory_bytes": mem,
        "memory_gib": round(mem / 2**30, 1),
        "cpu_model": cpu,
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "libraries": versions,
        "source": source_state(),
    }


def source_state() -> dict[str, Any]:
    """The commit measured, and whether the product code differed from it."""
    import subprocess

    repo = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            res = subprocess.run(
                ["git", *args], cwd=repo, capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return res.stdout.strip() if res.returncode == 0 else ""

    changed = git("status", "--porcelain", "--", "sidecar", "publisher")
    return {
        "commit": git("rev-parse", "--short", "HEAD") or None,
        "product_code_changed_since_commit": bool(changed),
        "changed_files": [line[3:] for line in changed.splitlines()][:20],
    }


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# -- files -------------------------------------------------------------------------------------
def write_json(out: Path, name: str, doc: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    tmp.replace(path)
    return path


#: results written by tools outside `seg-perf` that hold targets
EXTRA_RESULTS: tuple[str, ...] = ()


def load_results(out: Path) -> dict[str, dict[str, Any]]:
    docs = {}
    for name in (*SCENARIOS, *EXTRA_RESULTS):
        path = out / f"{name}.json"
        if path.exists():
            try:
                docs[name] = json.loads(path.read_text())
            except ValueError:
                continue
    return docs


# -- plots -------------------------------------------------------------------------------------
def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_latency(
    series: dict[str, dict[str, Any]], title: str, path: Path, unit: str = "us"
) -> Path | None:
    """Two panels from histogram summaries with `cdf` points: the CDF (log latency) and the
    percentile tail (x = 1/(1-q), log). `unit` "ms" plots milliseconds."""
    series = {k: v for k, v in series.items() if v.get("cdf")}
    if not series:
        return None
    div = 1000.0 if unit == "ms" else 1.0
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    low = None  # the x range starts near the lowest 5th percentile: below is noise
    for name, s in series.items():
        pts = s["cdf"]
        xs = [max(p[0] / div, 1e-3) for p in pts]
        qs = [p[1] for p in pts]
        p1 = next((x for x, q in zip(xs, qs, strict=True) if q >= 5.0), xs[0])
        low = p1 if low is None else min(low, p1)
        label = f"{name} (p50 {s['p50_us'] / div:.0f} {unit}, p99 {s['p99_us'] / div:.0f} {unit})"
        ax1.plot(xs, [q / 100 for q in qs], label=label, drawstyle="steps-post")
        tail = [(1 / (1 - q / 100), x) for x, q in zip(xs, qs, strict=True) if q < 100]
        ax2.plot([t[0] for t in tail], [t[1] for t in tail], marker=".", label=name)
    ax1.set_xscale("log")
    if low:
        ax1.set_xlim(left=low / 3)
        ax2.set_ylim(bottom=low / 3)
    ax1.set_xlabel(f"latency ({unit}, log)")
    ax1.set_ylabel("fraction of requests")
    ax1.set_title(f"{title}: CDF")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=8, loc="lower right")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ticks = [1, 2, 10, 100, 1000, 10000, 100000]
    ax2.set_xticks(ticks)
    ax2.set_xticklabels(["0", "50", "90", "99", "99.9", "99.99", "99.999"])
    ax2.set_xlabel("percentile")
    ax2.set_ylabel(f"latency ({unit}, log)")
    ax2.set_title(f"{title}: latency by percentile")
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_fanout(
    steps: list[dict[str, Any]],
    limit_us: float,
    path: Path,
    title: str = "fanout: open-loop clients against one sidecar",
) -> Path | None:
    steps = [s for s in steps if s.get("latency", {}).get("count")]
    if not steps:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    xs = [s["achieved_rps"] for s in steps]
    for key, label in (("p50_us", "p50"), ("p99_us", "p99"), ("p999_us", "p99.9")):
        ax.plot(xs, [s["latency"][key] for s in steps], marker="o", label=label)
    lag = [s.get("send_lag", {}).get("p99_us") for s in steps]
    if all(v is not None for v in lag):
        ax.plot(xs, lag, linestyle=":", color="gray", marker=".", label="client send lag p99")
    ax.axhline(limit_us, color="red", linestyle="--", linewidth=1, label=f"{limit_us:.0f} us")
    for s in steps:
        ax.annotate(f"{s['offered_rps'] / 1000:g}k", (s["achieved_rps"], s["latency"]["p99_us"]),
                    fontsize=7, textcoords="offset points", xytext=(0, 6))  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("throughput (checks/s achieved; labels: offered)")
    ax.set_ylabel("latency from the scheduled send (us, log)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- markdown ----------------------------------------------------------------------------------
def fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}"
    return str(v)


def table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        out.append("| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in row) + " |")
    return out


def cpu_lines(cpu: dict[str, float] | None, lead: str, digits: int = 0) -> list[str]:
    """The paragraph "<lead>: <name> <N> us, ..." of CPU per request; none when unmeasured."""
    if not cpu:
        return []
    return ["", f"{lead}: " + ", ".join(f"{n} {v:.{digits}f} us" for n, v in cpu.items()) + "."]


def image_lines(png: Path | None, alt: str, report_dir: Path) -> list[str]:
    """The report's link to a plot, none when it was not drawn (no matplotlib)."""
    return ["", f"![{alt}]({os.path.relpath(png, report_dir)})"] if png else []


def latency_rows(series: dict[str, dict[str, Any]]) -> list[str]:
    rows = []
    for name, s in series.items():
        if not s.get("count"):
            continue
        rows.append([name, s["count"], s["p50_us"], s["p99_us"], s["p999_us"], s["max_us"]])
    return table(["peer", "requests", "p50 us", "p99 us", "p99.9 us", "max us"], rows)


def _met(t: dict[str, Any], quick: bool = True) -> str:
    if t["measured"] is None:
        return "not measured"
    if not t["applies"]:
        at = "met" if t["met_at_this_size"] else "not met"
        if not quick:  # a full-size run: its peer did not run (the detail says why)
            return f"n/a: not judged, its peer did not run ({at} as measured)"
        return f"n/a at --quick size ({at} at this size)"
    return "**met**" if t["met"] else "**not met**"


#: Every item of DESIGN.md "Performance targets": (the target as DESIGN.md says it, the
#: scenario whose JSON holds it, the words its target name holds, the peer it is judged
#: against, DESIGN.md's goal as (op, value) or None where the goal is a peer's figure measured
#: in the same run). The verdict table has one row per item, in this order, judged against
#: DESIGN.md's goal (a JSON file from an older harness may hold another); "not run" when no
#: JSON in the output directory holds a matching target (never a figure from elsewhere).
DESIGN_TARGETS: tuple[tuple[str, str, tuple[str, ...], str, tuple[str, float] | None], ...] = (
    ("single check over the Unix socket: p50 within 1.1x of a bare echo", "check",
     ("sidecar p50 / echo p50",), "bare Python Unix-socket echo, same framing", ("<=", 1.1)),
    ("single check: at least 3x faster at p50 than Redis SISMEMBER", "check",
     ("redis p50 / sidecar p50",), "Redis SISMEMBER over its Unix socket (redis-py)",
     (">=", 3.0)),
    ("shared replica: check from another process under 1 us at p50", "shared",
     ("check from another process, p50",), "socket check (detail)", ("<", 1.0)),
    ("shared replica: N reader processes cost the memory of one copy", "shared",
     ("memory (pss) over one copy",), "one copy of the mapping", ("<=", 1.1)),
    ("in-process check under 0.5 us", "embedded", ("replica.contains per check",),
     "x in BitMap64 (detail)", ("<", 0.5)),
    ("batch of 1,000 [user, segment] checks in one request under 300 us", "batch",
     ("batch_packed, a segment per user",), "echo of the same request (detail)",
     ("<", 300.0)),
    ("memory, dense ids: at least 15x below a Redis set", "memory",
     ("memory dense", "redis"), "Redis set of the same members", (">=", 15.0)),
    ("memory, 1-in-16 ids: at least 15x below a Redis set", "memory",
     ("memory medium", "redis"), "Redis set of the same members", (">=", 15.0)),
    ("memory, random 32-bit ids: at least 15x below a Redis set", "memory",
     ("random in 2^32", "redis"), "Redis set of the same members", (">=", 15.0)),
    ("memory, ids random over 2^64: within 1.6x of the information bound", "memory",
     ("2^64", "bound"), "log2 C(2^64, n) bits", ("<=", 1.6)),
    ("fanout over the socket: p99 < 1 ms rate at least Redis's in the same harness", "fanout",
     ("socket rate",), "Redis SISMEMBER, same harness and steps", None),
    ("fanout through the shared replica: 1M checks/s in all", "fanout",
     ("shared replica",), "-", (">=", 1_000_000)),
    ("cold bootstrap of 10,000 segments / 1B memberships from Kafka under 15 s", "bootstrap",
     ("cold start",), "-", ("<", 15.0)),
    ("warm restart (checkpoint) under 3 s", "bootstrap", ("warm restart",), "-", ("<", 3.0)),
    ("publish-to-visible under 1 s at p99 from the call, one-shot seg-publish", "propagation",
     ("one-shot publisher", "call -> visible"), "session publisher (same run)", ("<", 1.0)),
    ("publish-to-visible under 1 s at p99 from the call, session publisher", "propagation",
     ("session publisher", "call -> visible"), "-", ("<", 1.0)),
    ("Aerospike writes at least as fast as the client's own batch_operate", "aerospike",
     ("batch_operate",), "the client's own batch_operate", (">=", 1.0)),
    ("Spark batch of 20 segments over 1M users / 10M orders under 30 s end to end",
     "spark_batch", ("spark batch",), "the way before the merge, same run", ("<", 30.0)),
)  # fmt: skip
#: the size a scenario must have run at for its DESIGN.md targets to be judged
DESIGN_SIZES: dict[str, Callable[[dict[str, Any]], str | None]] = {
    "bootstrap": lambda r: (
        None
        if (r.get("segments"), r.get("memberships")) == (10_000, 1_000_000_000)
        else f"not run at this size (ran {r.get('segments', 0):,} / {r.get('memberships', 0):,})"
    ),
}


def _find(doc: dict[str, Any] | None, words: tuple[str, ...]) -> dict[str, Any] | None:
    for t in (doc or {}).get("targets") or []:
        name = t["name"].lower()
        if all(w.lower() in name for w in words):
            return t
    return None


def _row(
    t: dict[str, Any],
    scenario: str,
    label: str,
    peer: str,
    peer_goal: bool = False,
    quick: bool = True,
) -> list[Any]:
    """`peer_goal`: the goal is the peer's figure measured in the same run (DESIGN.md names
    no number), shown as such."""
    number = fmt(int(t["goal"]) if float(t["goal"]).is_integer() else t["goal"])
    goal = f"{t['op']} {number} {t['unit']}"
    if peer_goal:
        goal = f"{t['op']} the peer's ({number} {t['unit']})"
    measured = f"{fmt(t['measured'], 2)} {t['unit']}" if t["measured"] is not None else "-"
    ratio = fmt(t["measured_over_goal"], 2)
    if t["measured"] is not None and not t["goal"]:
        ratio = "- (the peer's figure is 0)"
    verdict = _met(t, quick)
    return [label, scenario, goal, measured, t.get("peer") or peer, ratio, verdict, t["detail"]]


def _as_designed(t: dict[str, Any], goal: tuple[str, float] | None) -> dict[str, Any]:
    """`t` judged against DESIGN.md's goal (when it has a fixed one)."""
    if goal is None or (t["op"], t["goal"]) == goal:
        return t
    op, value = goal
    return target(t["name"], t["measured"], f"{op} {value} {t['unit']}", detail=t["detail"],
                  applies=t["applies"], peer=t.get("peer", ""))  # fmt: skip


def _quick(doc: dict[str, Any] | None) -> bool:
    """Whether a scenario's doc is of a --quick run (an older JSON without the key: yes)."""
    return bool((doc or {}).get("quick", True))


def targets_table(docs: dict[str, dict[str, Any]]) -> list[str]:
    """One row per DESIGN.md target (`DESIGN_TARGETS`), then the scenarios' other targets."""
    rows = []
    shown: set[int] = set()
    for label, scenario, words, peer, goal in DESIGN_TARGETS:
        doc = docs.get(scenario)
        t = _find(doc, words)
        if t is None:
            why = "not run" if doc is None else "not run (not in its results)"
            rows.append([label, scenario, "", "-", peer, "-", why, ""])
            continue
        shown.add(id(t))
        off_size = DESIGN_SIZES.get(scenario, lambda _r: None)(doc.get("results") or {})  # type: ignore[union-attr]
        row = _row(_as_designed(t, goal), scenario, label, peer, goal is None, _quick(doc))
        if off_size:
            row[5], row[6] = "-", off_size
        rows.append(row)
    for name, doc in docs.items():
        for t in doc.get("targets") or []:
            if id(t) not in shown:
                rows.append(_row(t, name, f"{t['name']} (also measured)", "", quick=_quick(doc)))
    return table(
        ["DESIGN.md target", "scenario", "goal", "measured", "peer", "measured / goal", "met?",
         "detail"],
        rows,
    )  # fmt: skip


def _commit(d: dict[str, Any]) -> str:
    src = (d.get("machine") or {}).get("source") or {}
    dirty = "+changes" if src.get("product_code_changed_since_commit") else ""
    return f"{src.get('commit') or '?'}{dirty}"


def provenance(docs: dict[str, dict[str, Any]]) -> list[str]:
    """What was measured when: one sentence when every result comes from one `seg-perf` run
    of one commit, else the runs and commits it mixes (the table below has each scenario's)."""
    if not docs:
        return ["No results yet."]
    runs = {d.get("run") or f"{d.get('command')} at {d.get('started_at')}" for d in docs.values()}
    commits = sorted({_commit(d) for d in docs.values()})
    if len(runs) == 1 and len(commits) == 1 and all(d.get("run") for d in docs.values()):
        d0 = next(iter(docs.values()))
        ends = [
            dt.datetime.fromisoformat(d["started_at"]) + dt.timedelta(seconds=d["seconds"])
            for d in docs.values()
            if d.get("started_at") and d.get("seconds") is not None
        ]
        took = (max(ends) - dt.datetime.fromisoformat(d0["run"])).total_seconds() if ends else 0
        return [
            f"Every result below from one run, `{d0.get('command')}`, started {d0['run'][:19]} "
            f"UTC, {took / 60:.0f} min for its {len(docs)} scenarios, of commit {commits[0]}."
        ]
    return [
        f"Results from {len(runs)} runs of {len(commits)} commits ({', '.join(commits)}): "
        "each scenario's run and commit are in the table below; the ratios are each measured "
        "inside one run."
    ]


def write_report(out: Path, report: Path, sections: dict[str, Callable[..., list[str]]]) -> Path:
    docs = load_results(out)
    rel = os.path.relpath(out, report.parent)
    lines: list[str] = ["# seg-perf report", ""]
    lines.append(
        "Benchmarks of DESIGN.md's performance targets, each against peers measured in the same "
        "run on the same machine. Written by `seg-perf` from the JSON files in "
        f"`{rel}/` (one per scenario); regenerate with the commands below."
    )
    lines.append("")
    mach = next((d["machine"] for d in docs.values() if d.get("machine")), machine())
    lines += ["## Machine", ""]
    lines += table(
        ["nproc", "memory", "CPU", "Python", "kernel"],
        [[str(mach["nproc"]), f"{mach['memory_gib']} GiB", mach["cpu_model"], mach["python"],
          mach["kernel"]]],
    )  # fmt: skip
    libs = ", ".join(f"{k} {v}" for k, v in (mach.get("libraries") or {}).items() if v)
    lines += ["", f"Libraries: {libs}."]
    lines += ["", *provenance(docs), ""]
    lines += [
        "Load average (1/5/15 min) before and after each scenario: other work on this 2-core "
        "machine shares the CPUs, so absolute figures are noisy; the ratios are measured "
        "inside one run, with the peers interleaved.",
        "",
    ]

    lines += table(
        ["scenario", "mode", "ran at (UTC)", "seconds", "load before", "load after", "commit"],
        [
            [name, "quick" if d.get("quick") else "full", d.get("started_at", "")[:19],
             d.get("seconds"), " / ".join(map(str, d.get("load_before") or [])),
             " / ".join(map(str, d.get("load_after") or [])), _commit(d)]
            for name, d in docs.items()
        ],
    )  # fmt: skip
    lines += ["", "## Commands", "", "```sh"]
    commands = []
    for d in docs.values():
        if d.get("command") and d["command"] not in commands:
            commands.append(d["command"])
    lines += commands or ["seg-perf all"]
    lines += ["```", ""]
    by_command: dict[str, dict[str, Any]] = {}
    for d in docs.values():  # the services of each run, as its last scenario saw them
        by_command.setdefault(d.get("command", ""), {}).update(d.get("services") or {})
    for cmd, services in by_command.items():
        if not services:
            continue
        lines += [f"Started by the harness for `{cmd}`:", ""]
        for k, v in services.items():
            lines.append(f"- {k}: " + ", ".join(f"{x} `{y}`" for x, y in v.items()))
        lines.append("")
    lines += ['## Targets (DESIGN.md "Performance targets")', ""]
    lines += targets_table(docs)
    lines += [""]
    for name, doc in docs.items():
        lines += [f"## {name}", ""]
        if doc.get("error"):
            lines += [f"**Failed:** `{doc['error']}`", ""]
            if not doc.get("results"):
                continue
        fn = sections.get(name)
        if fn is not None:
            try:
                lines += fn(doc["results"], out, report.parent)
            except Exception as exc:  # e.g. a JSON file from an older harness
                lines += [f"(cannot render {name}.json: {type(exc).__name__}: {exc})"]
        lines.append("")
    profiles = sorted((out / "profile").glob("*.summary.txt"))
    pieces = out / "profile" / "pieces.txt"
    if profiles or pieces.exists():
        lines += ["## Profiles", ""]
    if pieces.exists():
        lines += [
            "`python -m perf.profile pieces`: each step of a request in the sidecar's server, "
            "timed in-process (best of 7, no sockets), beside the echo peer's:",
            "",
            "```",
            *pieces.read_text().rstrip().splitlines(),
            "```",
            "",
        ]
    if profiles:
        lines.append(
            "`python -m perf.profile <kind>`: a seg-sidecar on a log directory under a "
            "closed-loop load, sampled with `py-spy record --native`; busy samples only (a "
            "thread waiting in epoll or asleep is left out). The hottest frames by self time, "
            "and the sidecar's own frames by inclusive time:"
        )
        for path in profiles:
            text = path.read_text().splitlines()
            head = [t for t in text[:3] if t.strip()]
            try:
                start, incl = text.index("self:"), text.index("inclusive:")
            except ValueError:
                continue
            own = [t for t in text[incl + 1 :] if "sidecar/" in t][:12]
            lines += ["", f"### {path.name.split('.')[0]}", "", *head, "", "```", "self:"]
            lines += [t for t in text[start + 1 : start + 13] if t.strip()]
            lines += ["inclusive (sidecar code):", *own, "```", ""]
    analysis = report.parent / "ANALYSIS.md"
    if analysis.exists() and analysis != report:
        lines += ["## Analysis", "", f"See [{analysis.name}]({analysis.name}).", ""]
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(lines).rstrip() + "\n")
    return report


def stamp() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
