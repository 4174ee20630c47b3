"""Where `batch --publish` and `stream` publish: the segment log (Kafka or a log directory),
plus Aerospike when given. One definition of these options for both commands."""

from __future__ import annotations

import argparse
from pathlib import Path

from compute.cli import UsageError, _option
from sidecar.transport.base import Transport


def add_publish_options(p: argparse.ArgumentParser, *, aerospike: bool = False) -> None:
    _option(p, "--publish-kafka", "publish to the segment log on this Kafka",
            metavar="HOST:PORT")  # fmt: skip
    _option(p, "--topic-prefix", "segment log topics are PREFIX.deltas and PREFIX.snapshots",
            default="segments", metavar="P")  # fmt: skip
    _option(p, "--publish-log-dir", "publish to this log directory instead",
            convert=Path, expected="a path", metavar="DIR")  # fmt: skip
    if aerospike:
        _option(p, "--publish-aerospike", "also write the user records to this Aerospike",
                metavar="HOST:PORT")  # fmt: skip


def publish_transport(args: argparse.Namespace, *, required: bool = True) -> Transport | None:
    """The log chosen by --publish-kafka / --publish-log-dir (None when neither and not
    required)."""
    if not args.publish_kafka and not args.publish_log_dir and not required:
        return None
    if bool(args.publish_kafka) == bool(args.publish_log_dir):
        raise UsageError("give exactly one of --publish-kafka HOST:PORT or --publish-log-dir DIR")
    if args.publish_kafka:
        from sidecar.transport.kafka import KafkaTransport

        return KafkaTransport(args.publish_kafka, args.topic_prefix)
    from sidecar.transport.logdir import LogDirTransport

    return LogDirTransport(args.publish_log_dir)
