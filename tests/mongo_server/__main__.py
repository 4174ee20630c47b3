"""`python -m tests.mongo_server [--port N]`: run the test server until killed; prints its URI."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading

from tests.mongo_server.server import MongoTestServer


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.mongo_server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    server = MongoTestServer(args.host, args.port).start()
    print(server.uri, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
