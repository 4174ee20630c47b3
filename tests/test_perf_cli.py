"""seg-perf's run loop (perf/cli.py): a scenario that raises, or is still running at
--scenario-timeout, is recorded as failed in its JSON file and in the report, and the run goes
on with the next scenario, whose results are kept; a scenario one of whose peers failed keeps
the others' results and counts as failed. The scenario modules are replaced by
small ones here (the real ones run in tests/test_perf_quick.py)."""

from __future__ import annotations

import json
import os
import signal
import time
import types
from pathlib import Path
from typing import Any

import pytest

from perf import cli


def _scenario(behaviour: str) -> types.SimpleNamespace:
    def run(_ctx: Any) -> dict[str, Any]:
        if behaviour == "raise":
            raise RuntimeError("boom")
        if behaviour == "hang":
            time.sleep(120)
        if behaviour == "partial":  # one of its peers failed, the others measured
            return {"value": 8, "failed_peers": {"redis": "RuntimeError: gone"}, "targets": []}
        return {"value": 7, "targets": []}

    def section(res: dict[str, Any], _out: Path, _report_dir: Path) -> list[str]:
        return [f"the value was {res['value']}"]

    return types.SimpleNamespace(run=run, section=section)


@pytest.fixture
def restore_signals(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # main() prepends to it
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGALRM)}
    yield
    for s, h in handlers.items():
        signal.signal(s, h)


@pytest.mark.usefixtures("restore_signals")
def test_a_failed_or_overrunning_scenario_is_recorded_and_the_run_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    behaviour = {"check": "raise", "batch": "hang", "http": "partial", "embedded": "ok"}
    monkeypatch.setattr(cli, "module", lambda name: _scenario(behaviour.get(name, "ok")))
    out = tmp_path / "results"
    started = time.monotonic()
    argv = [*behaviour, "--out", str(out), "--scenario-timeout", "2"]
    code = cli.main(argv)
    assert code == 1
    assert time.monotonic() - started < 60, "the hanging scenario was not stopped"
    docs = {n: json.loads((out / f"{n}.json").read_text()) for n in behaviour}
    assert docs["check"]["error"] == "RuntimeError: boom"
    assert "RuntimeError: boom" in docs["check"]["traceback"]
    assert docs["batch"]["error"].startswith("ScenarioTimeout")
    assert docs["batch"]["seconds"] < 60
    assert docs["http"]["error"] == "peers failed: redis (RuntimeError: gone)"
    assert docs["http"]["results"]["value"] == 8
    assert docs["embedded"]["error"] is None and docs["embedded"]["results"] == {"value": 7}
    assert len({d["run"] for d in docs.values()}) == 1  # one run, stamped in every file
    report = (out / "REPORT.md").read_text()
    assert "## check\n\n**Failed:** `RuntimeError: boom`" in report
    assert "## batch\n\n**Failed:** `ScenarioTimeout" in report
    assert (
        "## http\n\n**Failed:** `peers failed: redis (RuntimeError: gone)`\n\nthe value was 8"
        in report
    )
    assert "## embedded\n\nthe value was 7" in report
    assert "from one run, `seg-perf check batch http embedded" in report


@pytest.mark.usefixtures("restore_signals")
def test_a_timeout_that_is_not_a_positive_number_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["check", "--out", str(tmp_path), "--scenario-timeout", "0"])
    assert exc.value.code == 2
    assert "--scenario-timeout" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.usefixtures("restore_signals")
def test_what_earlier_scenarios_left_running_is_stopped_before_spark_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, Any] = {}

    def check(ctx: Any) -> dict[str, Any]:  # starts a real service (the echo peer) and a data set
        seen["before"] = ctx.echo().pid
        ctx.cache["data"] = 1
        return {"value": 1, "targets": []}

    def spark_batch(ctx: Any) -> dict[str, Any]:
        seen["alive"] = Path(f"/proc/{seen['before']}").exists()
        seen["cache"] = dict(ctx.cache)
        seen["again"] = ctx.echo().pid  # a scenario may start a service again
        return {"value": 2, "targets": []}

    def fake(name: str) -> types.SimpleNamespace:
        found = _scenario("ok")
        found.run = {"check": check, "spark_batch": spark_batch}.get(name, found.run)
        return found

    monkeypatch.setattr(cli, "module", fake)
    assert cli.main(["check", "spark_batch", "--out", str(tmp_path / "results")]) == 0
    assert seen["alive"] is False and seen["cache"] == {}
    assert seen["again"] != seen["before"]
    assert not Path(f"/proc/{seen['again']}").exists()  # and the run's end stops it
