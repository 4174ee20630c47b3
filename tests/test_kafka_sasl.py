"""A hosted Kafka's SASL (docs/OPERATIONS.md): `seg-publish` and `seg-sidecar` with
`--kafka-config` against a real broker whose only client listener is SASL_PLAINTEXT/PLAIN
(the `sasl_kafka` fixture, deploy/local/sasl.properties). The right password publishes and
the sidecar answers what was published; a wrong one fails at once with the broker's reason
and changes nothing; a setting librdkafka refuses is bad input (exit 2) before any connection,
for the compute jobs' Kafka flags too.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from pyroaring import BitMap64

from sidecar.transport.base import TransportError
from sidecar.transport.kafka import KafkaTransport
from tests.kafka_fixture import SaslBroker
from tests.test_end_to_end import Sidecar

pytestmark = pytest.mark.kafka

BIN = Path(sys.executable).parent
MEMBERS = BitMap64([3, 17, 2**40 + 5])


def _segment_set(where: Path) -> Path:
    where.mkdir()
    (where / "vip.roaring").write_bytes(MEMBERS.serialize())
    (where / "manifest.json").write_text(json.dumps({
        "format": 1, "computed_at": "2026-12-01T00:00:00Z",
        "segments": {"vip": {"file": "vip.roaring", "cardinality": len(MEMBERS)}},
    }))  # fmt: skip
    return where


def _config_args(settings: dict[str, str]) -> list[str]:
    return [arg for key, value in settings.items() for arg in ("--kafka-config", f"{key}={value}")]


def test_publish_and_replay_over_sasl(
    sasl_kafka: SaslBroker, topic_prefix: str, tmp_path: Path
) -> None:
    log = ["--kafka", sasl_kafka.address, "--topic-prefix", topic_prefix,
           *_config_args(sasl_kafka.librdkafka())]  # fmt: skip
    publish_and_replay(log, tmp_path)


def publish_and_replay(log: list[str], tmp_path: Path) -> None:
    """`seg-publish` the segment set with the Kafka flags `log`, then a sidecar with the same
    flags answers its members, and only them (tests/test_kafka_tls.py too)."""
    segments = _segment_set(tmp_path / "set")
    done = subprocess.run([str(BIN / "seg-publish"), "--input", str(segments), *log, "--quiet"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    sidecar = Sidecar(log, tmp_path).start()
    try:
        with sidecar.client() as client:
            users = [*MEMBERS, 4, 2**40 + 6]
            assert [client.check(u, "vip") for u in users] == [u in MEMBERS for u in users]
    finally:
        assert sidecar.stop() == 0


def test_a_wrong_password_fails_at_once_with_the_broker_s_reason_and_publishes_nothing(
    sasl_kafka: SaslBroker, topic_prefix: str, tmp_path: Path
) -> None:
    wrong = sasl_kafka.librdkafka(password="not-" + sasl_kafka.password)
    started = time.monotonic()
    done = subprocess.run(
        [str(BIN / "seg-publish"), "--input", str(_segment_set(tmp_path / "set")),
         "--kafka", sasl_kafka.address, "--topic-prefix", topic_prefix, *_config_args(wrong)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    took = time.monotonic() - started
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("seg-publish: error: the broker refused this client: ")
    assert "Authentication failed" in last
    assert took < 60  # not a transport timeout per retry (the refusal comes in ~0.3 s)
    # nothing of it on the broker: not even the topics
    with pytest.raises(TransportError, match="does not exist"):
        KafkaTransport(sasl_kafka.address, topic_prefix, sasl_kafka.librdkafka()).partition_count()


def test_a_sidecar_refused_by_the_broker_says_so_and_is_not_ready(
    sasl_kafka: SaslBroker, topic_prefix: str, tmp_path: Path
) -> None:
    wrong = sasl_kafka.librdkafka(password="not-" + sasl_kafka.password)
    sidecar = Sidecar(["--kafka", sasl_kafka.address, "--topic-prefix", topic_prefix,
                       *_config_args(wrong)], tmp_path)  # fmt: skip
    proc = subprocess.Popen(
        [str(BIN / "seg-sidecar"), *sidecar.log_args, "--uds", str(sidecar.uds), "--http",
         f"127.0.0.1:{sidecar.port}", "--state-dir", str(sidecar.state)],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    sidecar.proc = proc  # type: ignore[assignment]
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 60
        seen = ""
        while "the broker refused this client" not in seen:
            assert time.monotonic() < deadline, f"no refusal logged: {seen[-2000:]}"
            seen += proc.stderr.readline()
        assert "Authentication failed" in seen.splitlines()[-1]
        with pytest.raises(urllib.error.HTTPError) as not_ready:
            urllib.request.urlopen(f"http://127.0.0.1:{sidecar.port}/readyz", timeout=10)
        assert not_ready.value.code == 503
        doc = json.loads(not_ready.value.read())
        assert doc["ready"] is False and "the broker refused this client" in doc["error"]
    finally:
        assert sidecar.stop() == 0


@pytest.mark.parametrize(
    ("setting", "reason"),
    [
        ("security.protocol=SASL_PLAINTEXT,sasl.mechanisms=PLAIN",
         'Invalid value "SASL_PLAINTEXT,sasl.mechanisms=PLAIN" for configuration property '
         '"security.protocol"'),
        ("sasl.mechanism.typo=PLAIN", 'No such configuration property: "sasl.mechanism.typo"'),
    ],
)  # fmt: skip
@pytest.mark.parametrize("command", ["seg-publish", "seg-sidecar"])
def test_a_setting_librdkafka_refuses_is_bad_input(
    command: str, setting: str, reason: str, tmp_path: Path
) -> None:
    args = ["--input", str(_segment_set(tmp_path / "set"))] if command == "seg-publish" else [
        "--uds", str(tmp_path / "s.sock"), "--state-dir", str(tmp_path / "state")]  # fmt: skip
    done = subprocess.run(
        [str(BIN / command), *args, "--kafka", "127.0.0.1:1", "--kafka-config", setting],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == f"{command}: error: --kafka-config (SEG_KAFKA_CONFIG): {reason}\n"
    assert not (tmp_path / "state").exists() and not (tmp_path / "s.sock").exists()


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["cdc", "--mongo", "mongodb://127.0.0.1:1/?replicaSet=rs0", "--db", "shop",
          "--collections", "orders", "--cdc-kafka", "127.0.0.1:1"], "--cdc-kafka-config"),
        (["gen-events", "--events-kafka", "127.0.0.1:1", "--events-topic", "e", "--count", "1"],
         "--events-kafka-config"),
    ],
)  # fmt: skip
def test_a_compute_job_s_refused_setting_is_bad_input(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from compute import cli as compute_cli

    assert compute_cli.main([*argv, flag, "sasl.mechanism.typo=PLAIN"]) == 2
    env = "SEG_" + flag.lstrip("-").replace("-", "_").upper()
    assert capsys.readouterr().err == (
        f"seg-compute {argv[0]}: error: {flag} ({env}): "
        'No such configuration property: "sasl.mechanism.typo"\n'
    )
