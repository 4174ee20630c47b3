"""The Aerospike layout (DESIGN.md "Aerospike layout"): one owner for the sink and the fallback.

Namespace configurable, set `users`, key = user id as a signed 64-bit integer, one bin `segs`
holding `{segment: version}` (a TTL segment's value is `[version, expires_at_ms]`:
`map_value`). Records are written with the key stored (so scans and queries return user ids)
and an explicit never-expire TTL (a record expired by the namespace's `default-ttl` would turn
a member into a wrong "not a member"; a TTL segment's memberships expire by their value, never
by the record's TTL).

The `aerospike` client is imported lazily: importing this module costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

NAMESPACE = "test"
SET = "users"
BIN = "segs"
INDEX = "users_segs_mapkeys"  # the optional mapkeys secondary index on BIN

#: records per batch_operate of the publisher's sink (publisher/aerospike_sink.py); here, so
#: that seg-publish's option needs no client import
DEFAULT_BATCH_SIZE = 5000
#: the wire's "never expire" record TTL (the client's aerospike.TTL_NEVER_EXPIRE)
TTL_NEVER_EXPIRE = 0xFFFF_FFFF
#: the client's aerospike.POLICY_KEY_SEND: the user key travels with every write and is stored
POLICY_KEY_SEND = 1


def user_key(user: int) -> int:
    """Aerospike integer keys are signed 64-bit: ids >= 2**63 wrap to negative keys (the client
    rejects 2**63 and above)."""
    return user - 2**64 if user >= 2**63 else user


def user_of_key(key: int) -> int:
    """The user id of a stored key (the inverse of `user_key`)."""
    return key + 2**64 if key < 0 else key


def map_value(version: int, expires_at_ms: int = 0) -> int | list[int]:
    """The `segs` map value the publisher writes for a membership: the version of the publish
    that wrote it, with its expiry for a TTL segment (DESIGN.md "Freshness"; 0: a plain
    segment's)."""
    return [version, expires_at_ms] if expires_at_ms else version


def map_version(value: Any, now_ms: int | None = None) -> int | None:
    """The version a `segs` map value holds: an int, or a TTL segment's `[version,
    expires_at_ms]` (DESIGN.md "Freshness"); None when, given `now_ms`, it has expired (an
    expired membership is not a member). ValueError for anything else. The inverse of
    `map_value`."""
    if type(value) is list and len(value) == 2 and all(type(v) is int for v in value):
        if now_ms is not None and value[1] <= now_ms:
            return None
        value = value[0]
    if type(value) is not int or value < 1:
        raise ValueError(f"malformed {BIN} map value {value!r}"[:120])
    return value


def parse_hosts(spec: str) -> list[tuple[str, int]]:
    """`host:port[,host:port...]`; a bad item is a ValueError naming it."""
    hosts = []
    for item in spec.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected HOST:PORT, got {item!r}")
        hosts.append((host, int(port)))
    return hosts


@dataclass(frozen=True)
class AerospikeTarget:
    """Where the records live and how to reach them: what `--aerospike*` options say."""

    hosts: list[tuple[str, int]]
    namespace: str = NAMESPACE
    set_name: str = SET
    bin_name: str = BIN
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    tls_name: str | None = None

    @classmethod
    def at(cls, spec: str, **options: Any) -> AerospikeTarget:
        """`AerospikeTarget.at("host:port[,...]", namespace=...)`."""
        return cls(parse_hosts(spec), **options)

    def describe(self) -> str:
        hosts = ",".join(f"{h}:{p}" for h, p in self.hosts)
        return f"{hosts} {self.namespace}.{self.set_name}.{self.bin_name}"

    def key(self, user: int) -> tuple[str, str, int]:
        return (self.namespace, self.set_name, user_key(user))

    def client_config(self, policies: dict[str, Any], **extra: Any) -> dict[str, Any]:
        """The aerospike.client() config: hosts (with the TLS name when TLS is on), policies."""
        hosts: list[tuple[Any, ...]] = (
            [(h, p, self.tls_name) for h, p in self.hosts] if self.tls_name else list(self.hosts)
        )
        config: dict[str, Any] = {"hosts": hosts, "policies": policies, **extra}
        if self.tls_name:
            config["tls"] = {"enable": True}
        return config

    def connect(self, policies: dict[str, Any], **extra: Any) -> Any:
        """A connected client (raises the client's AerospikeError when it cannot connect)."""
        import aerospike

        client = aerospike.client(self.client_config(policies, **extra))
        if self.user:
            return client.connect(self.user, self.password or "")
        return client.connect()
