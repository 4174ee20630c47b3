"""The report's verdict table (perf/report.py `targets_table`): one row per DESIGN.md target
in `DESIGN_TARGETS`, with its measured figure, peer, ratio and verdict when a scenario's JSON
holds it, "not run" when none does (never a figure from elsewhere); the scenarios' other
targets follow."""

from __future__ import annotations

from typing import Any

import pytest

from perf.fanout import socket_vs_redis
from perf.report import DESIGN_TARGETS, target, targets_table


def _rows(lines: list[str]) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def test_every_design_target_has_a_row_and_unrun_ones_say_so() -> None:
    docs = {
        "bootstrap": {
            "results": {"segments": 10_000, "memberships": 1_000_000_000},
            "targets": [
                target("bootstrap: cold start from Kafka", 11.0, "< 15 s"),
                target("bootstrap: warm restart from a checkpoint", 3.5, "< 3 s"),
            ],
        },
        "fanout": {"targets": []},
        "check": {"targets": [target("check: sidecar p99", 130.0, "< 100 us")]},
    }
    rows = _rows(targets_table(docs))
    design = rows[: len(DESIGN_TARGETS)]
    assert [r[0] for r in design] == [d[0] for d in DESIGN_TARGETS]
    by_label = {r[0]: r for r in design}
    cold = by_label[next(d[0] for d in DESIGN_TARGETS if "cold bootstrap" in d[0])]
    assert cold[3] == "11.00 s" and cold[5] == "0.73" and cold[6] == "**met**"
    warm = by_label[next(d[0] for d in DESIGN_TARGETS if "warm restart" in d[0])]
    assert warm[6] == "**not met**"
    for label, scenario, *_ in DESIGN_TARGETS:
        row = by_label[label]
        if scenario == "bootstrap":
            continue
        assert row[3] == "-" and row[6].startswith("not run"), row
        if scenario in docs:
            assert row[6] == "not run (not in its results)"
    # a target no DESIGN.md item names is still shown, after them
    assert rows[len(DESIGN_TARGETS)][0] == "check: sidecar p99 (also measured)"
    assert len(rows) == len(DESIGN_TARGETS) + 1


def test_a_peer_given_by_the_scenario_is_shown() -> None:
    t = target("fanout: socket rate with p99 < 1 ms vs Redis's", 9000, ">= 7000 checks/s",
               peer="Redis SISMEMBER at 7,000/s")  # fmt: skip
    rows = _rows(targets_table({"fanout": {"targets": [t]}}))
    row = next(r for r in rows if r[1] == "fanout" and r[3] != "-")
    assert row[4] == "Redis SISMEMBER at 7,000/s" and row[5] == "1.29" and row[6] == "**met**"


def test_rows_are_judged_by_design_goals_and_sizes() -> None:
    """A JSON file from an older harness (another goal, a smaller size) is not judged by what
    it says: by DESIGN.md's goal, and not at all at another size."""
    docs = {
        "embedded": {"targets": [target("embedded: Replica.contains per check", 0.8, "< 1 us")]},
        "bootstrap": {
            "results": {"segments": 1_000, "memberships": 100_000_000},
            "targets": [target("bootstrap: cold start from Kafka", 1.1, "< 15 s")],
        },
    }
    rows = {r[0]: r for r in _rows(targets_table(docs))}
    embedded = rows["in-process check under 0.5 us"]
    assert embedded[2] == "< 0.5 us" and embedded[6] == "**not met**"
    cold = next(r for label, r in rows.items() if label.startswith("cold bootstrap"))
    assert cold[6] == "not run at this size (ran 1,000 / 100,000,000)" and cold[5] == "-"


def test_a_goal_is_an_operator_a_number_and_a_unit() -> None:
    t = target("check: sidecar p99", 130.0, "< 100 us")
    assert (t["op"], t["goal"], t["unit"], t["met"], t["measured_over_goal"]) == (
        "<", 100.0, "us", False, 1.3)  # fmt: skip
    with pytest.raises(ValueError, match="does not start with one of"):
        target("check: sidecar p99", 130.0, "under 100 us")


def _steps(p99s: list[float]) -> dict[str, Any]:
    """A fanout peer's result with one 1,000/s step per p99 (the rates rising by 1,000)."""
    steps = [
        {"offered_rps": 1000 * (i + 1), "latency": {"p99_us": p}, "p99_ok": p < 1000}
        for i, p in enumerate(p99s)
    ]
    ok = [s["offered_rps"] for s in steps if s["p99_ok"]]
    return {"steps": steps, "max_rps_p99_under_limit": max(ok, default=0)}


def test_the_fanout_row_says_when_redis_sustained_no_step() -> None:
    def row(sock: dict[str, Any], redis: dict[str, Any]) -> list[str]:
        doc = {"quick": False, "targets": [socket_vs_redis(sock, redis)]}
        rows = _rows(targets_table({"fanout": doc}))
        return next(r for r in rows if r[0].startswith("fanout over the socket"))

    none = _steps([3035.0, 1800.0])
    got = row(_steps([600.0, 900.0, 1200.0]), none)
    assert got[3] == "2,000 checks/s" and got[6] == "**met**"
    assert got[4] == (
        "Redis SISMEMBER sustained no step with p99 < 1 ms (its lowest, 1,000/s: p99 3,035 us)"
    )
    assert got[5] == "- (the peer's figure is 0)" and got[2] == "> the peer's (0 checks/s)"
    assert row(_steps([1500.0]), none)[6] == "**not met**"  # neither: not met
    got = row(_steps([600.0, 900.0]), _steps([700.0, 1100.0]))
    assert got[2] == ">= the peer's (1,000 checks/s)" and got[5] == "2.00" and got[6] == "**met**"
    assert got[4] == "Redis SISMEMBER p99 < 1 ms up to 1,000/s"
    unavailable = row(_steps([600.0]), {"available": False, "reason": "no redis-server"})
    assert unavailable[6] == "n/a: not judged, its peer did not run (met as measured)"
    assert unavailable[4] == "Redis SISMEMBER unavailable: no redis-server"
