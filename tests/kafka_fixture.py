"""Pytest plugin: a real single-node Apache Kafka 4.x broker (KRaft) for the test session.

Registered in ``tests/conftest.py`` with ``pytest_plugins = ["tests.kafka_fixture"]``.

* ``kafka_bootstrap`` (session): ``"127.0.0.1:PORT"`` of a broker started with
  ``deploy/local/kafka up --data <per-session tmp dir>`` and stopped (``down``) at session
  end. If the broker cannot start the fixture FAILS with the script's stderr and the broker
  log tail; it never skips. With ``SEG_TEST_KAFKA=HOST:PORT`` set, that broker is used and
  nothing is started. The broker is started with ``--owner-pid`` = this process, so a
  killed pytest run does not leave it behind. Each xdist worker (`./run test` runs two) is a
  session of its own, with its own broker.
* ``sasl_kafka`` (session, on first use): a second broker whose client listener takes
  SASL_PLAINTEXT/PLAIN only (``deploy/local/sasl.properties``), as a ``SaslBroker``.
* ``tls_kafka`` (session, on first use): a third, its client listener SSL only, with a
  self-signed certificate made by keytool, as a ``TlsBroker``.
* ``topic_prefix`` (function): a unique prefix such as ``t1a2b3c4d5e`` for the test's topics,
  transactional ids and group ids (the broker is shared by the whole session).

Broker settings: deploy/local/server.properties.template (auto topic creation off, replication
factor 1, message.max.bytes 8 MiB). Create topics explicitly with the AdminClient.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from uuid import uuid4

import pytest

REPO_DIR = Path(__file__).resolve().parent.parent
KAFKA_SCRIPT = REPO_DIR / "deploy" / "local" / "kafka"
SASL_PROPERTIES = REPO_DIR / "deploy" / "local" / "sasl.properties"
EXTERNAL_BROKER_ENV = "SEG_TEST_KAFKA"
# The first `up` on a machine resolves the jars with Maven; the script's own readiness
# timeout is 120 s.
UP_TIMEOUT_S = 420
DOWN_TIMEOUT_S = 90
_ADDRESS = re.compile(r"127\.0\.0\.1:\d+")


def _tail(path: Path, lines: int = 50) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no broker log: {exc})"


def _down(data: Path) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(
            [str(KAFKA_SCRIPT), "down", "--data", str(data)],
            capture_output=True,
            text=True,
            timeout=DOWN_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None


def start_broker(data: Path, config: Path | None = None) -> str:
    """Runs ``deploy/local/kafka up`` for ``data`` (with ``--config``, extra broker
    properties); returns the address or calls pytest.fail."""
    cmd = [str(KAFKA_SCRIPT), "up", "--data", str(data), "--owner-pid", str(os.getpid())]
    cmd += ["--config", str(config)] if config is not None else []
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=UP_TIMEOUT_S, check=False
        )
        returncode, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        returncode = None
        stdout = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else ""
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
    lines = stdout.strip().splitlines()
    if returncode == 0 and lines and _ADDRESS.fullmatch(lines[-1].strip()):
        return lines[-1].strip()
    # Keep the log: `down` deletes the data dir.
    log = data / "broker.log"
    kept = data.parent / f"{data.name}-failed-broker.log"
    if log.exists():
        shutil.copyfile(log, kept)
    tail = _tail(log)
    _down(data)
    status = "timed out" if returncode is None else f"exited {returncode}"
    pytest.fail(
        f"Kafka broker did not start: `{' '.join(cmd)}` {status}.\n"
        f"--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}\n"
        f"--- broker log tail ({kept}) ---\n{tail}",
        pytrace=False,
    )


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get(EXTERNAL_BROKER_ENV, "").strip()
    if external:
        yield external
        return
    data = tmp_path_factory.mktemp("kafka")
    address = start_broker(data)
    try:
        yield address
    finally:
        result = _down(data)
        if result is None or result.returncode != 0:
            detail = "timed out" if result is None else result.stderr
            raise RuntimeError(f"deploy/local/kafka down --data {data} failed: {detail}")


@dataclass(frozen=True)
class SaslBroker:
    """A broker whose only client listener is SASL_PLAINTEXT with PLAIN (deploy/local/
    sasl.properties), and the settings of its user `seg` for both kinds of client."""

    address: str
    user: str
    password: str

    def librdkafka(self, password: str | None = None) -> dict[str, str]:
        """`--kafka-config` settings (librdkafka's names): the clients of the log, cdc."""
        return {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanisms": "PLAIN",
                "sasl.username": self.user, "sasl.password": password or self.password}  # fmt: skip

    def java(self) -> dict[str, str]:
        """Spark's Kafka source's settings (the Java client's names): `--sink-kafka-config`."""
        login = "org.apache.kafka.common.security.plain.PlainLoginModule"
        return {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "PLAIN",
                "sasl.jaas.config": f'{login} required username="{self.user}" '
                f'password="{self.password}";'}  # fmt: skip


@pytest.fixture(scope="session")
def sasl_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SaslBroker]:
    """A second broker, SASL only, started on first use (tests/test_kafka_sasl.py, the sink)."""
    users = dict(re.findall(r'user_(\w+)="([^"]*)"', SASL_PROPERTIES.read_text()))
    data = tmp_path_factory.mktemp("kafka-sasl")
    address = start_broker(data, SASL_PROPERTIES)
    try:
        yield SaslBroker(address, "seg", users["seg"])
    finally:
        _down(data)


@dataclass(frozen=True)
class TlsBroker:
    """A broker whose only client listener is SSL, with a self-signed certificate for
    127.0.0.1 (`ca`, PEM), and another such certificate it was not signed with (`other_ca`)."""

    address: str
    ca: Path
    other_ca: Path

    def librdkafka(self, ca: Path | None = None) -> dict[str, str]:
        """`--kafka-config` settings (librdkafka's names) trusting `ca` (default: the right one)."""
        return {"security.protocol": "SSL", "ssl.ca.location": str(ca or self.ca)}


_STORE_PASSWORD = "seg-test"  # the keystores of a throwaway broker on loopback


def _keytool(keytool: str, store: Path, *args: str) -> None:
    store_args = ["-keystore", str(store), "-storetype", "PKCS12", "-storepass", _STORE_PASSWORD]
    subprocess.run([keytool, *args, *store_args], check=True, capture_output=True, timeout=120)


def _self_signed(keytool: str, store: Path, pem: Path) -> None:
    """A PKCS12 keystore with a new RSA key and its self-signed certificate for 127.0.0.1,
    the certificate also written to `pem`."""
    key = ["-keyalg", "RSA", "-keysize", "2048", "-validity", "7"]
    name = ["-dname", "CN=127.0.0.1", "-ext", "SAN=ip:127.0.0.1"]
    _keytool(keytool, store, "-genkeypair", "-alias", "broker", *key, *name)
    _keytool(keytool, store, "-exportcert", "-alias", "broker", "-rfc", "-file", str(pem))


@pytest.fixture(scope="session")
def tls_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    """A third broker, TLS only, started on first use (tests/test_kafka_tls.py): its keystore
    and truststore made with the JDK's keytool, its properties written next to them."""
    keytool = shutil.which("keytool", path=os.path.dirname(shutil.which("java") or ""))
    keytool = keytool or shutil.which("keytool")
    assert keytool, "no keytool beside java: the TLS broker needs one (a JDK has it)"
    certs = tmp_path_factory.mktemp("kafka-tls-certs")
    keystore, ca, other = certs / "broker.p12", certs / "ca.pem", certs / "other-ca.pem"
    _self_signed(keytool, keystore, ca)
    _self_signed(keytool, certs / "other.p12", other)
    truststore = certs / "trust.p12"  # the broker's own certificate: its inter-broker client
    _keytool(keytool, truststore, "-importcert", "-noprompt", "-alias", "broker", "-file", str(ca))
    config = certs / "tls.properties"
    config.write_text(
        "listeners=SSL://127.0.0.1:@PORT@,CONTROLLER://127.0.0.1:@CONTROLLER_PORT@\n"
        "advertised.listeners=SSL://127.0.0.1:@PORT@\n"
        "inter.broker.listener.name=SSL\n"
        "listener.security.protocol.map=SSL:SSL,CONTROLLER:PLAINTEXT\n"
        f"ssl.keystore.type=PKCS12\nssl.keystore.location={keystore}\n"
        f"ssl.keystore.password={_STORE_PASSWORD}\nssl.key.password={_STORE_PASSWORD}\n"
        f"ssl.truststore.type=PKCS12\nssl.truststore.location={truststore}\n"
        f"ssl.truststore.password={_STORE_PASSWORD}\n"
    )
    data = tmp_path_factory.mktemp("kafka-tls")
    address = start_broker(data, config)
    try:
        yield TlsBroker(address, ca, other)
    finally:
        _down(data)


@pytest.fixture
def topic_prefix() -> str:
    return f"t{uuid4().hex[:10]}"
