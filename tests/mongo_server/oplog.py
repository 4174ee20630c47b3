"""The oplog of the test server and the change events built from it.

Every write appends an Entry with a cluster time `Timestamp(t, i)` and a sequence number.
A resume token is `{_data: <hex>}` whose hex holds the entry's cluster time, sequence and a
flag (an event, a high-water mark, or an invalidate); resuming after a token streams the
entries with a larger sequence. `truncate` moves the horizon: a token or an
`startAtOperationTime` before it fails with ChangeStreamHistoryLost (286), as a real server
does once the oplog rolled over.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from typing import Any

from bson import Timestamp

from tests.mongo_server.store import CommandError

EVENT, HIGH_WATER, INVALIDATE = 0, 1, 2
_TOKEN = re.compile(r"^82([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{16})([0-9A-F]{2})$")


@dataclass
class Entry:
    seq: int
    ts: Timestamp
    wall: dt.datetime
    db: str
    coll: str
    op: str  # insert update replace delete drop rename dropDatabase
    doc_id: Any = None
    document: dict[str, Any] | None = None  # insert / replace: the document written
    update: dict[str, Any] | None = None  # update: updateDescription
    to: tuple[str, str] | None = None  # rename: the new namespace
    extra: dict[str, Any] = field(default_factory=dict)


def token(ts: Timestamp, seq: int, flag: int = EVENT) -> dict[str, str]:
    return {"_data": f"82{ts.time:08X}{ts.inc:08X}{seq:016X}{flag:02X}"}


def parse_token(value: Any) -> tuple[Timestamp, int, int]:
    """(cluster time, sequence, flag) of a resume token; InvalidResumeToken (260) otherwise."""
    data = value.get("_data") if isinstance(value, dict) else None
    match = _TOKEN.match(data) if isinstance(data, str) else None
    if match is None:
        raise CommandError(260, "InvalidResumeToken", f"malformed resume token: {value!r}")
    t, i, seq, flag = (int(g, 16) for g in match.groups())
    return Timestamp(t, i), seq, flag


def history_lost() -> CommandError:
    return CommandError(286, "ChangeStreamHistoryLost", "Resume of change stream was not "
                        "possible, as the resume point may no longer be in the oplog.")  # fmt: skip


class Oplog:
    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.horizon = 0  # entries with seq <= horizon are gone
        self.horizon_ts = Timestamp(0, 0)
        self.last_seq = 0
        self.last_ts = Timestamp(0, 0)

    def next_time(self) -> Timestamp:
        now = int(dt.datetime.now(dt.UTC).timestamp())
        if now > self.last_ts.time:
            self.last_ts = Timestamp(now, 1)
        else:
            self.last_ts = Timestamp(self.last_ts.time, self.last_ts.inc + 1)
        return self.last_ts

    def append(self, db: str, coll: str, op: str, **fields: Any) -> Entry:
        self.last_seq += 1
        entry = Entry(self.last_seq, self.next_time(), dt.datetime.now(dt.UTC), db, coll, op,
                      **fields)  # fmt: skip
        self.entries.append(entry)
        return entry

    def truncate(self, keep_after: int | None = None) -> None:
        """Forget the entries up to `keep_after` (default: all of them)."""
        cut = self.last_seq if keep_after is None else keep_after
        if cut <= self.horizon:
            return
        self.entries = [e for e in self.entries if e.seq > cut]
        self.horizon = cut
        self.horizon_ts = self.last_ts if not self.entries else self.entries[0].ts

    def after(self, seq: int) -> list[Entry]:
        if seq < self.horizon:
            raise history_lost()
        return [e for e in self.entries if e.seq > seq]

    def seq_at_time(self, ts: Timestamp) -> int:
        """The position just before the first entry at or after cluster time `ts`."""
        if self.horizon and ts < self.horizon_ts:
            raise history_lost()
        for e in self.entries:
            if e.ts >= ts:
                return e.seq - 1
        return self.last_seq


def event(entry: Entry, full_document: dict[str, Any] | None, with_lookup: bool) -> dict:
    """The change event of `entry` as a real server (7.0, default options) sends it."""
    out: dict[str, Any] = {
        "_id": token(entry.ts, entry.seq),
        "operationType": entry.op,
        "clusterTime": entry.ts,
        "wallTime": entry.wall.replace(microsecond=entry.wall.microsecond // 1000 * 1000),
    }
    if entry.op in ("insert", "replace"):
        out["fullDocument"] = entry.document
    if entry.op == "dropDatabase":
        out["ns"] = {"db": entry.db}
    else:
        out["ns"] = {"db": entry.db, "coll": entry.coll}
    if entry.op in ("insert", "update", "replace", "delete"):
        out["documentKey"] = {"_id": entry.doc_id}
    if entry.op == "update":
        out["updateDescription"] = entry.update
        if with_lookup:
            out["fullDocument"] = full_document
    if entry.op == "rename" and entry.to is not None:
        out["to"] = {"db": entry.to[0], "coll": entry.to[1]}
    return out


def invalidate_event(entry: Entry) -> dict:
    return {
        "_id": token(entry.ts, entry.seq, INVALIDATE),
        "operationType": "invalidate",
        "clusterTime": entry.ts,
        "wallTime": entry.wall.replace(microsecond=entry.wall.microsecond // 1000 * 1000),
    }
