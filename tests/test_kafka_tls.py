"""A hosted Kafka's TLS (docs/OPERATIONS.md): `seg-publish` and `seg-sidecar` with
`--kafka-config security.protocol=SSL` against a real broker whose only client listener is SSL
(the `tls_kafka` fixture, a self-signed certificate made by keytool). Trusting the broker's
certificate publishes and the sidecar answers what was published; trusting another one fails at
once with the handshake's reason (librdkafka's `_SSL`, one of the transport's REFUSALS) and
creates nothing.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from tests.kafka_fixture import TlsBroker
from tests.test_kafka_sasl import _config_args, _segment_set, publish_and_replay

pytestmark = pytest.mark.kafka

BIN = Path(sys.executable).parent


def test_publish_and_replay_over_tls(
    tls_kafka: TlsBroker, topic_prefix: str, tmp_path: Path
) -> None:
    log = ["--kafka", tls_kafka.address, "--topic-prefix", topic_prefix,
           *_config_args(tls_kafka.librdkafka())]  # fmt: skip
    publish_and_replay(log, tmp_path)


def test_a_certificate_the_client_does_not_trust_is_refused_at_once(
    tls_kafka: TlsBroker, topic_prefix: str, tmp_path: Path
) -> None:
    started = time.monotonic()
    done = subprocess.run(
        [str(BIN / "seg-publish"), "--input", str(_segment_set(tmp_path / "set")),
         "--kafka", tls_kafka.address, "--topic-prefix", topic_prefix,
         *_config_args(tls_kafka.librdkafka(ca=tls_kafka.other_ca))],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    took = time.monotonic() - started
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("seg-publish: error: the broker refused this client: "), done.stderr
    assert "SSL handshake failed" in last and "certificate verify failed" in last, last
    assert took < 60  # not a transport timeout per retry
    admin = AdminClient({"bootstrap.servers": tls_kafka.address, **tls_kafka.librdkafka()})
    topics = admin.list_topics(timeout=30).topics
    assert not [t for t in topics if t.startswith(f"{topic_prefix}.")]
