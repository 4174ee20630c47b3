"""`batch`: 1,000 checks in one request over the Unix socket, in three forms, each against
the echo peer (same framing; decodes the request and answers `[id, 0, true]`) as the floor of
moving and decoding that request in Python, all interleaved:

- `pairs`: the `batch` op, `[[user, segment], ...]` (`SidecarClient.batch`);
- `packed`: the `batch_packed` op (sidecar/packed.py) with the same 1,000 (user, segment)
  checks: users as packed uint64, a uint16 segment index per user
  (`SidecarClient.batch_packed(users, segments)`). The documented call for arbitrary pairs,
  so DESIGN.md's batch target is judged by it (`JUDGED`); the other forms are also measured;
- `packed, 1 segment`: `batch_packed` with 1,000 users against one segment, as a
  notification service filters a recipient list (`SidecarClient.batch_packed(users, seg)`);
- `packed raw, 1 segment`: the same with the users already in a uint64 array and the answers
  kept as bytes (`batch_packed(array('Q', users), seg, raw=True)`), as a caller holding its
  ids in numpy would use it: no Python object per check on either side.

Latency per request includes the client's encoding and decoding (the echo rows skip decoding
the answers: the echo has none). Checks per second are from one blocking client.

(Redis with 1,000 pipelined SISMEMBER through redis-py was tried as a peer: tens of
milliseconds per batch, almost all of it redis-py's per-command Python work, so it said
nothing about the servers and was dropped.)"""

from __future__ import annotations

from array import array
from pathlib import Path
from typing import Any

from sidecar.client import SidecarClient
from sidecar.packed import pack_batch

from . import data
from .check import interleave
from .report import cpu_lines, image_lines, latency_rows, plot_latency, table, target
from .services import Context, log

BATCH = 1_000
#: request form -> the target's name in the report
FORMS = {
    "pairs": "batch of 1,000 (batch op, [user, segment] pairs)",
    "packed": "batch of 1,000 (batch_packed, a segment per user)",
    "packed, 1 segment": "batch of 1,000 (batch_packed, one segment)",
    "packed raw, 1 segment": "batch of 1,000 (batch_packed, one segment, uint64 in, bytes out)",
}
#: the form DESIGN.md's batch target is judged by (perf/report.py DESIGN_TARGETS): the
#: documented call for 1,000 arbitrary [user, segment] pairs; the others are also measured
JUDGED = "packed"
JUDGED_DETAIL = (
    "the documented call for 1,000 arbitrary [user, segment] pairs: "
    "SidecarClient.batch_packed(users, segments), a segment per user; "
)


def run(ctx: Context) -> dict[str, Any]:
    rounds = 10
    # 500 requests of 1,000 checks a round: with 1,000 the per-round p50s stayed within
    # +-10% over 10 rounds (perf/README.md, "Run time")
    per_round = ctx.sizes.pick(100, 500)
    serve = ctx.serve()
    n_batches = per_round * 2
    flat = data.queries(serve.segments, BATCH * n_batches, seed=21)
    pairs = [[list(q) for q in flat[i : i + BATCH]] for i in range(0, len(flat), BATCH)]
    columns = [([u for u, _ in b], [s for _, s in b]) for b in pairs]
    lists = data.user_lists(serve.segments, n_batches, BATCH, seed=22)
    arrays = [array("Q", users) for _, users in lists]
    # One "query" of interleave() is a whole batch here: (index, tag).
    qs = [(i, "batch") for i in range(n_batches)]

    client = SidecarClient(serve.sidecar.uds, timeout=5.0).connect()
    echo = SidecarClient(ctx.echo().path, timeout=5.0).connect()
    targets: dict[str, Any] = {
        "sidecar pairs": lambda i, _s: client.batch(pairs[i]),
        "sidecar packed": lambda i, _s: client.batch_packed(*columns[i]),
        "sidecar packed, 1 segment": lambda i, _s: client.batch_packed(lists[i][1], lists[i][0]),
        "sidecar packed raw, 1 segment": lambda i, _s: client.batch_packed(
            arrays[i], lists[i][0], raw=True
        ),
        "echo pairs": lambda i, _s: echo.batch(pairs[i]),
        "echo packed": lambda i, _s: echo.call("batch_packed", *pack_batch(*columns[i])),
        "echo packed, 1 segment": lambda i, _s: echo.call(
            "batch_packed", *pack_batch(lists[i][1], lists[i][0])
        ),
        "echo packed raw, 1 segment": lambda i, _s: echo.call(
            "batch_packed", *pack_batch(arrays[i], lists[i][0])
        ),
    }
    log(f"batch: {rounds} rounds x {per_round} requests of {BATCH} checks x {len(targets)}")
    try:
        pid = {"sidecar": serve.sidecar.pid, "echo": ctx.echo().pid}
        pids = {n: pid[n.split()[0]] for n in targets}
        hists, round_p50, first, cpu_us = interleave(
            targets, qs, rounds, per_round, warmup=20, pids=pids
        )
        got = {
            "pairs": client.batch(pairs[0]),
            "packed": client.batch_packed(*columns[0]),
            "packed, 1 segment": client.batch_packed(lists[0][1], lists[0][0]),
            "packed raw, 1 segment": [
                (False, True, None)[b]
                for b in client.batch_packed(arrays[0], lists[0][0], raw=True)
            ],
        }
    finally:
        client.close()
        echo.close()
    truth = {
        "pairs": [u in serve.segments[s] for u, s in flat[:BATCH]],
        "packed": [u in serve.segments[s] for u, s in flat[:BATCH]],
        "packed, 1 segment": [u in serve.segments[lists[0][0]] for u in lists[0][1]],
        "packed raw, 1 segment": [u in serve.segments[lists[0][0]] for u in lists[0][1]],
    }
    wrong = {
        form: sum(a is not e for a, e in zip(got[form], truth[form], strict=True)) for form in FORMS
    }
    results: dict[str, Any] = {
        "checks_per_request": BATCH,
        "rounds": rounds,
        "requests_per_round": per_round,
        "wrong_answers": sum(wrong.values()),
        "wrong_answers_by_form": wrong,
        "latency": {n: h.summary() for n, h in hists.items()},
        "round_p50_us": round_p50,
        "server_cpu_us_per_request": cpu_us,
        "checks_per_second": {
            n: round(BATCH * 1e6 / h.summary(cdf=False)["mean_us"]) for n, h in hists.items()
        },
        "us_per_check_p50": {n: round(h.p50_us / BATCH, 3) for n, h in hists.items()},
    }
    results["targets"] = [
        target(
            f"{label}: sidecar p50 per request",
            round(hists[f"sidecar {form}"].p50_us, 1),
            "< 300 us",
            detail=(JUDGED_DETAIL if form == JUDGED else "")
            + f"p99 {hists[f'sidecar {form}'].p99_us:.0f} us; echo p50 "
            f"{hists[f'echo {form}'].p50_us:.0f} us; "
            f"{results['checks_per_second'][f'sidecar {form}']:,} checks/s from one client",
            peer=f"echo of the same request: p50 {hists[f'echo {form}'].p50_us:.0f} us",
        )
        for form, label in FORMS.items()
    ]
    return results


def section(res: dict[str, Any], out: Path, report_dir: Path) -> list[str]:
    lines = [
        f"{res['rounds']} interleaved rounds x {res['requests_per_round']} requests of "
        f"{res['checks_per_request']:,} checks (one blocking client, one request in flight).",
        "",
    ]
    lines += latency_rows(res["latency"])
    lines += [""]
    lines += table(
        ["peer", "checks/s (one client)", "us per check at p50"],
        [[n, v, res["us_per_check_p50"][n]] for n, v in res["checks_per_second"].items()],
    )
    lines += cpu_lines(res.get("server_cpu_us_per_request"), "Server CPU per request (main thread)")
    lines += ["", f"Wrong answers (checked against the data): {res['wrong_answers']}."]
    png = plot_latency(res["latency"], "batch of 1,000 checks", out / "batch_latency.png")
    lines += image_lines(png, "batch latency", report_dir)
    return lines
