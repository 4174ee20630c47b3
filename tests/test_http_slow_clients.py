"""Slow HTTP clients are timed out (issue 12, defect 5): headers trickled a byte at a time,
an idle keep-alive connection and a body that never finishes are closed within the configured
bounds (seg-sidecar --http-idle-timeout, --http-body-timeout), while normal clients are served."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from pyroaring import BitMap64

from sidecar.replica import Replica
from sidecar.server.http import HttpTimeouts
from tests.logtools import SidecarThread

SEGMENTS = {"s": BitMap64([1, 2])}
IDLE = 1.0
BODY = 1.0


@pytest.fixture
def server(replica: Replica) -> Iterator[SidecarThread]:
    timeouts = HttpTimeouts(idle=IDLE, body=BODY)
    with SidecarThread(replica, uds_path=None, http_host="127.0.0.1", http_timeouts=timeouts) as s:
        yield s


def _connect(server: SidecarThread) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.sidecar.http_port), timeout=10)


def _closed_by_server(sock: socket.socket, within: float) -> float | None:
    """Seconds until the server closed `sock` (None if it did not within `within`)."""
    started = time.monotonic()
    sock.settimeout(0.1)
    while time.monotonic() - started < within:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - started
        if data == b"":
            return time.monotonic() - started
    return None


def test_headers_sent_a_byte_at_a_time_are_cut_off(server: SidecarThread) -> None:
    request = b"GET /v1/check?user=1&segment=s HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"y" * 200
    socks = [_connect(server) for _ in range(10)]
    started = time.monotonic()
    open_socks = list(socks)
    i = 0
    while open_socks and time.monotonic() - started < IDLE * 6:
        for sock in list(open_socks):
            try:
                sock.sendall(request[i : i + 1])
            except OSError:
                open_socks.remove(sock)
        i += 1
        time.sleep(0.05)
    assert not open_socks, f"{len(open_socks)} slow connections still open"
    assert time.monotonic() - started < IDLE * 6
    for sock in socks:
        sock.close()


def test_an_idle_keep_alive_connection_is_closed(server: SidecarThread) -> None:
    sock = _connect(server)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 200")
    took = _closed_by_server(sock, IDLE * 6)
    assert took is not None and took >= IDLE * 0.5
    sock.close()


def test_a_body_that_never_finishes_gets_408_and_the_connection_closes(
    server: SidecarThread,
) -> None:
    sock = _connect(server)
    sock.sendall(
        b"POST /v1/check HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 1000\r\n\r\n{"checks": ['
    )
    sock.settimeout(IDLE * 6)
    reply = b""
    started = time.monotonic()
    while b"\r\n\r\n" not in reply and time.monotonic() - started < IDLE * 6:
        reply += sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 408"), reply
    assert _closed_by_server(sock, IDLE * 6) is not None
    sock.close()


def test_a_normal_client_is_served_on_one_connection(server: SidecarThread) -> None:
    sock = _connect(server)
    for _ in range(3):
        sock.sendall(b"GET /v1/check?user=1&segment=s HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = sock.recv(65536)
        assert reply.startswith(b"HTTP/1.1 200") and b'"member":true' in reply
        time.sleep(IDLE / 3)  # under the idle bound each time
    sock.close()
