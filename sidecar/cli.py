"""`seg-sidecar`: replay the segment log into memory and serve checks over a Unix socket and
HTTP, falling back to Aerospike for what the replica cannot answer.

Every option can also come from the environment as SEG_<OPTION> (e.g. SEG_LOG_DIR,
SEG_HTTP). Defaults: --uds /tmp/seg-sidecar/sidecar.sock and --http 127.0.0.1:8571; an empty
value (`--uds ''`, `--http ''`) turns that server off. The replica is also published for
readers on the host (`--shm`, docs/SHARED_REPLICA.md) beside the socket unless `--shm ''`.
The HTTP server also serves the operators' page at /ui unless --no-ui. SIGTERM or SIGINT shuts down
gracefully: stop accepting, finish in-flight requests, write a checkpoint (with
--state-dir), exit 0. Logs are JSON lines on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import json
import logging
import signal
import sys
from typing import Any

from .cliutil import (
    FAILURE,
    CommandError,
    Parser,
    add_aerospike_options,
    add_log_options,
    aerospike_target_from_args,
    directory,
    exits_on_error,
    host_port,
    octal_mode,
    off_or,
    positive_float,
    positive_int,
    report,
    transport_from_args,
)
from .fallback.base import Fallback
from .protocol import DEFAULT_MAX_FRAME
from .server.app import DEFAULT_UDS, ServerOptions, serve
from .server.http import DEFAULT_MAX_BODY, DEFAULT_TIMEOUTS, HttpTimeouts
from .server.uds import SocketPathError

log = logging.getLogger("sidecar")

DEFAULT_HTTP = "127.0.0.1:8571"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg (and exc when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, tz=dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def build_parser() -> Parser:
    p = Parser(
        prog="seg-sidecar",
        description=(
            "Replay the segment log into in-memory roaring bitmaps and answer membership "
            "checks over a Unix socket (protocol v1) and HTTP."
        ),
    )
    add_log_options(p)
    srv = p.add_argument_group("servers")
    srv.add_argument(
        "--uds",
        default=DEFAULT_UDS,
        metavar="PATH",
        help=f"Unix socket path ('' turns it off; default {DEFAULT_UDS})",
    )
    srv.add_argument(
        "--http",
        type=off_or(host_port),
        default=DEFAULT_HTTP,
        metavar="HOST:PORT",
        help=f"HTTP address ('' turns it off; default {DEFAULT_HTTP}; port 0 picks a free one)",
    )
    srv.add_argument(
        "--no-ui",
        action="store_true",
        help="do not serve the operators' page at /ui on the HTTP address",
    )
    srv.add_argument(
        "--socket-mode",
        type=octal_mode,
        default=0o660,
        metavar="MODE",
        help="socket file mode (default 0660)",
    )
    srv.add_argument(
        "--shm",
        metavar="DIR",
        help=(
            "publish the replica for readers on this host (sidecar.client.SharedReplica) in DIR "
            "('' turns it off; default: beside the socket, <socket path minus suffix>.shm; "
            "a tmpfs such as /dev/shm keeps it off the disk)"
        ),
    )
    srv.add_argument(
        "--max-frame",
        type=positive_int,
        default=DEFAULT_MAX_FRAME,
        metavar="BYTES",
        help="largest Unix-socket frame (default 1 MiB)",
    )
    srv.add_argument(
        "--max-body",
        type=positive_int,
        default=DEFAULT_MAX_BODY,
        metavar="BYTES",
        help="largest HTTP request body (default 1 MiB)",
    )
    srv.add_argument(
        "--http-idle-timeout",
        type=positive_float,
        default=DEFAULT_TIMEOUTS.idle,
        metavar="SECONDS",
        help=(
            "close an HTTP connection with no complete request head this long after it opened "
            f"or after its last response: idle keep-alive and slow headers (default "
            f"{DEFAULT_TIMEOUTS.idle:g})"
        ),
    )
    srv.add_argument(
        "--http-body-timeout",
        type=positive_float,
        default=DEFAULT_TIMEOUTS.body,
        metavar="SECONDS",
        help=f"answer 408 to a request body not read this fast (default {DEFAULT_TIMEOUTS.body:g})",
    )
    rep = p.add_argument_group("replica")
    rep.add_argument(
        "--state-dir", type=directory, metavar="DIR", help="where checkpoints are written"
    )
    rep.add_argument(
        "--checkpoint-interval",
        type=positive_float,
        default=60.0,
        metavar="SECONDS",
        help="checkpoint period with --state-dir (default 60)",
    )
    rep.add_argument(
        "--segments",
        metavar="GLOB,...",
        help="hold only segments matching these globs; the rest is asked of the fallback",
    )
    add_aerospike_options(p, title="Aerospike fallback")
    p.add_argument(
        "--fallback-budget-ms",
        type=positive_float,
        default=5.0,
        metavar="MS",
        help='time budget of one fallback lookup (default 5; see README "Aerospike")',
    )
    p.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level (default INFO)",
    )
    return p


def make_fallback(args: argparse.Namespace) -> Fallback | None:
    target = aerospike_target_from_args(args)
    if target is None:
        return None
    from .fallback.aerospike import AerospikeFallback

    fallback = AerospikeFallback(target, budget_ms=args.fallback_budget_ms)
    fallback.start()  # connect now, in the background, rather than on the first miss
    return fallback


def start_shm(args: argparse.Namespace, replica: Any) -> Any:
    """The shared replica's writer, started, or None when it is off. Asked for with --shm
    DIR, a failure is the command's; by default (beside the socket) it is a warning."""
    if args.shm == "" or (args.shm is None and not args.uds):
        return None
    from .shm import ShmUnavailable
    from .shm.writer import ShmWriter, default_dir

    directory = args.shm if args.shm is not None else default_dir(args.uds)
    try:
        return ShmWriter(replica, directory, mode=args.socket_mode).start()
    except ShmUnavailable as exc:
        if args.shm is not None:
            raise CommandError(str(exc), FAILURE) from None
        log.warning("no shared replica: %s", exc)
        return None


async def _run(
    args: argparse.Namespace, replica: Any, fallback: Fallback | None, shm: Any = None
) -> str | None:
    """Serve until a signal; returns None on a clean shutdown, else the reason it failed."""
    http = args.http
    stop = asyncio.Event()
    started = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def after_start() -> None:
        await started.wait()
        # Everything allocated so far lives as long as the process: keep the collector from
        # walking it again and again (shorter GC pauses on the request path).
        gc.collect()
        gc.freeze()

    freezer = asyncio.create_task(after_start())
    try:
        options = ServerOptions(
            uds_path=args.uds or None,
            http_host=http[0] if http else None,
            http_port=http[1] if http else None,
            socket_mode=args.socket_mode,
            max_frame=args.max_frame,
            max_body=args.max_body,
            ui=not args.no_ui,
            http_timeouts=HttpTimeouts(args.http_idle_timeout, args.http_body_timeout),
            shm_info=shm.info() if shm is not None else None,
        )
        await serve(replica, fallback, options, stop=stop, started=started)
    except (SocketPathError, OSError) as exc:
        log.error("cannot start the servers: %s", exc)
        return f"cannot start the servers: {exc}"
    finally:
        freezer.cancel()
        if fallback is not None:
            await fallback.close()
    log.info("servers stopped")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with exits_on_error(parser.prog):
        if not args.uds and not args.http:
            raise CommandError("nothing to serve: both --uds and --http are turned off")
        transport = transport_from_args(args)
        fallback = make_fallback(args)
    setup_logging(args.log_level)

    import uvloop

    from .replica.runner import Replica

    globs = [g for g in (args.segments or "").split(",") if g.strip()]
    replica = Replica(
        transport,
        state_dir=args.state_dir,
        segments=globs or None,
        checkpoint_interval=args.checkpoint_interval,
    )
    log.info(
        "starting: log %s, uds %s, http %s, fallback %s",
        transport.describe(),
        args.uds or "off",
        f"{args.http[0]}:{args.http[1]}" if args.http else "off",
        fallback.name if fallback else "none",
    )
    with exits_on_error(parser.prog):
        shm = start_shm(args, replica)  # publishes nothing until the replica is ready
    replica.start()
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            failure = runner.run(_run(args, replica, fallback, shm))
    finally:
        if shm is not None:
            shm.stop()
        replica.stop(save=True)
        log.info("replica stopped%s", " (checkpoint written)" if args.state_dir else "")
    if failure is not None:
        return report(parser.prog, failure, FAILURE)  # the last line: the reason
    return 0


if __name__ == "__main__":
    sys.exit(main())
