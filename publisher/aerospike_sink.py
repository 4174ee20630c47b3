"""Aerospike writes of a publish (DESIGN.md "Aerospike layout").

Set `users`, key = user id (as a signed 64-bit integer, see `sidecar.fallback.aerospike.
user_key`), bin `segs` = map {segment: version}. Adds are map puts, removes map
remove-by-key. Users whose operations are the same (the common case: one segment's adds) are
written together with `batch_operate`, in chunks, on a few threads; rows that fail with a
transient error are retried. Written before the log transaction commits, and idempotent, so
re-running a publish after a crash repairs both stores.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aerospike
from aerospike_helpers.operations import map_operations

from sidecar.fallback.aerospike import parse_hosts, user_key

from .plan import Change

log = logging.getLogger(__name__)

_TRANSIENT = {
    -11,  # MAX_RETRIES_EXCEEDED
    -8,  # NO_MORE_CONNECTIONS / server not available
    -15,  # NO_RESPONSE: a batch row whose parent command timed out or lost its connection
    9,  # TIMEOUT
    11,  # PARTITION_UNAVAILABLE
    14,  # KEY_BUSY
    18,  # DEVICE_OVERLOAD
    22,  # FORBIDDEN (migrations)
}


class AerospikeSinkError(RuntimeError):
    pass


class AerospikeSink:
    def __init__(
        self,
        client: Any,
        *,
        namespace: str = "test",
        set_name: str = "users",
        bin_name: str = "segs",
        chunk: int = 5000,
        threads: int = 4,
        retries: int = 3,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.set_name = set_name
        self.bin_name = bin_name
        self.chunk = chunk
        self.threads = threads
        self.retries = retries

    @classmethod
    def connect(cls, hosts: str, **kwargs: Any) -> AerospikeSink:
        config = {
            "hosts": parse_hosts(hosts),
            # The parent command's policy: it is what carries the timeouts of batch_operate
            # ("batch_write" is the per-row policy and has none; the default parent total
            # timeout, 1 s, times out 5,000-row batches on a loaded server).
            "policies": {
                "batch_parent_write": {
                    "total_timeout": 10_000,
                    "socket_timeout": 10_000,
                    "max_retries": 2,
                }
            },
        }
        try:
            client = aerospike.client(config).connect()
        except aerospike.exception.AerospikeError as exc:
            raise AerospikeSinkError(f"cannot connect to Aerospike at {hosts}: {exc}") from exc
        return cls(client, **kwargs)

    def create_index(self, name: str = "users_segs_mapkeys") -> None:
        """The mapkeys secondary index on `segs` ("who is in segment S" from Aerospike)."""
        with contextlib.suppress(aerospike.exception.IndexFoundError):
            self.client.index_map_keys_create(
                self.namespace, self.set_name, self.bin_name, aerospike.INDEX_STRING, name
            )

    def _ops(self, changes: list[Change]) -> dict[tuple[tuple[str, int, bool], ...], list[int]]:
        """Group users by the exact list of operations they need."""
        per_user: dict[int, list[tuple[str, int, bool]]] = defaultdict(list)
        for change in changes:
            for user in change.add:
                per_user[user].append((change.segment, change.version, True))
            for user in change.remove:
                per_user[user].append((change.segment, change.version, False))
        groups: dict[tuple[tuple[str, int, bool], ...], list[int]] = defaultdict(list)
        for user, ops in per_user.items():
            groups[tuple(ops)].append(user)
        return groups

    def _write(self, signature: tuple[tuple[str, int, bool], ...], users: list[int]) -> int:
        ops = [
            map_operations.map_put(self.bin_name, seg, version)
            if put
            else map_operations.map_remove_by_key(self.bin_name, seg, aerospike.MAP_RETURN_NONE)
            for seg, version, put in signature
        ]
        pending = [(self.namespace, self.set_name, user_key(u)) for u in users]
        for attempt in range(self.retries + 1):
            try:
                result = self.client.batch_operate(pending, ops)
            except aerospike.exception.AerospikeError as exc:
                if attempt == self.retries:
                    raise AerospikeSinkError(f"batch_operate failed: {exc}") from exc
                time.sleep(0.05 * 2**attempt)
                continue
            failed = []
            for rec in result.batch_records:
                if rec.result == 0:
                    continue
                if rec.result in _TRANSIENT and attempt < self.retries:
                    failed.append(rec.key)
                else:
                    raise AerospikeSinkError(f"write of {rec.key[2]} failed: code {rec.result}")
            if not failed:
                return len(users)
            pending = [(k[0], k[1], k[2]) for k in failed]
            time.sleep(0.05 * 2**attempt)
        raise AerospikeSinkError(f"{len(pending)} records still failing after retries")

    def apply(self, changes: list[Change], progress: Callable[[int, int], None]) -> int:
        groups = self._ops(changes)
        jobs = [
            (signature, users[i : i + self.chunk])
            for signature, users in groups.items()
            for i in range(0, len(users), self.chunk)
        ]
        total = sum(len(users) for _, users in jobs)
        done = 0
        with ThreadPoolExecutor(self.threads) as pool:
            for written in pool.map(lambda job: self._write(*job), jobs):
                done += written
                progress(done, total)
        return done
