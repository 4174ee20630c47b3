"""The librdkafka client configuration compute's Kafka clients share (gen-events, cdc)."""

from __future__ import annotations

import logging

#: where librdkafka's own log lines go (a broker that refuses connections logs one every
#: reconnect): a logger with no output of its own, so a command's one-line error stands alone
#: and an application that configures logging still sees them
KAFKA_LOG = logging.getLogger("compute.kafka")
KAFKA_LOG.addHandler(logging.NullHandler())


def kafka_config(bootstrap: str, **conf: object) -> dict[str, object]:
    """A librdkafka client's configuration for compute's clients: `conf` over the broker and
    the logger (`KAFKA_LOG`)."""
    return {"bootstrap.servers": bootstrap, "logger": KAFKA_LOG, **conf}
