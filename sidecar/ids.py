"""Validation of user ids and segment ids: the one place that decides what is well-formed."""

from __future__ import annotations

import re

MAX_USER = 2**64 - 1
#: versions are positive 63-bit integers (the log's records carry them as such)
MAX_VERSION = 2**63 - 1
#: the longest a read-your-publish check (`check_at`) waits for its version
MAX_WAIT_MS = 1000
SEGMENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


class BadRequest(ValueError):
    """Client input that is not well-formed. The message says which part and why."""


def describe(value: object) -> str:
    """A value as error messages show it: scalars with their value, others by type."""
    if type(value) in (int, float, bool) or value is None:
        return f"{type(value).__name__} {value!r}"
    return type(value).__name__


def user_id(value: object, what: str = "user") -> int:
    """Return `value` as a user id, or raise BadRequest.

    A user id is an unsigned 64-bit integer. bool is rejected even though it is an int.
    """
    if type(value) is int and 0 <= value <= MAX_USER:
        return value
    if type(value) is int:
        raise BadRequest(f"{what} must be in 0..2**64-1, got {value}")
    raise BadRequest(f"{what} must be an unsigned 64-bit integer, got {describe(value)}")


def user_id_from_text(text: str, what: str = "user") -> int:
    """Parse a decimal user id from a URL or CLI argument."""
    if not text.isascii() or not text.isdigit():
        raise BadRequest(f"{what} must be a decimal unsigned 64-bit integer, got {text!r}")
    return user_id(int(text), what)


def segment_id(value: object, what: str = "segment") -> str:
    """Return `value` as a segment id, or raise BadRequest."""
    if type(value) is not str:
        raise BadRequest(f"{what} must be a string, got {type(value).__name__}")
    if SEGMENT_RE.fullmatch(value) is None:  # `$` alone would let a trailing newline in
        shown = value if len(value) <= 40 else value[:40] + "..."
        raise BadRequest(
            f"{what} {shown!r} is not a valid segment id "
            "(1-128 chars of [A-Za-z0-9_.:-], starting with a letter or digit)"
        )
    return value


def version_arg(value: object, what: str = "version") -> int:
    """Return `value` as a segment version (0 asks for any), or raise BadRequest."""
    if type(value) is int and 0 <= value <= MAX_VERSION:
        return value
    raise BadRequest(f"{what} must be an integer in 0..2**63-1, got {describe(value)}")


def wait_ms_arg(value: object, what: str = "wait_ms") -> int:
    """Return `value` as a wait in milliseconds (0..MAX_WAIT_MS), or raise BadRequest."""
    if type(value) is int and 0 <= value <= MAX_WAIT_MS:
        return value
    raise BadRequest(f"{what} must be an integer in 0..{MAX_WAIT_MS}, got {describe(value)}")


class SegmentNames:
    """Segment-id validation with a bounded cache of names already seen to be valid, so the
    hot path pays one set lookup instead of a regex match."""

    __slots__ = ("valid", "_limit")

    def __init__(self, limit: int = 100_000) -> None:
        #: names known to be valid; the set object never changes (hot paths may hold it)
        self.valid: set[str] = set()
        self._limit = limit

    def check(self, value: object, what: str = "segment") -> str:
        if type(value) is str and value in self.valid:
            return value
        name = segment_id(value, what)
        if len(self.valid) >= self._limit:
            self.valid.clear()
        self.valid.add(name)
        return name
