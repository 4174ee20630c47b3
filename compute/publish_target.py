"""Where `batch --publish-*` and `stream` publish: the segment log (Kafka or a log directory),
plus Aerospike when given. One definition of these options for both commands: the kit's log
option group with the `publish-` prefix (`--publish-kafka`, `--publish-log-dir`, and the
shared `--topic-prefix`, `--kafka-config`)."""

from __future__ import annotations

import argparse

from sidecar.cliutil import Parser, add_aerospike_options, add_log_options, transport_from_args
from sidecar.transport.base import Transport

PREFIX = "publish-"


def add_publish_options(p: Parser, *, required: bool, aerospike: bool = False) -> None:
    add_log_options(p, prefix=PREFIX, required=required, title="publish")
    if aerospike:
        # the same Aerospike options as seg-publish and seg-sidecar, prefixed
        add_aerospike_options(p, prefix=PREFIX, title="publish to Aerospike too")


def publish_transport(args: argparse.Namespace, *, required: bool = True) -> Transport | None:
    """The log chosen by --publish-kafka / --publish-log-dir (None when neither and not
    required)."""
    return transport_from_args(args, prefix=PREFIX, required=required)
