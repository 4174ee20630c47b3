"""Wire-level Aerospike test double (see README.md)."""

from .server import AerospikeTestServer, ThreadedAerospikeServer

__all__ = ["AerospikeTestServer", "ThreadedAerospikeServer"]
