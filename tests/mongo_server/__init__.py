"""A wire-level MongoDB test double for the real pymongo client (see README.md)."""

from tests.mongo_server.server import MongoTestServer

__all__ = ["MongoTestServer"]
