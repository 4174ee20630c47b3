"""Pytest plugin: the wire-level Aerospike test server and real-client fixtures.

Register with ``pytest_plugins = ["tests.aerospike_fixture"]`` in the root conftest, or import
the fixtures explicitly into a test module.

* ``aerospike_server``: a fresh :class:`ThreadedAerospikeServer` (namespace ``test``) per test.
* ``aerospike_server_session``: one shared server for the session; tests that use it see
  other tests' records unless they call ``clear()``.
* ``aerospike_server_factory``: ``make(**kwargs)`` starts more servers (other namespaces,
  ``node_id``...), all stopped at teardown.
* ``mirror``: a :class:`Mirror` (``aerospike_server``, a publisher's sink connected to it, a
  log directory under ``tmp_path``), for the publisher's Aerospike tests.
* ``aerospike_client``: a connected ``aerospike`` client for ``aerospike_server``, closed at
  teardown; configured by :func:`client_config`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from tests.aerospike_server import ThreadedAerospikeServer

# Client settings that keep failure fast under the fault knobs: short per-command budgets
# and the minimum tend interval (250 ms), so a node dropped by down() is found again soon
# after up(). Per-call policies can still override.
FAST_FAIL_POLICIES: dict[str, Any] = {
    "read": {"total_timeout": 1000, "socket_timeout": 500},
    "write": {"total_timeout": 1000, "socket_timeout": 500},
    "operate": {"total_timeout": 1000, "socket_timeout": 500},
    "batch": {"total_timeout": 2000, "socket_timeout": 1000},
}


def publish_mirrored(log: Any, server: ThreadedAerospikeServer, segments: Any) -> Any:
    """One `Publisher.publish(segments)` to `log` with the Aerospike mirror on `server`, on a
    sink of its own (closed after a successful publish); returns its `PublishResult`."""
    from publisher import Publisher
    from publisher.aerospike_sink import AerospikeSink

    sink = AerospikeSink.connect(server.address)
    result = Publisher(log, sink=sink).publish(segments)
    sink.client.close()
    return result


def client_config(server: ThreadedAerospikeServer, **extra: Any) -> dict[str, Any]:
    """aerospike.client() config for a test server (fast failure, 250 ms tend interval)."""
    config: dict[str, Any] = {
        "hosts": [(server.host, server.port)],
        "policies": dict(FAST_FAIL_POLICIES),
        "tend_interval": 250,
        "connect_timeout": 1000,
    }
    config.update(extra)
    return config


@pytest.fixture
def aerospike_server() -> Iterator[ThreadedAerospikeServer]:
    server = ThreadedAerospikeServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def aerospike_server_session() -> Iterator[ThreadedAerospikeServer]:
    server = ThreadedAerospikeServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def aerospike_server_factory() -> Iterator[Callable[..., ThreadedAerospikeServer]]:
    servers: list[ThreadedAerospikeServer] = []

    def make(**kwargs: Any) -> ThreadedAerospikeServer:
        server = ThreadedAerospikeServer(**kwargs).start()
        servers.append(server)
        return server

    try:
        yield make
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def aerospike_client(aerospike_server: ThreadedAerospikeServer) -> Iterator[Any]:
    import aerospike  # imported here so the plugin loads without the client

    client = aerospike.client(client_config(aerospike_server)).connect()
    try:
        yield client
    finally:
        client.close()


class Mirror(NamedTuple):
    server: ThreadedAerospikeServer
    sink: Any  # publisher.aerospike_sink.AerospikeSink
    log_dir: Path


@pytest.fixture
def mirror(aerospike_server: ThreadedAerospikeServer, tmp_path: Path) -> Iterator[Mirror]:
    from publisher.aerospike_sink import AerospikeSink

    sink = AerospikeSink.connect(aerospike_server.address)
    try:
        yield Mirror(aerospike_server, sink, tmp_path / "log")
    finally:
        sink.close()
