"""Pytest plugin: `mongo`, a fresh MongoDB test server (tests/mongo_server) per test.

Registered in tests/conftest.py. Connect with `pymongo.MongoClient(mongo.uri)`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.mongo_server import MongoTestServer


@pytest.fixture
def mongo() -> Iterator[MongoTestServer]:
    server = MongoTestServer().start()
    try:
        yield server
    finally:
        server.stop()
