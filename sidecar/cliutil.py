"""What every command-line tool shares: options from SEG_* environment variables, the log
transport chosen by --kafka / --log-dir, and a one-line exit on bad input."""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from .transport.base import Transport


def env_name(option: str) -> str:
    """`--topic-prefix` -> `SEG_TOPIC_PREFIX`."""
    return "SEG_" + option.lstrip("-").replace("-", "_").upper()


def apply_env_defaults(parser: argparse.ArgumentParser) -> None:
    """Let every long option default to its SEG_<OPTION> environment variable, and say so in
    --help. Flags read 1/true/yes; repeatable options split the variable on commas."""
    for action in parser._actions:  # argparse has no public iterator over its actions
        longs = [o for o in action.option_strings if o.startswith("--")]
        if not longs or action.dest == "help":
            continue
        name = env_name(longs[0])
        action.help = f"{action.help or ''} [env {name}]".strip()
        raw = os.environ.get(name)
        if raw is None:
            continue
        if isinstance(action, argparse._StoreTrueAction):
            action.default = raw.strip().lower() in ("1", "true", "yes", "on")
        elif isinstance(action, argparse._AppendAction):
            action.default = [v for v in raw.split(",") if v]
        else:
            action.default = action.type(raw) if callable(action.type) else raw
            action.required = False


def add_log_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("log (exactly one of --kafka or --log-dir)")
    group.add_argument("--kafka", metavar="HOST:PORT", help="Kafka bootstrap servers")
    group.add_argument(
        "--topic-prefix", default="segments", help="topics are PREFIX.deltas and PREFIX.snapshots"
    )
    group.add_argument(
        "--kafka-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra librdkafka setting (SASL, SSL, ...); repeatable",
    )
    group.add_argument("--log-dir", metavar="DIR", help="the embedded log directory")


def transport_from_args(args: argparse.Namespace) -> Transport:
    if bool(args.kafka) == bool(args.log_dir):
        fail("give exactly one of --kafka HOST:PORT or --log-dir DIR")
    if args.log_dir:
        from .transport.logdir import LogDirTransport

        return LogDirTransport(args.log_dir)
    config = {}
    for item in args.kafka_config:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"--kafka-config takes KEY=VALUE, got {item!r}")
        config[key.strip()] = value.strip()
    from .transport.kafka import KafkaTransport

    return KafkaTransport(args.kafka, args.topic_prefix, config)


def fail(message: str, code: int = 2) -> NoReturn:
    """Exit with a one-line reason."""
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "seg"
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(code)
