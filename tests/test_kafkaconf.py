"""The Java client's security settings derived from librdkafka's (compute/kafkaconf.py), and
`seg-compute stream` refusing what it cannot derive before anything starts. Spark's Kafka
source reading with derived settings: tests/test_compute_stream.py (SASL and TLS brokers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from compute.kafkaconf import java_security_settings
from compute.stream import with_derived_security
from tests.kafka_fixture import SaslBroker

PLAIN = "org.apache.kafka.common.security.plain.PlainLoginModule"
SCRAM = "org.apache.kafka.common.security.scram.ScramLoginModule"


def test_plain_credentials_become_the_java_login_the_sasl_broker_takes() -> None:
    broker = SaslBroker("127.0.0.1:1", "seg", "seg-secret")
    assert java_security_settings(broker.librdkafka()) == broker.java()


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_scram_credentials_use_the_scram_login(mechanism: str) -> None:
    got = java_security_settings({"security.protocol": "sasl_ssl", "sasl.mechanism": mechanism,
                                  "sasl.username": "u", "sasl.password": "p"})  # fmt: skip
    assert got == {"security.protocol": "SASL_SSL", "sasl.mechanism": mechanism,
                   "sasl.jaas.config": f'{SCRAM} required username="u" password="p";'}  # fmt: skip


def test_quotes_and_backslashes_in_a_password_are_escaped_for_jaas() -> None:
    got = java_security_settings({"security.protocol": "SASL_PLAINTEXT", "sasl.mechanisms": "PLAIN",
                                  "sasl.username": 'a"b', "sasl.password": 'x\\y"z'})  # fmt: skip
    assert got["sasl.jaas.config"] == f'{PLAIN} required username="a\\"b" password="x\\\\y\\"z";'


def test_a_pem_ca_becomes_a_pem_truststore_and_none_turns_host_checks_off(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    got = java_security_settings({"security.protocol": "SSL", "ssl.ca.location": str(ca),
                                  "ssl.endpoint.identification.algorithm": "none"})  # fmt: skip
    assert got == {"security.protocol": "SSL", "ssl.truststore.type": "PEM",
                   "ssl.truststore.location": str(ca),
                   "ssl.endpoint.identification.algorithm": ""}  # fmt: skip
    inline = java_security_settings({"ssl.ca.pem": "PEM"})
    assert inline == {"ssl.truststore.type": "PEM", "ssl.truststore.certificates": "PEM"}


def test_the_mechanism_s_alias_is_read_too() -> None:
    both = {"sasl.mechanisms": "PLAIN", "sasl.mechanism": "PLAIN"}
    assert java_security_settings(both) == {"sasl.mechanism": "PLAIN"}
    assert java_security_settings({"sasl.mechanism": "SCRAM-SHA-256"}) == {
        "sasl.mechanism": "SCRAM-SHA-256"
    }


def test_the_librdkafka_client_s_own_settings_are_not_carried() -> None:
    assert java_security_settings({"client.id": "x", "socket.timeout.ms": "100"}) == {}


@pytest.mark.parametrize(
    ("settings", "error"),
    [
        ({"sasl.mechanisms": "GSSAPI", "sasl.username": "u", "sasl.password": "p"},
         "make a Java login for sasl.mechanisms PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, not GSSAPI"),
        ({"sasl.username": "u", "sasl.password": "p"}, "not the default (GSSAPI)"),
        ({"sasl.mechanisms": "PLAIN", "sasl.username": "u"},
         "sasl.username and sasl.password go together"),
        ({"sasl.mechanisms": "OAUTHBEARER", "sasl.oauthbearer.config": "principal=x"},
         "sasl.oauthbearer.config has no Java client setting derived from it"),
        ({"security.protocol": "SSL", "ssl.key.location": "/k.pem", "ssl.certificate.location":
          "/c.pem"}, "ssl.certificate.location has no Java client setting derived from it"),
        ({"enable.ssl.certificate.verification": "false"},
         "enable.ssl.certificate.verification has no Java client setting derived from it"),
        ({"ssl.ca.location": "/nonexistent/ca.pem"},
         "ssl.ca.location /nonexistent/ca.pem: a Java client takes a PEM file, not this"),
    ],
)  # fmt: skip
def test_a_security_setting_with_no_java_translation_is_refused(
    settings: dict[str, str], error: str
) -> None:
    with pytest.raises(ValueError) as raised:
        java_security_settings(settings)
    assert error in str(raised.value)


def test_the_source_s_own_settings_win_and_its_security_protocol_turns_derivation_off() -> None:
    client = {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanisms": "PLAIN",
              "sasl.username": "u", "sasl.password": "p"}  # fmt: skip
    derived = with_derived_security({"sasl.mechanism": "SCRAM-SHA-256", "fetch.min.bytes": "1"},
                                    client)  # fmt: skip
    assert derived["sasl.mechanism"] == "SCRAM-SHA-256"
    assert derived["fetch.min.bytes"] == "1"
    assert derived["sasl.jaas.config"].startswith(PLAIN)
    own = {"security.protocol": "SSL", "ssl.truststore.location": "/t.p12"}
    assert with_derived_security(own, client | {"ssl.key.location": "/k"}) == own


def test_the_stream_refuses_an_underivable_setting_before_it_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from compute import cli as compute_cli
    from tests.test_compute_stream import DEFINITIONS

    definitions = tmp_path / "defs.toml"
    definitions.write_text(DEFINITIONS)
    oauth = ["--events-kafka-config", "sasl.mechanisms=OAUTHBEARER",
             "--events-kafka-config", "sasl.oauthbearer.config=principal=x"]  # fmt: skip
    code = compute_cli.main(["stream", "--events-kafka", "127.0.0.1:1", "--events-topic", "e",
                             "--definitions", str(definitions), "--publish-log-dir",
                             str(tmp_path / "log"), "--checkpoint", str(tmp_path / "ckpt"),
                             *oauth])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert err == ("seg-compute stream: error: --events-kafka-config (SEG_EVENTS_KAFKA_CONFIG): "
                   "sasl.oauthbearer.config has no Java client setting derived from it: give "
                   "Spark's Kafka source its settings with --events-source-config\n")  # fmt: skip
    assert not (tmp_path / "ckpt").exists()
