"""The command-line kit (sidecar/cliutil.py) as the four tools use it: bad flags, bad
environment values, negative counts and SEG_* variables meant for another tool, run as the
real console scripts; the kit's rules in-process; the option types as properties."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tomllib
from argparse import ArgumentTypeError
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from compute import cli as compute_cli
from perf import cli as perf_cli
from publisher import cli as publish_cli
from sidecar import cli as sidecar_cli
from sidecar import cliutil
from sidecar.cliutil import Parser, env_name

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """A console script with no SEG_* variable but those given."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SEG_")}
    return subprocess.run(
        [str(BIN / argv[0]), *argv[1:]],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def one_line_error(done: subprocess.CompletedProcess[str], prog: str) -> str:
    """The single stderr line of a usage error (exit 2), without its `prog: error: `."""
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    return lines[0].removeprefix(f"{prog}: error: ")


# -- the console scripts -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "prog"),
    [
        (["seg-sidecar", "--log-dir", "/nonexistent", "--bogus"], "seg-sidecar"),
        (["seg-publish", "--drop", "x", "--bogus"], "seg-publish"),
        (["seg-compute", "gen-data", "--out", "x", "--users", "5", "--bogus"], "seg-compute"),
        (["seg-compute", "no-such-command"], "seg-compute"),
        (["seg-perf", "report", "--bogus"], "seg-perf"),
    ],
)
def test_a_bad_flag_is_one_line_not_the_usage(argv: list[str], prog: str) -> None:
    message = one_line_error(run(*argv), prog)
    assert "--bogus" in message or "no-such-command" in message


@pytest.mark.parametrize(
    ("argv", "env", "prog"),
    [
        (["seg-publish", "--drop", "x"], {"SEG_PARTITIONS": "abc"}, "seg-publish"),
        (["seg-publish", "--drop", "x"], {"SEG_SNAPSHOT_EVERY": "-1"}, "seg-publish"),
        (["seg-publish", "--drop", "x"], {"SEG_KAFKA_CONFIG": "a=1,nokey"}, "seg-publish"),
        (["seg-publish", "--drop", "x"], {"SEG_QUIET": "perhaps"}, "seg-publish"),
        (["seg-sidecar", "--log-dir", "/nonexistent"], {"SEG_MAX_FRAME": "0"}, "seg-sidecar"),
        (["seg-sidecar", "--log-dir", "/nonexistent"], {"SEG_HTTP": "nohost"}, "seg-sidecar"),
        (["seg-sidecar", "--log-dir", "/nonexistent"], {"SEG_LOG_LEVEL": "loud"}, "seg-sidecar"),
        (["seg-compute", "gen-data", "--out", "x"], {"SEG_USERS": "-3"}, "seg-compute gen-data"),
        (["seg-compute", "stream"], {"SEG_STARTING_OFFSETS": "middle"}, "seg-compute stream"),
        (["seg-perf", "report"], {"SEG_SOURCE": "carrier-pigeon"}, "seg-perf"),
    ],
)
def test_a_bad_environment_value_names_the_variable(
    argv: list[str], env: dict[str, str], prog: str
) -> None:
    (name,) = env
    message = one_line_error(run(*argv, env=env), prog)
    assert message.startswith(f"{name}: "), message


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["seg-publish", "--drop", "x", "--partitions", "-3"], "--partitions"),
        (["seg-publish", "--drop", "x", "--partitions", "0"], "--partitions"),
        (["seg-publish", "--drop", "x", "--snapshot-every", "-1"], "--snapshot-every"),
        (["seg-sidecar", "--max-body", "-5"], "--max-body"),
        (["seg-sidecar", "--checkpoint-interval", "-1"], "--checkpoint-interval"),
        (["seg-compute", "gen-data", "--out", "{log}", "--users", "-3"], "--users"),
        (
            ["seg-compute", "gen-events", "--events-kafka", "h:1", "--topic", "t", "--count", "-3"],
            "--count",
        ),
    ],  # fmt: skip
)
def test_a_negative_count_is_refused_and_nothing_written(
    argv: list[str], flag: str, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    argv = [str(log) if a == "{log}" else a for a in argv]
    if argv[0] != "seg-compute":
        argv += ["--log-dir", str(log)]
    prog = " ".join(argv[:2]) if argv[0] == "seg-compute" else argv[0]
    message = one_line_error(run(*argv), prog)
    assert message.startswith(f"argument {flag}: expected a positive "), message
    assert not log.exists()


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["seg-sidecar", "--http", "", "--uds", "{dir}/s.sock"], "--state-dir"),
        (["seg-publish", "--drop", "x"], "--publisher-state-dir"),
        (["seg-perf", "report", "--report", "{dir}/r.md"], "--out"),
        (["seg-compute", "gen-data", "--users", "5"], "--out"),
        (["seg-compute", "batch", "--lake", "{dir}", "--definitions", "{dir}/d.toml"], "--out"),
    ],
)
@pytest.mark.parametrize("from_env", [False, True])
def test_a_state_directory_that_is_a_file_is_refused_at_once(
    argv: list[str], option: str, from_env: bool, tmp_path: Path
) -> None:
    """Before: a traceback from the checkpoint-reading thread, and the sidecar kept running."""
    in_the_way = tmp_path / "file"
    in_the_way.write_text("")
    log = tmp_path / "log"
    argv = [a.replace("{dir}", str(tmp_path)) for a in argv]
    if argv[0] not in ("seg-perf", "seg-compute"):
        argv += ["--log-dir", str(log)]
    env = {env_name(option): str(in_the_way)} if from_env else None
    if not from_env:
        argv += [option, str(in_the_way)]
    prog = " ".join(argv[:2]) if argv[0] == "seg-compute" else argv[0]
    message = one_line_error(run(*argv, env=env), prog)
    shown = env_name(option) if from_env else f"argument {option}"
    assert message == f"{shown}: expected a directory (made when missing), not a file, got " + repr(
        str(in_the_way)
    )
    assert not log.exists() and not (tmp_path / "r.md").exists()


def test_gen_events_with_kafka_unreachable_is_one_line() -> None:
    """Before: librdkafka's own `%3|...|FAIL|...` lines came first, one a reconnect."""
    done = run("seg-compute", "gen-events", "--events-kafka", "127.0.0.1:1", "--events-topic",
               "t", "--count", "1")  # fmt: skip
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("seg-compute gen-events: error: "), done.stderr


def test_seg_kafka_set_for_another_tool_does_not_break_this_one(tmp_path: Path) -> None:
    """SEG_KAFKA names the segment log's broker (seg-publish, seg-sidecar); an explicit
    --log-dir wins over it, and seg-compute's events broker is SEG_EVENTS_KAFKA."""
    log = tmp_path / "log"
    done = run("seg-publish", "--log-dir", str(log), "--drop", "x", env={"SEG_KAFKA": "h:1"})
    assert done.returncode == 0, done.stderr
    assert f"published to log directory {log}" in done.stdout
    assert json.loads((log / "meta.json").read_text())["partitions"] >= 1
    # seg-compute does not take SEG_KAFKA for its events broker ...
    done = run("seg-compute", "gen-events", "--events-topic", "t", env={"SEG_KAFKA": "h:1"})
    message = one_line_error(done, "seg-compute gen-events")
    assert message == "the following arguments are required: --events-kafka (or SEG_EVENTS_KAFKA)"
    # ... nor does seg-publish take seg-compute's
    again = run("seg-publish", "--drop", "x", env={"SEG_EVENTS_KAFKA": "h:1"})
    assert "give exactly one of --kafka HOST:PORT or --log-dir DIR" in one_line_error(
        again, "seg-publish"
    )


def test_an_explicit_flag_of_an_exclusive_set_wins_over_the_environment(tmp_path: Path) -> None:
    chosen, other = tmp_path / "chosen", tmp_path / "other"
    env = {"SEG_LOG_DIR": str(other), "SEG_PARTITIONS": "3"}
    done = run("seg-publish", "--log-dir", str(chosen), "--drop", "x", env=env)
    assert done.returncode == 0, done.stderr
    assert not other.exists()
    # SEG_PARTITIONS went through the same type as --partitions
    assert json.loads((chosen / "meta.json").read_text())["partitions"] == 3
    # both from the environment: no flag decides, so it is an error
    both = run("seg-publish", "--drop", "x", env={"SEG_LOG_DIR": str(other), "SEG_KAFKA": "h:1"})
    assert "give exactly one of" in one_line_error(both, "seg-publish")
    assert not other.exists()


_BLOCK_EXTRA = """
import importlib.abc, sys
class NoExtra(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {"numpy", "pyarrow", "pyspark", "pymongo"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoExtra())
from compute.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("argv", [["gen-data", "--out", "x", "--users", "5"], ["--help"]])
def test_seg_compute_without_the_compute_extra_says_which_to_install(argv: list[str]) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SEG_")}
    done = subprocess.run(
        [sys.executable, "-c", _BLOCK_EXTRA, *argv],
        env=clean, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    message = one_line_error(done, "seg-compute")
    assert message.endswith("install the compute extra (pip install 'segments[compute]')")
    assert "Traceback" not in done.stderr


def test_the_distribution_name_is_pyproject_s() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == cliutil.DIST
    assert "numpy" in " ".join(project["optional-dependencies"]["compute"])


# -- --help --------------------------------------------------------------------------------------

COMPUTE_COMMANDS = ["gen-data", "gen-events", "batch", "stream", "cdc", "sink"]


HELP_COMMANDS = [
    (sidecar_cli.main, []),
    (publish_cli.main, []),
    (perf_cli.main, []),
    *((compute_cli.main, [command]) for command in COMPUTE_COMMANDS),
]


@pytest.mark.parametrize(("main", "argv"), HELP_COMMANDS)
def test_help_names_the_variable_of_every_option(
    main, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    options = set(re.findall(r"\[(--[a-z][\w-]*)", text))  # from the usage line
    assert len(options) >= 4, text
    for option in options:
        assert f"[env: {env_name(option)}" in " ".join(text.split()), option


#: Every variable more than one command reads, and why it means the same thing in each.
SHARED = {
    "SEG_KAFKA": "the segment log's broker",
    "SEG_LOG_DIR": "the segment log's directory",
    "SEG_TOPIC_PREFIX": "the segment log's topics",
    "SEG_KAFKA_CONFIG": "the segment log's client settings",
    "SEG_KAFKA_IDENTITY_CHECK": "how often the segment log's readers ask for its topics' ids",
    "SEG_PUBLISH_KAFKA": "the log the compute jobs publish to",
    "SEG_PUBLISH_LOG_DIR": "the log directory the compute jobs publish to",
    "SEG_AEROSPIKE": "the Aerospike seeds",
    "SEG_AEROSPIKE_NAMESPACE": "the Aerospike namespace",
    "SEG_AEROSPIKE_SET": "the Aerospike set (one option group: sidecar/cliutil.py)",
    "SEG_AEROSPIKE_BIN": "the Aerospike bin",
    "SEG_AEROSPIKE_USER": "the Aerospike user",
    "SEG_AEROSPIKE_PASSWORD": "the Aerospike password",
    "SEG_AEROSPIKE_TLS_NAME": "the Aerospike TLS name",
    "SEG_EVENTS_KAFKA": "the events broker",
    "SEG_EVENTS_TOPIC": "the events topic",
    "SEG_EVENTS_KAFKA_CONFIG": "the events topic's librdkafka settings (gen-events, stream)",
    "SEG_USERS": "the synthetic user count",
    "SEG_SEED": "the generators' seed",
    "SEG_AS_OF": "the lake's day",
    "SEG_DEFINITIONS": "the definitions file (one file may hold both kinds)",
    "SEG_MASTER": "the Spark session",
    "SEG_SHUFFLE_PARTITIONS": "the Spark session",
    "SEG_DRIVER_MEMORY": "the Spark session",
    "SEG_LAKE": "the data lake (batch reads it, sink writes it)",
    "SEG_S3_ENDPOINT": "the lake's S3",
    "SEG_S3_PATH_STYLE": "the lake's S3",
    "SEG_S3_REGION": "the lake's S3",
    "SEG_CDC_TOPIC_PREFIX": "the CDC topics' prefix (cdc writes them, sink reads them)",
    "SEG_OUT": "NOT the same: each command's own output directory (set it per command)",
}


def _env_names(main, argv: list[str], capsys: pytest.CaptureFixture[str]) -> set[str]:
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return set(re.findall(r"\[env: (SEG_\w+)", " ".join(capsys.readouterr().out.split())))


def test_a_variable_two_commands_read_means_the_same_in_both(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The SEG_KAFKA bug class: a variable set for one tool must not mean something else to
    another (seg-compute's events broker was SEG_KAFKA, its stream writer id SEG_WRITER_ID)."""
    readers: dict[str, set[str]] = {}
    for main, argv in HELP_COMMANDS:
        for name in _env_names(main, argv, capsys):
            readers.setdefault(name, set()).add(" ".join([main.__module__, *argv]))
    shared = {name for name, commands in readers.items() if len(commands) > 1}
    assert shared == set(SHARED), {n: sorted(readers[n]) for n in shared ^ set(SHARED)}


def test_the_events_broker_and_the_log_have_their_own_variables(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for command in ("gen-events", "stream"):
        with pytest.raises(SystemExit):
            compute_cli.main([command, "--help"])
        text = capsys.readouterr().out
        assert "--events-kafka" in text and "SEG_EVENTS_KAFKA" in text
        assert "SEG_KAFKA]" not in text.replace("\n", " ")
    with pytest.raises(SystemExit):
        compute_cli.main(["stream", "--help"])
    assert "SEG_KAFKA_CONFIG" in capsys.readouterr().out  # the publish options' setting


# -- the compute CLI's modules -------------------------------------------------------------------


def test_the_compute_cli_modules_import_in_one_direction() -> None:
    """compute/cli.py uses stream_cli and publish_target; neither imports it back."""
    for name in ("stream_cli", "publish_target"):
        tree = ast.parse((ROOT / "compute" / f"{name}.py").read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):  # `from compute import cli` too
                imported |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        assert "compute.cli" not in imported, name


# -- the kit's rules, in-process -----------------------------------------------------------------


def _kit_parser() -> Parser:
    p = Parser(prog="kit")
    p.add_argument("--count", type=cliutil.positive_int, default=1)
    p.add_argument("--name", required=True)
    p.add_argument("--tag", action="append")
    p.add_argument("--fast", action="store_true")
    p.add_argument("--level", type=str.upper, choices=["LOW", "HIGH"], default="low")
    cliutil.add_log_options(p)
    return p


def test_environment_defaults_follow_the_documented_rules(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in [k for k in os.environ if k.startswith("SEG_")]:
        monkeypatch.delenv(name)
    args = _kit_parser().parse_args(["--name", "n"])
    assert (args.count, args.tag, args.fast, args.level) == (1, [], False, "LOW")
    assert args.kafka_config == []
    env = {"SEG_COUNT": "7", "SEG_NAME": "from-env", "SEG_TAG": "a, b,,c", "SEG_FAST": "yes",
           "SEG_LEVEL": "high", "SEG_KAFKA_CONFIG": "sasl.x=1,y = 2",
           "SEG_KAFKA": "h:1", "SEG_LOG_DIR": "/d"}  # fmt: skip
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = _kit_parser().parse_args([])
    assert (args.count, args.name, args.tag, args.fast, args.level) == (
        7, "from-env", ["a", "b", "c"], True, "HIGH")  # fmt: skip
    assert args.kafka_config == [("sasl.x", "1"), ("y", "2")]
    assert (args.kafka, args.log_dir) == ("h:1", "/d")  # no flag of the set: both stay
    # the command line wins, option by option (a repeatable one is replaced, not extended)
    args = _kit_parser().parse_args(["--count", "2", "--tag", "z", "--log-dir", "/mine"])
    assert (args.count, args.name, args.tag, args.fast) == (2, "from-env", ["z"], True)
    assert (args.kafka, args.log_dir) == (None, "/mine")  # the set's env value is silenced
    transport = cliutil.transport_from_args(args)
    assert transport.describe() == "log directory /mine"
    monkeypatch.setenv("SEG_FAST", "0")
    assert _kit_parser().parse_args([]).fast is False
    monkeypatch.delenv("SEG_NAME")
    with pytest.raises(SystemExit) as exit_:
        _kit_parser().parse_args([])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (
        "kit: error: the following arguments are required: --name (or SEG_NAME)\n"
    )


def test_the_kafka_identity_check_interval_reaches_the_transport(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from sidecar.transport.kafka import IDENTITY_CHECK_S

    for name in [k for k in os.environ if k.startswith("SEG_")]:
        monkeypatch.delenv(name)
    base = ["--name", "n", "--kafka", "h:1"]
    args = _kit_parser().parse_args(base)
    assert cliutil.transport_from_args(args).identity_check_s == IDENTITY_CHECK_S
    args = _kit_parser().parse_args([*base, "--kafka-identity-check", "30"])
    assert cliutil.transport_from_args(args).identity_check_s == 30.0
    monkeypatch.setenv("SEG_KAFKA_IDENTITY_CHECK", "0.5")
    assert cliutil.transport_from_args(_kit_parser().parse_args(base)).identity_check_s == 0.5
    for bad in ["0", "-1", "inf", "soon"]:
        with pytest.raises(SystemExit) as exit_:
            _kit_parser().parse_args([*base, "--kafka-identity-check", bad])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "--kafka-identity-check" in err and "a positive number" in err
        assert err.count("\n") == 1


def test_the_help_shows_the_default_and_the_variable() -> None:
    text = " ".join(_kit_parser().format_help().split())
    assert "--count COUNT (default: 1) [env: SEG_COUNT]" in text
    assert "--tag TAG [env: SEG_TAG, split on commas]" in text


# -- the option types ----------------------------------------------------------------------------


@given(st.integers())
def test_positive_int_takes_exactly_the_positive_integers(n: int) -> None:
    if n > 0:
        assert cliutil.positive_int(str(n)) == n
    else:
        with pytest.raises(ArgumentTypeError, match="expected a positive integer"):
            cliutil.positive_int(str(n))


@given(
    st.one_of(
        st.from_regex(r"[a-z0-9][a-z0-9.-]{0,20}", fullmatch=True),
        st.ip_addresses(v=4).map(str),
        st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
    ),
    st.integers(0, 65535),
)
def test_host_port_round_trips(host: str, port: int) -> None:
    assert cliutil.host_port(f"{host}:{port}") == (host.strip("[]"), port)


@pytest.mark.parametrize("text", ["h", "h:", ":1", "h:65536", "h:-1", "::1:80", "h:1x", "[::1]"])
def test_host_port_refuses(text: str) -> None:
    with pytest.raises(ArgumentTypeError, match="expected HOST:PORT"):
        cliutil.host_port(text)


@given(st.integers(0, 0o777))
def test_octal_modes_round_trip(mode: int) -> None:
    assert cliutil.octal_mode(f"{mode:o}") == cliutil.octal_mode(f"0{mode:03o}") == mode


@pytest.mark.parametrize("text", ["999", "1000", "8", "-1", "rw"])
def test_octal_mode_refuses(text: str) -> None:
    with pytest.raises(ArgumentTypeError, match="octal"):
        cliutil.octal_mode(text)
