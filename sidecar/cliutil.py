"""The command-line kit of every tool (seg-sidecar, seg-publish, seg-compute, seg-perf): the
parser, the option types, the shared option groups and the one-line error convention.

Rules it owns:

- Every long option `--some-option` also reads the environment variable `SEG_SOME_OPTION`
  (`--help` names it). The variable's text is taken exactly as the same text after the flag
  would be: the same type check and choices, and an error names the variable. A flag
  (`store_true`) reads yes/true/on/1 or no/false/off/0/''; a repeatable option splits the
  variable on commas.
- The command line wins over the environment, option by option. Options of one exclusive set
  (`Parser.exclusive`, e.g. the log's `--kafka` / `--log-dir`) go further: one given on the
  command line silences the environment values of the others, so `SEG_KAFKA=... seg-publish
  --log-dir D` publishes to D.
- Errors are one line on stderr, `PROG: error: REASON`. Exit status 2 for bad usage or input
  (argparse's own errors included), 1 for a failure while running, others as a tool documents.

An option group is a pair of functions, `add_<group>_options(parser, ...)` and
`<thing>_from_args(args, ...)`, like `add_log_options` / `transport_from_args` below.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

if TYPE_CHECKING:
    from .transport.base import Transport

USAGE = 2  # exit status of bad usage or input
FAILURE = 1  # exit status of a failure while running
DIST = "segments"  # the distribution name in pyproject.toml (for `pip install 'DIST[extra]'`)
FIRST_PARTY = frozenset({"sidecar", "publisher", "compute", "perf"})

T = TypeVar("T")


class CommandError(Exception):
    """A reason to stop, printed as one line; `code` is the exit status (2: bad input)."""

    def __init__(self, message: str, code: int = USAGE) -> None:
        super().__init__(message)
        self.code = code


def env_name(option: str) -> str:
    """`--topic-prefix` -> `SEG_TOPIC_PREFIX`."""
    return "SEG_" + option.lstrip("-").replace("-", "_").upper()


def dest_of(option: str) -> str:
    """`--topic-prefix` -> `topic_prefix` (argparse's attribute name)."""
    return option.lstrip("-").replace("-", "_")


# -- option types --------------------------------------------------------------------------------


def arg_type(expected: str) -> Callable[[Callable[[str], T]], Callable[[str], T]]:
    """Make `convert` an option type: a ValueError or TypeError it raises is reported as
    `expected <expected>, got 'TEXT'`, for a flag and for its environment variable alike."""

    def wrap(convert: Callable[[str], T]) -> Callable[[str], T]:
        @functools.wraps(convert)
        def parse(text: str) -> T:
            try:
                return convert(text)
            except (ValueError, TypeError):
                raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None

        return parse

    return wrap


def _number(kind: Callable[[str], T], expected: str, ok: Callable[[T], bool]) -> Callable[[str], T]:
    @arg_type(expected)
    def parse(text: str) -> T:
        value = kind(text)
        if not ok(value):
            raise ValueError(text)
        return value

    return parse


positive_int = _number(int, "a positive integer", lambda v: v > 0)
non_negative_int = _number(int, "a non-negative integer", lambda v: v >= 0)
positive_float = _number(float, "a positive number", lambda v: 0 < v < math.inf)
non_negative_float = _number(float, "a non-negative number", lambda v: 0 <= v < math.inf)


@arg_type("an octal file mode 0..777")
def octal_mode(text: str) -> int:
    mode = int(text, 8)
    if not 0 <= mode <= 0o777:
        raise ValueError(text)
    return mode


@arg_type("a port 0..65535")
def port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise ValueError(text)
    return int(text)


@arg_type("HOST:PORT")
def host_port(text: str) -> tuple[str, int]:
    """`HOST:PORT`, IPv6 as `[::1]:PORT`; port 0 asks for a free one where that means
    something (a server's listen address)."""
    host, sep, number = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(text)  # a bare IPv6 address: where would the port be?
    if not sep or not host or not number.isdigit() or int(number) > 65535:
        raise ValueError(text)
    return host, int(number)


@arg_type("a directory (made when missing), not a file")
def directory(text: str) -> str:
    """A directory the command writes in: refused at once when a file is in the way (it
    would fail later, in another thread, as a traceback)."""
    if text and os.path.exists(text) and not os.path.isdir(text):
        raise ValueError(text)
    return text


_YES, _NO = ("yes", "true", "on", "1"), ("no", "false", "off", "0", "")


@arg_type("yes or no")
def yes_no(text: str) -> bool:
    word = text.strip().lower()
    if word not in _YES + _NO:
        raise ValueError(text)
    return word in _YES


@arg_type("KEY=VALUE")
def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(text)
    return key.strip(), value.strip()


iso_date = arg_type("a date YYYY-MM-DD")(dt.date.fromisoformat)


def off_or(convert: Callable[[str], T]) -> Callable[[str], T | None]:
    """`convert`, except that '' means "off" (None)."""

    @functools.wraps(convert)
    def parse(text: str) -> T | None:
        return None if text == "" else convert(text)

    return parse


# -- the parser ----------------------------------------------------------------------------------

_UNSET: Any = type("_Unset", (), {"__repr__": lambda self: "<not given>"})()
_ENV_ACTIONS = {None: "value", "store": "value", "store_true": "flag", "append": "list"}


@dataclass(frozen=True)
class _EnvOption:
    dest: str
    flag: str
    env: str
    kind: str  # value | flag | list
    type: Callable[[str], Any] | None
    choices: Sequence[Any] | None
    default: Any
    required: bool


class Parser(argparse.ArgumentParser):
    """argparse with the kit's rules (module docstring): SEG_* defaults resolved after the
    command line through the options' own types, and one-line errors; for its own options
    and those of its argument groups alike."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._env_options: list[_EnvOption] = []  # before super(): it adds --help
        self._exclusive: list[frozenset[str]] = []
        self._groups_wrapped = False  # super() makes its own two groups with the plain method
        super().__init__(*args, **kwargs)
        self._groups_wrapped = True

    def add_argument(self, *flags: str, **kwargs: Any) -> argparse.Action:
        return self._add(super().add_argument, flags, kwargs)

    def add_argument_group(self, *args: Any, **kwargs: Any) -> Any:
        group = super().add_argument_group(*args, **kwargs)
        return Group(self, group) if self._groups_wrapped else group

    def exclusive(self, *flags: str) -> None:
        """At most one of these is meant to be given: one on the command line silences the
        environment values of the others (the check that one was given is the caller's)."""
        self._exclusive.append(frozenset(dest_of(f) for f in flags))

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE, f"{self.prog}: error: {' '.join(message.splitlines())}\n")

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        namespace, extras = super().parse_known_args(args, namespace)
        self._resolve(namespace)
        return namespace, extras

    def _add(self, add: Callable[..., argparse.Action], flags: Sequence[str], kwargs: Any) -> Any:
        longs = [f for f in flags if f.startswith("--")]
        action = kwargs.get("action")
        if not longs or action in ("help", "version"):
            return add(*flags, **kwargs)
        if action not in _ENV_ACTIONS:
            raise TypeError(f"{longs[0]}: action {action!r} has no environment form")
        kind = _ENV_ACTIONS[action]
        name = env_name(longs[0])
        empty = {"flag": False, "list": []}.get(kind)
        default = kwargs.pop("default", empty)
        required = kwargs.pop("required", False)
        if kwargs.get("help") != argparse.SUPPRESS:
            kwargs["help"] = _help(kwargs.get("help"), default, name, kind)
        # "Not on the command line" must be told apart from any real value: a sentinel
        # (append starts from None, since it appends to the default).
        made = add(*flags, default=None if kind == "list" else _UNSET, **kwargs)
        self._env_options.append(
            _EnvOption(made.dest, longs[0], name, kind, made.type, made.choices, default, required)
        )
        return made

    def _resolve(self, ns: argparse.Namespace) -> None:
        given = {o.dest for o in self._env_options if _given(o, getattr(ns, o.dest, _UNSET))}
        silenced = {d for s in self._exclusive if s & given for d in s - given}
        missing = []
        for o in self._env_options:
            if o.dest in given:
                continue
            raw = None if o.dest in silenced else os.environ.get(o.env)
            if raw is not None:
                value = self._from_env(o, raw)
            elif o.kind == "value" and isinstance(o.default, str) and o.type is not None:
                value = o.type(o.default)  # as argparse treats a string default
            else:
                value = list(o.default) if o.kind == "list" else o.default
            if o.required and value is None:
                missing.append(f"{o.flag} (or {o.env})")
            setattr(ns, o.dest, value)
        if missing:
            self.error(f"the following arguments are required: {', '.join(missing)}")

    def _from_env(self, o: _EnvOption, raw: str) -> Any:
        try:
            if o.kind == "flag":
                return yes_no(raw)
            if o.kind == "list":
                return [_convert(o, item.strip()) for item in raw.split(",") if item.strip()]
            return _convert(o, raw)
        except argparse.ArgumentTypeError as exc:
            self.error(f"{o.env}: {exc}")


class Group:
    """An argument group of a `Parser`: its options follow the parser's environment rules."""

    def __init__(self, parser: Parser, group: argparse._ArgumentGroup) -> None:
        self._parser, self._group = parser, group

    def add_argument(self, *flags: str, **kwargs: Any) -> argparse.Action:
        return self._parser._add(self._group.add_argument, flags, kwargs)


def _given(o: _EnvOption, value: Any) -> bool:
    return value is not None if o.kind == "list" else value is not _UNSET


def _convert(o: _EnvOption, text: str) -> Any:
    try:
        value = o.type(text) if o.type is not None else text
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"invalid value {text!r}") from None
    if o.choices is not None and value not in o.choices:
        choices = ", ".join(map(repr, o.choices))
        raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from {choices})")
    return value


def _help(text: str | None, default: Any, env: str, kind: str) -> str:
    """The help line plus the default (unless the text already says it) and the variable."""
    text = text or ""
    shown = not (default is None or default is False or default == [])  # 0 is worth showing
    if shown and "default" not in text:
        text += f" (default: {default})".replace("%", "%%")
    return f"{text} [env: {env}{', split on commas' if kind == 'list' else ''}]".strip()


# -- running a command ---------------------------------------------------------------------------


def report(prog: str, message: str, code: int) -> int:
    """Print the one-line reason; returns `code`."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    print(f"{prog}: error: {lines[0] if lines else 'failed'}", file=sys.stderr)
    return code


def missing_extra(exc: ModuleNotFoundError, extra: str) -> str | None:
    """The reason to give when a module of an optional extra is missing (None when the
    missing module is one of ours: that is a bug, not an install problem)."""
    top = (exc.name or "").partition(".")[0]
    if not top or top in FIRST_PARTY:
        return None
    return f"module {top!r} is missing: install the {extra} extra (pip install '{DIST}[{extra}]')"


@contextmanager
def exits_on_error(prog: str, *, extra: str | None = None) -> Iterator[None]:
    """Turn a CommandError (and, with `extra`, a missing module of that extra) into its
    one-line reason and SystemExit with its status."""
    try:
        yield
    except CommandError as exc:
        raise SystemExit(report(prog, str(exc), exc.code)) from None
    except ModuleNotFoundError as exc:
        reason = missing_extra(exc, extra) if extra else None
        if reason is None:
            raise
        raise SystemExit(report(prog, reason, USAGE)) from None


# -- the log option group ------------------------------------------------------------------------


def add_log_options(
    parser: Parser, *, prefix: str = "", required: bool = True, title: str = "log"
) -> None:
    """Where the segment log is: `--{prefix}kafka` or `--{prefix}log-dir` (exclusive), with
    the Kafka settings `--topic-prefix` and `--kafka-config` (unprefixed: one log, one set of
    settings, whichever tool talks to it)."""
    kafka, log_dir = f"--{prefix}kafka", f"--{prefix}log-dir"
    how = "exactly one" if required else "at most one"
    group = parser.add_argument_group(f"{title} ({how} of {kafka} or {log_dir})")
    group.add_argument(kafka, metavar="HOST:PORT", help="Kafka bootstrap servers of the log")
    group.add_argument(
        "--topic-prefix",
        default="segments",
        metavar="P",
        help="the log's topics are P.deltas and P.snapshots",
    )
    group.add_argument(
        "--kafka-config",
        action="append",
        type=key_value,
        metavar="KEY=VALUE",
        help="extra librdkafka setting of the log's clients (SASL, SSL, ...); repeatable",
    )
    group.add_argument(
        "--kafka-identity-check",
        type=positive_float,
        metavar="SECONDS",
        help="how often a reader of the log asks the broker for the topics' ids, to see them "
        "deleted and created again (one metadata request each; default 2)",
    )
    group.add_argument(log_dir, metavar="DIR", help="the embedded log directory")
    parser.exclusive(kafka, log_dir)


def transport_from_args(
    args: argparse.Namespace, *, prefix: str = "", required: bool = True
) -> Transport | None:
    """The log chosen by `add_log_options(prefix=...)`; None when neither was given and
    `required` is false."""
    kafka_flag, dir_flag = f"--{prefix}kafka", f"--{prefix}log-dir"
    kafka, log_dir = getattr(args, dest_of(kafka_flag)), getattr(args, dest_of(dir_flag))
    if not kafka and not log_dir and not required:
        return None
    if bool(kafka) == bool(log_dir):
        raise CommandError(
            f"give exactly one of {kafka_flag} HOST:PORT or {dir_flag} DIR "
            f"(or {env_name(kafka_flag)} / {env_name(dir_flag)})"
        )
    if log_dir:
        from .transport.logdir import LogDirTransport

        return LogDirTransport(log_dir)
    from .transport.kafka import KafkaTransport

    every = args.kafka_identity_check
    return KafkaTransport(
        kafka,
        args.topic_prefix,
        kafka_client_settings(args.kafka_config, "--kafka-config"),
        **({} if every is None else {"identity_check_s": every}),
    )


def kafka_client_settings(pairs: Iterable[tuple[str, str]] | None, flag: str) -> dict[str, str]:
    """`flag`'s KEY=VALUE pairs (librdkafka's names: SASL, SSL, ...) as a Kafka client's extra
    settings; CommandError naming the flag when librdkafka refuses one (no such property, a
    bad value), checked with no broker: nothing connects."""
    from .transport.kafka import check_client_config

    settings = dict(pairs or ())
    try:
        check_client_config(settings)
    except ValueError as e:
        raise CommandError(f"{flag} ({env_name(flag)}): {e}") from None
    return settings


# -- the Aerospike option group ------------------------------------------------------------------


@arg_type("HOST:PORT[,HOST:PORT...]")
def aerospike_hosts(text: str) -> list[tuple[str, int]]:
    from .aerospike_layout import parse_hosts

    return parse_hosts(text)


def add_aerospike_options(parser: Parser, *, prefix: str = "", title: str = "Aerospike") -> None:
    """Where the user records live (DESIGN.md "Aerospike layout"): `--{prefix}aerospike` seed
    hosts, namespace, set, bin, user and password, TLS name. One definition for seg-sidecar,
    seg-publish and the compute jobs' publish options, so a publisher and a sidecar can always
    be configured alike."""
    from .aerospike_layout import BIN, NAMESPACE, SET

    opt = f"--{prefix}aerospike"
    group = parser.add_argument_group(title)
    group.add_argument(
        opt, type=aerospike_hosts, metavar="HOST:PORT[,...]", help="Aerospike seed hosts"
    )
    group.add_argument(f"{opt}-namespace", default=NAMESPACE, metavar="NS", help="namespace")
    group.add_argument(f"{opt}-set", default=SET, metavar="SET", help="set")
    group.add_argument(f"{opt}-bin", default=BIN, metavar="BIN", help="bin of the segment map")
    group.add_argument(f"{opt}-user", metavar="USER", help="user name (security enabled)")
    group.add_argument(
        f"{opt}-password", metavar="PASSWORD", help="password (prefer the environment variable)"
    )
    group.add_argument(
        f"{opt}-tls-name", metavar="NAME", help="TLS name of the servers (enables TLS)"
    )


def aerospike_target_from_args(args: argparse.Namespace, *, prefix: str = "") -> Any:
    """The `sidecar.aerospike_layout.AerospikeTarget` that `add_aerospike_options(prefix=...)`
    names, or None without `--{prefix}aerospike`."""
    from .aerospike_layout import AerospikeTarget

    name = dest_of(f"--{prefix}aerospike")
    hosts = getattr(args, name)
    if not hosts:
        return None
    return AerospikeTarget(
        hosts,
        namespace=getattr(args, f"{name}_namespace"),
        set_name=getattr(args, f"{name}_set"),
        bin_name=getattr(args, f"{name}_bin"),
        user=getattr(args, f"{name}_user"),
        password=getattr(args, f"{name}_password"),
        tls_name=getattr(args, f"{name}_tls_name"),
    )
