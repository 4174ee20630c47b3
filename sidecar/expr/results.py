"""What the replica, the servers and the clients answer for a count or an audience."""

from __future__ import annotations

from typing import NamedTuple

from pyroaring import BitMap64


class Count(NamedTuple):
    count: int
    versions: dict[str, int]  # segment -> the version counted


class Audience(NamedTuple):
    members: BitMap64  # the caller's own copy, ascending when iterated
    versions: dict[str, int]
