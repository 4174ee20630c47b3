"""Coverage-guided fuzzing with atheris (libFuzzer) of what reads untrusted bytes: the
Unix-socket frame decoder and request validation (every op's handler, as the server calls
them), the log record decoder and the log-directory scanner.

    python tests/fuzz_atheris.py -runs=20000 -max_total_time=20

Run by tests/test_fuzz.py with a bound; any exception other than the documented refusals is
a crash (libFuzzer prints the input and exits non-zero).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import tempfile
from pathlib import Path

from pyroaring import BitMap64

from sidecar.replica import Replica
from sidecar.replica.recovery import bootstrap
from sidecar.server.queries import Queries
from sidecar.server.uds import UdsServer
from sidecar.transport import LogDirTransport
from tests.logtools import publish_raw

_WORK = Path(tempfile.mkdtemp(prefix="atheris"))
publish_raw(LogDirTransport(_WORK / "log"), {"vip": BitMap64([1, 2]), "cart": BitMap64([3])})
# Filled without the replica's thread (libFuzzer and a second Python thread do not mix): one
# bootstrap, then marked ready, so the handlers answer from it as a running sidecar would.
_REPLICA = Replica(LogDirTransport(_WORK / "log"))
with _REPLICA.transport.reader() as _reader:
    bootstrap(_reader, _REPLICA.engine)
_REPLICA.ready = True
_HANDLERS = UdsServer(Queries(_REPLICA), _WORK / "x.sock").handlers

import atheris  # noqa: E402 - after the setup, which must run uninstrumented

from sidecar import ids, packed, protocol, record  # noqa: E402
from sidecar.ids import BadRequest  # noqa: E402
from sidecar.protocol import FrameError, UnknownOp, decode_request, op_of  # noqa: E402
from sidecar.server import queries  # noqa: E402
from sidecar.transport import logdir  # noqa: E402


def one_input(data: bytes) -> None:
    kind, body = (data[0] % 3, data[1:]) if data else (0, b"")
    if kind == 0:  # a socket frame body, through the handler the server would call
        try:
            req = decode_request(body)
            entry = _HANDLERS.get(req[1]) if len(req) > 1 and type(req[1]) is str else None
            if entry is None or len(req) != entry[0]:
                op_of(req)
                return
            result = entry[1](req)
            if type(result) is not tuple:
                result.close()  # a coroutine for the fallback: none is configured
        except (FrameError, UnknownOp, BadRequest):
            pass
    elif kind == 1:  # a log value, from either topic
        for snapshots in (False, True):
            with contextlib.suppress(record.RecordError):
                record.decode(body, snapshots=snapshots)
    else:  # a log-directory file
        logdir.survey(body)


if __name__ == "__main__":
    # After the setup, the decoders' and validators' own functions and methods: instrumenting
    # at import, or everything, crashes atheris 2.3.0 here.
    for module in (record, ids, protocol, logdir, queries, packed):
        for obj in list(vars(module).values()):
            targets = [obj] if inspect.isfunction(obj) else []
            if inspect.isclass(obj):
                targets = [f for f in vars(obj).values() if inspect.isfunction(f)]
            for fn in targets:
                if fn.__module__ == module.__name__:
                    atheris.instrument_func(fn)
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
