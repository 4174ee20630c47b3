"""The librdkafka client configuration compute's Kafka clients share (gen-events, cdc, the
stream job's topic check), and the Java client's security settings derived from it (Spark's
Kafka source in the stream job)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

#: where librdkafka's own log lines go (a broker that refuses connections logs one every
#: reconnect): a logger with no output of its own, so a command's one-line error stands alone
#: and an application that configures logging still sees them
KAFKA_LOG = logging.getLogger("compute.kafka")
KAFKA_LOG.addHandler(logging.NullHandler())


def kafka_config(bootstrap: str, **conf: object) -> dict[str, object]:
    """A librdkafka client's configuration for compute's clients: `conf` over the broker and
    the logger (`KAFKA_LOG`)."""
    return {"bootstrap.servers": bootstrap, "logger": KAFKA_LOG, **conf}


#: SASL mechanisms whose librdkafka username and password make a Java client's JAAS login
_LOGIN_MODULES = {
    "PLAIN": "org.apache.kafka.common.security.plain.PlainLoginModule",
    "SCRAM-SHA-256": "org.apache.kafka.common.security.scram.ScramLoginModule",
    "SCRAM-SHA-512": "org.apache.kafka.common.security.scram.ScramLoginModule",
}


def _jaas_quoted(value: str) -> str:
    # Kafka's JaasConfig reads values with java.io.StreamTokenizer: \ escapes inside quotes.
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def java_security_settings(librdkafka: Mapping[str, str]) -> dict[str, str]:
    """The Java Kafka client's settings (Spark's Kafka source) for the credentials and TLS in
    librdkafka's: security.protocol; sasl.mechanism(s) PLAIN or SCRAM-SHA-256/512 with
    sasl.username and sasl.password as sasl.jaas.config; ssl.ca.location (a PEM file) or
    ssl.ca.pem as a PEM truststore; ssl.endpoint.identification.algorithm. Other settings are
    the librdkafka client's own and not carried. ValueError, one line, for a security setting
    with no such translation (Kerberos, OAUTHBEARER, client certificates, ...)."""
    out: dict[str, str] = {}
    rest = dict(librdkafka)
    protocol = rest.pop("security.protocol", None)
    if protocol is not None:
        out["security.protocol"] = protocol.upper()  # librdkafka takes sasl_ssl, Java SASL_SSL
    # librdkafka's name and its alias
    mechanism = rest.pop("sasl.mechanisms", None) or rest.pop("sasl.mechanism", None)
    rest.pop("sasl.mechanism", None)
    user, password = rest.pop("sasl.username", None), rest.pop("sasl.password", None)
    if mechanism is not None:
        out["sasl.mechanism"] = mechanism
    if user is not None or password is not None:
        module = _LOGIN_MODULES.get((mechanism or "").upper())
        if module is None:
            raise ValueError(
                f"sasl.username and sasl.password make a Java login for sasl.mechanisms "
                f"{', '.join(_LOGIN_MODULES)}, not {mechanism or 'the default (GSSAPI)'}"
            )
        if user is None or password is None:
            raise ValueError("sasl.username and sasl.password go together")
        out["sasl.jaas.config"] = (
            f"{module} required username={_jaas_quoted(user)} password={_jaas_quoted(password)};"
        )
    ca = rest.pop("ssl.ca.location", None)
    if ca is not None:
        if not Path(ca).is_file():
            raise ValueError(f"ssl.ca.location {ca}: a Java client takes a PEM file, not this")
        out |= {"ssl.truststore.type": "PEM", "ssl.truststore.location": ca}
    pem = rest.pop("ssl.ca.pem", None)
    if pem is not None:
        out |= {"ssl.truststore.type": "PEM", "ssl.truststore.certificates": pem}
    check = rest.pop("ssl.endpoint.identification.algorithm", None)
    if check is not None:
        out["ssl.endpoint.identification.algorithm"] = "" if check == "none" else check
    untranslated = sorted(k for k in rest if k.startswith(("sasl.", "ssl.", "enable.ssl.")))
    if untranslated:
        raise ValueError(f"{untranslated[0]} has no Java client setting derived from it")
    return out
