"""deploy/: every Kubernetes manifest validates offline against the Kubernetes JSON schemas
(kubernetes-validate, strict: unknown fields fail), the Compose file against the Compose
specification's schema shipped in deploy/compose/, every YAML file passes yamllint, and what
the files say to run is what the tools accept: container commands parse with the real
parsers, every SEG_* variable is an option of some tool, the embedded definitions load. The
example app answers through a real sidecar."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pyroaring import BitMap64
from yamllint import linter
from yamllint.config import YamlLintConfig

from publisher import Publisher
from sidecar.replica import Replica
from sidecar.transport import LogDirTransport
from tests.logtools import SidecarThread

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
COMPOSE = ROOT / "deploy" / "compose" / "compose.yaml"
COMPOSE_SCHEMA = ROOT / "deploy" / "compose" / "compose-spec.json"
EXAMPLE_APP = ROOT / "deploy" / "example" / "app.py"
#: native sidecars (restartPolicy on init containers) are on by default from 1.29
K8S_VERSIONS = ("1.29.0", "1.34.0")


def k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path.name, doc))
    return out


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in k8s_docs() if d["kind"] == kind]


def named(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in by_kind(kind) if d["metadata"]["name"] == name]
    return doc


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]
    if doc["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]["spec"]


# -- lint and schemas ----------------------------------------------------------------------------


def test_every_yaml_file_passes_yamllint() -> None:
    config = YamlLintConfig(file=str(ROOT / ".yamllint"))
    files = sorted(p for p in ROOT.glob("deploy/**/*.y*ml") if p.suffix in (".yaml", ".yml")) + [
        ROOT / ".yamllint"
    ]
    assert len(files) >= 9
    problems = [
        f"{path.relative_to(ROOT)}:{p.line}:{p.column} {p.desc}"
        for path in files
        for p in linter.run(path.read_text(), config, str(path))
    ]
    assert problems == []


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_validate_against_the_schemas(version: str) -> None:
    docs = k8s_docs()
    kinds = {d["kind"] for _, d in docs}
    assert {"Deployment", "CronJob", "Job", "ConfigMap", "Secret", "Service",
            "NetworkPolicy", "PersistentVolumeClaim"} <= kinds  # fmt: skip
    for name, doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{name} {doc['kind']}/{doc['metadata']['name']}: {exc}") from exc


def test_the_k8s_validation_catches_a_misspelt_field() -> None:
    doc = named("Deployment", "offers")
    sidecar = pod_spec(doc)["initContainers"][0]
    sidecar["startupProb"] = sidecar.pop("startupProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)


def test_compose_file_validates_against_the_compose_spec() -> None:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    doc = yaml.safe_load(COMPOSE.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    errors = [f"{list(e.path)}: {e.message}" for e in jsonschema.Draft7Validator(schema)
              .iter_errors(doc)]  # fmt: skip
    assert errors == []
    assert {"kafka", "aerospike", "mongo", "publisher", "sidecar", "offers"} <= set(doc["services"])
    doc["services"]["sidecar"]["healthcheck"]["interval"] = ["5s"]
    assert not jsonschema.Draft7Validator(schema).is_valid(doc)
    assert (
        (COMPOSE_SCHEMA.parent / "compose-spec.LICENSE")
        .read_text()
        .lstrip()
        .startswith("Apache License")
    )


# -- the sidecar as a native sidecar ---------------------------------------------------------


def _arg(args: list[str], option: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in args if a.startswith(option + "=")]
    return value


def test_sidecar_is_a_native_sidecar_sharing_its_socket() -> None:
    spec = pod_spec(named("Deployment", "offers"))
    (sidecar,) = spec["initContainers"]
    (app,) = spec["containers"]
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # the startup window covers 5x the 1B-membership bootstrap estimate (0.5 s + M / 90M/s)
    probe = sidecar["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 5 * (0.5 + 1e9 / 90e6)
    socket_path = _arg(sidecar["args"], "--uds")
    assert _arg(app["args"], "--uds") == socket_path
    mounts = {m["name"]: m["mountPath"] for m in sidecar["volumeMounts"]}
    app_mounts = {m["name"]: m["mountPath"] for m in app["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    shared = [n for n in mounts if n in app_mounts and "emptyDir" in volumes[n]]
    assert len(shared) == 1 and socket_path.startswith(mounts[shared[0]] + "/")
    state = _arg(sidecar["args"], "--state-dir")
    assert any(state == path and "emptyDir" in volumes[n] for n, path in mounts.items())
    port = int(_arg(sidecar["args"], "--http").rpartition(":")[2])
    assert sidecar["ports"][0]["containerPort"] == port
    requests = sidecar["resources"]["requests"]["memory"]
    assert requests.endswith("Mi") and int(requests[:-2]) >= 64 + 100e6 * 1.5 / 2**20


# -- what the files run is what the tools accept ---------------------------------------------------


def _env_options(parser: argparse.ArgumentParser) -> set[str]:
    names = {o.env for o in getattr(parser, "_env_options", ())}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                names |= _env_options(sub)
    return names


def _parsers() -> dict[str, argparse.ArgumentParser]:
    import importlib.util

    from compute.cli import build_parser as compute_parser
    from publisher.cli import build_parser as publish_parser
    from sidecar.cli import build_parser as sidecar_parser

    spec = importlib.util.spec_from_file_location("example_app", EXAMPLE_APP)
    assert spec and spec.loader
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    return {
        "seg-sidecar": sidecar_parser(),
        "seg-publish": publish_parser(),
        "seg-compute": compute_parser(),
        "example-app": app.build_parser(),
    }


def _substitute(args: list[str], env: dict[str, str]) -> list[str]:
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), "x"), a) for a in args]


def _containers() -> Iterator[tuple[str, dict[str, Any], dict[str, str]]]:
    """(where, container, its environment from env and envFrom) of every pod spec."""
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in by_kind("ConfigMap")}
    secrets = {d["metadata"]["name"]: d.get("stringData", {}) for d in by_kind("Secret")}
    for name, doc in k8s_docs():
        if doc["kind"] not in ("Deployment", "CronJob", "Job"):
            continue
        spec = pod_spec(doc)
        for c in spec.get("initContainers", []) + spec["containers"]:
            env: dict[str, str] = {}
            for src in c.get("envFrom", []):
                if "configMapRef" in src:
                    env |= maps[src["configMapRef"]["name"]]
                elif src["secretRef"]["name"] in secrets:
                    env |= secrets[src["secretRef"]["name"]]
            env |= {e["name"]: e.get("value", "x") for e in c.get("env", [])}
            yield f"{name}:{c['name']}", c, env


def _command(c: dict[str, Any]) -> list[str]:
    return [*c.get("command", []), *c.get("args", [])]


def _parse_command(where: str, argv: list[str], parsers: dict[str, Any]) -> str | None:
    """Parse a seg-* (or example app, or submit.sh) command line; the tool's name, or None."""
    if argv[:1] == ["python"] and argv[1].endswith("deploy/example/app.py"):
        tool, rest = "example-app", argv[2:]
    elif argv[0].endswith("deploy/spark/submit.sh"):
        assert argv[1] in ("client", "cluster"), where
        tool, rest = "seg-compute", ["batch", *argv[argv.index("--") + 1 :]]
    elif argv[0].startswith("seg-"):
        tool, rest = argv[0], argv[1:]
    else:
        return None
    try:
        parsers[tool].parse_args(rest)
    except SystemExit as exc:
        raise AssertionError(f"{where}: {tool} {rest} does not parse") from exc
    return tool


def test_k8s_commands_parse_and_every_seg_variable_is_an_option(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parsers = _parsers()
    known = set().union(*(_env_options(p) for p in parsers.values()))
    ran = set()
    for where, c, env in _containers():
        for key in env:
            if key.startswith("SEG_"):
                assert key in known, f"{where}: {key} is no tool's option"
        with monkeypatch.context() as m:  # the container's SEG_* values, as the tool reads them
            for key, value in env.items():
                if key.startswith("SEG_"):
                    m.setenv(key, value)
            tool = _parse_command(where, _substitute(_command(c), env), parsers)
        if tool:
            ran.add((tool, _command(c)[1] if tool == "seg-compute" else ""))
    assert {t for t, _ in ran} == {"seg-sidecar", "seg-publish", "seg-compute", "example-app"}


def test_compose_commands_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    parsers = _parsers()
    known = set().union(*(_env_options(p) for p in parsers.values()))
    doc = yaml.safe_load(COMPOSE.read_text())
    parsed = set()
    for name, service in doc["services"].items():
        env = {k: str(v) for k, v in (service.get("environment") or {}).items()}
        assert all(k in known for k in env if k.startswith("SEG_")), name
        command = service.get("command")
        if not isinstance(command, list) or service.get("entrypoint"):
            continue
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            if _parse_command(name, command, parsers):
                parsed.add(name)
    assert {"sidecar", "offers", "cdc"} <= parsed


def test_embedded_definitions_load() -> None:
    from compute import definitions, rules

    batch = named("ConfigMap", "segments-definitions")["data"]["definitions.toml"]
    assert [s.name for s in definitions.parse(batch, base_params={"as_of": "2026-12-01"})] == [
        "vip_buyers"
    ]
    stream = named("ConfigMap", "segments-stream-definitions")["data"]["stream.toml"]
    assert rules.parse(stream).names == ["cart_abandoners_30m"]


def test_topics_job_sets_compaction_and_retention() -> None:
    (job,) = [d for d in by_kind("Job") if d["metadata"]["name"] == "segments-topics"]
    script = pod_spec(job)["containers"][0]["args"][0]
    deltas, snapshots = script.split('--topic "$SEG_TOPIC_PREFIX.snapshots"')[0:2]
    assert "cleanup.policy=delete" in deltas and "retention.ms=604800000" in deltas
    assert "cleanup.policy=compact" in snapshots
    assert deltas.count('--partitions "$PARTITIONS"') == 1
    assert snapshots.count('--partitions "$PARTITIONS"') == 1


# -- the example app, against a real sidecar -------------------------------------------------------


def _get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_example_app_asks_the_sidecar_over_the_socket(workdir: Path) -> None:
    import socket

    log = LogDirTransport(workdir / "log")
    Publisher(log).publish({"vip_buyers": BitMap64([42, 2**64 - 1])})
    replica = Replica(log, poll_interval=0.01).start()
    assert replica.wait_ready(30)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uds = workdir / "s.sock"
    app = None
    try:
        with SidecarThread(replica, uds_path=uds, http_host=None):
            app = subprocess.Popen(
                [sys.executable, str(EXAMPLE_APP), "--uds", str(uds), "--listen",
                 f"127.0.0.1:{port}", "--discount", "20"],
                stderr=subprocess.PIPE,
            )  # fmt: skip
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while True:
                assert app.poll() is None, app.stderr.read().decode() if app.stderr else ""
                try:
                    urllib.request.urlopen(f"{base}/healthz", timeout=2)
                    break
                except OSError:
                    assert time.monotonic() < deadline, "example app did not start"
                    time.sleep(0.1)
            assert _get(f"{base}/offer?user=42") == (200, {
                "user": 42, "segment": "vip_buyers", "member": True, "discount": 20})  # fmt: skip
            assert _get(f"{base}/offer?user={2**64 - 1}")[1]["member"] is True
            assert _get(f"{base}/offer?user=7")[1] == {
                "user": 7, "segment": "vip_buyers", "member": False, "discount": 0}  # fmt: skip
            assert _get(f"{base}/offer?user=abc")[0] == 400
            status, body = _get(f"{base}/offer?user={2**64}")
            assert status == 400 and "error" in body
        # the sidecar gone: no discount, never an error page
        status, body = _get(f"{base}/offer?user=42")
        assert status == 200 and body["member"] is None and body["discount"] == 0
        assert body["note"].startswith("sidecar:")
    finally:
        if app is not None:
            app.terminate()
            app.wait(10)
        replica.stop(save=False)


# -- the batch job through spark-submit --------------------------------------------------------


@pytest.mark.spark
@pytest.mark.timeout(900)
def test_spark_submit_client_mode_runs_the_batch_and_publishes(tmp_path: Path) -> None:
    """deploy/spark/submit.sh with pyspark's own spark-submit and a local master: the driver
    script, the jars and a session that keeps spark-submit's settings, end to end."""
    import os

    from publisher import read_segment_set

    bin_dir = Path(sys.executable).parent
    lake, out, log = tmp_path / "lake", tmp_path / "segments", tmp_path / "log"
    subprocess.run([str(bin_dir / "seg-compute"), "gen-data", "--out", str(lake), "--users",
                    "300", "--days", "5"], check=True, timeout=300)  # fmt: skip
    env = {**os.environ, "SPARK_SUBMIT": str(bin_dir / "spark-submit"),
           "PYSPARK_PYTHON": sys.executable}  # fmt: skip
    proc = subprocess.run(
        [str(ROOT / "deploy" / "spark" / "submit.sh"), "client", "local[2]",
         "--conf", "spark.executor.memory=512m", "--",
         "--lake", str(lake), "--definitions", str(ROOT / "compute/definitions/example.toml"),
         "--out", str(out), "--publish-log-dir", str(log)],
        capture_output=True, text=True, env=env, timeout=800,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "published to" in proc.stdout
    computed = read_segment_set(out).segments
    assert computed and any(len(b) for b in computed.values())
    replica = Replica(LogDirTransport(log), poll_interval=0.01).start()
    try:
        assert replica.wait_ready(60)
        held = {s: st.bitmap for s, st in replica.engine.segments.items()}
    finally:
        replica.stop(save=False)
    assert held == computed


def test_spark_submit_cluster_mode_command(tmp_path: Path) -> None:
    """Cluster mode needs a Kubernetes API: check the command it hands spark-submit instead."""
    import os

    jars = tmp_path / "jars"
    jars.mkdir()
    for name in ("spark-sql-kafka-0-10_2.13-4.2.0.jar", "hadoop-aws-3.5.0.jar"):
        (jars / name).write_bytes(b"")
    env = {**os.environ, "SPARK_SUBMIT": "echo", "SEG_SPARK_JARS_DIR": str(jars),
           "SEG_IMAGE": "img:1", "SEG_K8S_NAMESPACE": "ns"}  # fmt: skip
    proc = subprocess.run(
        [str(ROOT / "deploy/spark/submit.sh"), "cluster", "k8s://https://api:443",
         "--conf", "spark.executor.instances=2", "--", "--lake", "s3a://l", "--out", "/tmp/o"],
        capture_output=True, text=True, env=env, timeout=60, check=True,
    )  # fmt: skip
    argv = proc.stdout.split()
    assert argv[argv.index("--master") + 1] == "k8s://https://api:443"
    assert argv[argv.index("--deploy-mode") + 1] == "cluster"
    assert argv[argv.index("--jars") + 1] == (
        "local:///opt/spark-jars/hadoop-aws-3.5.0.jar,"
        "local:///opt/spark-jars/spark-sql-kafka-0-10_2.13-4.2.0.jar"
    )
    assert "spark.kubernetes.container.image=img:1" in argv
    assert "spark.kubernetes.namespace=ns" in argv
    driver = argv.index("local:///app/deploy/spark/batch_driver.py")
    assert argv[driver + 1 :] == ["--lake", "s3a://l", "--out", "/tmp/o"]
    assert "spark.executor.instances=2" in argv[:driver]
    bad = subprocess.run([str(ROOT / "deploy/spark/submit.sh"), "sideways", "x"],
                         capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and "usage" in bad.stderr
