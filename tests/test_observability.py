"""deploy/observability/: the Prometheus alert rules and the Grafana dashboard name only
metrics (and label values) that a running seg-sidecar really exports on /metrics, or that
seg-publish writes with --metrics-file. The rules are parsed and their structure checked
(promtool is not built here: `go install .../cmd/promtool` is refused by the module's exclude
directives); every alert has a runbook section in docs/OPERATIONS.md."""

from __future__ import annotations

import json
import re
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pyroaring import BitMap64

from publisher.metrics import METRICS as PUBLISHER_METRICS
from sidecar.client import SidecarClient
from tests.aerospike_server import ThreadedAerospikeServer
from tests.test_end_to_end import Sidecar

ROOT = Path(__file__).resolve().parents[1]
OBS = ROOT / "deploy" / "observability"
RULES = OBS / "alerts.yaml"
DASHBOARD = OBS / "grafana-dashboard.json"
OPERATIONS = ROOT / "docs" / "OPERATIONS.md"
BIN = Path(sys.executable).parent

#: series Prometheus makes itself, and the labels it adds to every scraped series
PROMETHEUS_OWN = {"up"}
TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "writer"}
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
             "unless", "bool", "offset", "inf", "nan"}  # fmt: skip
_DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")


# -- PromQL, as far as the names in it go ---------------------------------------------------------


def selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """The metric selectors of a PromQL expression: (name, [(label, op, value)...])."""
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges and subqueries: [5m], [$__rate_interval]
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    found = []
    pattern = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)?\s*(\{[^}]*\})|([A-Za-z_:][A-Za-z0-9_:]*)")
    for m in pattern.finditer(expr):
        name = m.group(1) or m.group(3)
        braces = m.group(2)
        rest = expr[m.end() :].lstrip()
        if braces is None and (rest.startswith("(") or name.lower() in _KEYWORDS):
            continue  # a function, an aggregation or a keyword
        matchers = re.findall(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"', braces or "")
        if name is None:  # {__name__="..."} is not used here
            raise AssertionError(f"a selector without a metric name in {expr!r}")
        found.append((name, matchers))
    return found


def grouping_labels(expr: str) -> set[str]:
    """The labels of every `by (...)` / `without (...)` / `on (...)` clause."""
    lists = re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr)
    return {label.strip() for group in lists for label in group.split(",") if label.strip()}


def test_selectors_parser() -> None:
    got = selectors(
        'sum by (a, b) (rate(x_total{result="none", pod=~"$pod"}[5m])) / on(pod) '
        "max(y) > 2 * 3600 and time() - z > 0 or vector(0)"
    )
    assert got == [("x_total", [("result", "=", "none"), ("pod", "=~", "$pod")]),
                   ("y", []), ("z", [])]  # fmt: skip
    assert grouping_labels("sum by (a, b) (x) / on(pod) max without(le) (y)") == {
        "a", "b", "pod", "le"}  # fmt: skip


def rule_exprs() -> list[tuple[str, str]]:
    doc = yaml.safe_load(RULES.read_text())
    return [(r["alert"], r["expr"]) for g in doc["groups"] for r in g["rules"]]


def dashboard_exprs() -> list[tuple[str, str]]:
    doc = json.loads(DASHBOARD.read_text())
    return [
        (p["title"], t["expr"]) for p in doc["panels"] for t in p.get("targets", []) if "expr" in t
    ]


# -- structure -------------------------------------------------------------------------------------


def test_alert_rules_are_well_formed_and_each_has_a_runbook() -> None:
    doc = yaml.safe_load(RULES.read_text())
    assert set(doc) == {"groups"}
    names = []
    runbook = OPERATIONS.read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.+)$", runbook, flags=re.M)
    }
    for group in doc["groups"]:
        assert set(group) == {"name", "rules"} and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", rule["alert"])
            names.append(rule["alert"])
            assert isinstance(rule["expr"], str) and selectors(rule["expr"])
            assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]
            if "for" in rule:
                assert _DURATION.match(rule["for"]), rule
            assert rule["labels"]["severity"] in {"page", "warning"}
            notes = rule["annotations"]
            assert {"summary", "description", "runbook"} <= set(notes)
            link = notes["runbook"]
            assert link == f"docs/OPERATIONS.md#{rule['alert'].lower()}", link
            assert rule["alert"].lower() in anchors, f"no runbook section for {rule['alert']}"
    assert len(names) == len(set(names))
    # what the issue asks to alert on
    for needed in (
        "SegSidecarNotReady",
        "SegReplicaLagging",
        "SegSegmentsUnhealthy",
        "SegFallbackBreakerOpen",
        "SegFallbackErrors",
        "SegPublisherNotPublished",
    ):
        assert needed in names  # fmt: skip


def test_dashboard_is_grafana_json() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] and doc["title"] and doc["schemaVersion"] >= 30
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for p in doc["panels"]:
        pos = p["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24
        if p["type"] != "row":
            assert p["targets"] and all(t["refId"] for t in p["targets"])
    variables = {v["name"] for v in doc["templating"]["list"]}
    used = set(re.findall(r"\$(\w+)", json.dumps(doc["panels"])))
    assert used - {"__rate_interval"} <= variables


# -- every name is one a running sidecar (or seg-publish) exports ---------------------------------


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


@pytest.fixture
def exported(aerospike_server: ThreadedAerospikeServer, tmp_path: Path) -> dict[str, list[dict]]:
    """sample name -> label sets: a scrape of a seg-sidecar with the Aerospike fallback, after
    traffic of every kind, plus the textfile of a seg-publish run."""
    segments = tmp_path / "set"
    segments.mkdir()
    members = BitMap64(range(100, 200))
    (segments / "vip.roaring").write_bytes(members.serialize())
    (segments / "manifest.json").write_text(json.dumps({
        "format": 1, "computed_at": "2026-12-01T00:00:00Z",
        "segments": {"vip": {"file": "vip.roaring", "cardinality": len(members)}},
    }))  # fmt: skip
    prom = tmp_path / "seg_publish.prom"
    log = ["--log-dir", str(tmp_path / "log")]
    subprocess.run([str(BIN / "seg-publish"), "--input", str(segments), *log,
                    "--metrics-file", str(prom), "--quiet"], check=True, timeout=120)  # fmt: skip
    sidecar = Sidecar([*log, "--aerospike", aerospike_server.address], tmp_path).start()
    try:
        with SidecarClient(str(sidecar.uds), timeout=10) as client:
            assert client.check(150, "vip") is True  # local
            # not held: the fallback answers, once its connection (made in the background) is up
            deadline = time.monotonic() + 60
            while client.check(150, "elsewhere") is not False:
                assert time.monotonic() < deadline, "the fallback never answered"
                time.sleep(0.1)
            client.batch([(1, "vip"), (150, "vip")])
        with socket.socket(socket.AF_UNIX) as raw:  # a frame that is not msgpack: an error
            raw.connect(str(sidecar.uds))
            raw.sendall(struct.pack(">I", 1) + b"\xc1")
            raw.recv(4096)
        urllib.request.urlopen(f"http://127.0.0.1:{sidecar.port}/v1/check?user=150&segment=vip")
        text = _scrape(sidecar.port)
    finally:
        assert sidecar.stop() == 0
    out: dict[str, list[dict]] = {}
    for source in (text, prom.read_text()):
        for family in text_string_to_metric_families(source):
            for s in family.samples:
                out.setdefault(s.name, []).append(s.labels)
    assert set(PUBLISHER_METRICS) <= set(out)
    return out


def test_rules_and_dashboard_name_only_exported_metrics(exported: dict[str, list[dict]]) -> None:
    named = [(where, e) for where, e in rule_exprs() + dashboard_exprs()]
    assert len(named) > 20
    seen = set()
    for where, expr in named:
        have_labels = set(TARGET_LABELS)
        for name, _ in selectors(expr):
            have_labels |= {k for ls in exported.get(name, []) for k in ls}
        missing = grouping_labels(expr) - have_labels
        assert not missing, f"{where}: groups by {missing}, which no metric of it has ({expr})"
        for name, matchers in selectors(expr):
            seen.add(name)
            if name in PROMETHEUS_OWN:
                continue
            assert name in exported, f"{where}: {name} is not exported ({expr})"
            labels = exported[name]
            for label, op, value in matchers:
                if label in TARGET_LABELS:
                    continue
                have = {ls.get(label) for ls in labels} - {None}
                assert have, f"{where}: {name} has no label {label!r}"
                if op == "=":
                    assert value in have, f"{where}: {name}{{{label}={value!r}}}: only {have}"
                elif op == "=~" and re.fullmatch(r"[\w|]+", value):
                    for alt in value.split("|"):
                        assert alt in have, f"{where}: {name}{{{label}=~{alt!r}}}: only {have}"
    # and the dashboard shows the metrics an operator needs
    for needed in (
        "seg_replica_ready",
        "seg_replica_lag_records",
        "seg_fallback_breaker_state",
        "seg_request_duration_seconds_bucket",
        "process_resident_memory_bytes",
        "seg_publish_last_success_timestamp_seconds",
    ):
        assert needed in seen  # fmt: skip


def test_the_readme_lists_every_metric_exported(exported: dict[str, list[dict]]) -> None:
    listed = set(re.findall(r"seg_[a-z_]+", (OBS / "README.md").read_text()))
    families = {re.sub(r"_(total|created|bucket|count|sum)$", "", name) for name in exported}
    missing = sorted(f for f in families if f.startswith("seg_") and f not in listed
                     and f"{f}_total" not in listed)  # fmt: skip
    assert not missing, f"deploy/observability/README.md does not list {missing}"


def test_scrape_config_gives_the_labels_the_rules_use() -> None:
    config = yaml.safe_load((OBS / "prometheus.yaml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    wanted_jobs = set()
    for _, expr in rule_exprs():
        for name, matchers in selectors(expr):
            wanted_jobs |= {v for label, op, v in matchers if name == "up" and label == "job"}
    assert wanted_jobs and wanted_jobs <= set(jobs)
    sidecar = jobs["seg-sidecar"]
    made = {r["target_label"] for r in sidecar["relabel_configs"] if "target_label" in r}
    assert {"namespace", "pod"} <= made
    ports = [r["regex"] for r in sidecar["relabel_configs"]
             if r["source_labels"] == ["__meta_kubernetes_pod_container_port_name"]]  # fmt: skip
    deployment = next(
        d
        for d in yaml.safe_load_all((ROOT / "deploy/k8s/app-with-sidecar.yaml").read_text())
        if d["kind"] == "Deployment"
    )
    (sidecar_container,) = deployment["spec"]["template"]["spec"]["initContainers"]
    assert ports == [sidecar_container["ports"][0]["name"]]
    assert jobs["pushgateway"]["honor_labels"] is True
