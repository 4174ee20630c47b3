"""The test server: a threaded TCP server answering pymongo as a one-node replica set primary.

    server = MongoTestServer().start()          # 127.0.0.1, a free port
    client = pymongo.MongoClient(server.uri)    # mongodb://127.0.0.1:PORT/?replicaSet=rs0
    ...
    server.stop()

Knobs (callable from the test thread at any time, or over the wire with the commands of the
same name, so a test can steer a server in another process):

- `fail_command(names, code=..., times=1, close_connection=False, labels=())`: the next
  `times` commands named in `names` fail (or have their connection closed); the wire form is
  MongoDB's own `configureFailPoint: "failCommand"`.
- `drop_connections()`: close every client connection now (cursors survive, as on a real
  server after a network blip).
- `truncate_oplog()`: forget the oplog so far (the horizon moves to now): resuming from an
  older token fails with ChangeStreamHistoryLost. Wire: `{testTruncateOplog: 1}` on admin.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import itertools
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from bson import Int64, ObjectId, Timestamp

from tests.mongo_server import oplog as ol
from tests.mongo_server.store import (
    CommandError,
    apply_update,
    bad_value,
    id_key,
    is_operator_update,
    matches,
    sort_docs,
    with_id,
)
from tests.mongo_server.wire import ProtocolError, Request, encode_reply, read_request

MAX_WIRE_VERSION = 17  # MongoDB 6.0: OP_MSG, sessions, postBatchResumeToken, startAfter
SET_NAME = "rs0"
DEFAULT_BATCH = 101
DEFAULT_AWAIT_MS = 1000


@dataclass
class FailPoint:
    names: set[str]
    remaining: int | None  # None: always on
    code: int | None = None
    close_connection: bool = False
    labels: list[str] = field(default_factory=list)


@dataclass
class FindCursor:
    ns: str
    docs: list[dict[str, Any]]


@dataclass
class StreamCursor:
    ns: str
    db: str
    coll: str | None  # None: every collection of `db`
    position: int  # the last oplog sequence looked at
    lookup: bool
    match: list[dict[str, Any]]
    done: bool = False  # invalidated: the next batch is the last


class _Handler(socketserver.BaseRequestHandler):
    server: _TCPServer

    def handle(self) -> None:
        self.server.owner._serve(self.request)


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: MongoTestServer


class MongoTestServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self._port = host, port
        self.lock = threading.Condition(threading.RLock())
        self.dbs: dict[str, dict[str, dict[bytes, dict[str, Any]]]] = {}
        self.oplog = ol.Oplog()
        self.cursors: dict[int, FindCursor | StreamCursor] = {}
        self._cursor_ids = itertools.count(1_000_001)
        self._reply_ids = itertools.count(1)
        self._connection_ids = itertools.count(1)
        self.fail_points: list[FailPoint] = []
        self.counts: dict[str, int] = {}
        self._conns: set[socket.socket] = set()
        self._tcp: _TCPServer | None = None
        self._thread: threading.Thread | None = None
        self.election_id = ObjectId()

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> MongoTestServer:
        self._tcp = _TCPServer((self.host, self._port), _Handler)
        self._tcp.owner = self
        self._port = self._tcp.server_address[1]
        self._thread = threading.Thread(target=self._tcp.serve_forever, name="mongo-test-server",
                                        kwargs={"poll_interval": 0.05}, daemon=True)  # fmt: skip
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._tcp is not None:
            self._tcp.shutdown()
            self._tcp.server_close()
            self._tcp = None
        self.drop_connections()

    @property
    def port(self) -> int:
        return self._port

    @property
    def address(self) -> str:
        return f"{self.host}:{self._port}"

    @property
    def uri(self) -> str:
        return f"mongodb://{self.address}/?replicaSet={SET_NAME}"

    # -- knobs ---------------------------------------------------------------------------------

    def fail_command(
        self, names: Iterable[str], *, code: int | None = None, times: int | None = 1,
        close_connection: bool = False, labels: Iterable[str] = (),
    ) -> None:  # fmt: skip
        with self.lock:
            self.fail_points.append(FailPoint(set(names), times, code, close_connection,
                                              list(labels)))  # fmt: skip

    def drop_connections(self) -> None:
        with self.lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def truncate_oplog(self) -> None:
        with self.lock:
            self.oplog.truncate()

    # -- inspection ----------------------------------------------------------------------------

    def documents(self, db: str, coll: str) -> list[dict[str, Any]]:
        with self.lock:
            return copy.deepcopy(list(self.dbs.get(db, {}).get(coll, {}).values()))

    def entries(self) -> list[ol.Entry]:
        with self.lock:
            return list(self.oplog.entries)

    # -- the connection loop -------------------------------------------------------------------

    def _serve(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection_id = next(self._connection_ids)
        with self.lock:
            self._conns.add(conn)
        try:
            while True:
                try:
                    request = read_request(conn)
                except (OSError, ProtocolError):
                    return
                if request is None:
                    return
                reply = self._dispatch(request, connection_id)
                if reply is None:  # a fail point closed the connection
                    return
                if request.more_to_come:
                    continue
                try:
                    conn.sendall(encode_reply(request, next(self._reply_ids), reply))
                except OSError:
                    return
        finally:
            with self.lock:
                self._conns.discard(conn)
            conn.close()

    def _dispatch(self, request: Request, connection_id: int) -> dict[str, Any] | None:
        cmd = request.command
        name = next(iter(cmd), "")
        db = cmd.get("$db", "admin")
        with self.lock:
            self.counts[name] = self.counts.get(name, 0) + 1
            fail = self._fail_point(name)
        if fail is not None:
            if fail.close_connection:
                return None
            return self._error(CommandError(fail.code or 1, "FailPoint", f"failCommand fail "
                                            f"point on {name}", fail.labels))  # fmt: skip
        handler: Callable[[dict, str], dict] | None = getattr(self, f"_cmd_{name.lower()}", None)
        if handler is None:
            return self._error(CommandError(59, "CommandNotFound", f"no such command: '{name}' "
                                            "(not supported by the test server)"))  # fmt: skip
        try:
            if "startTransaction" in cmd:
                raise CommandError(20, "IllegalOperation", "transactions are not supported by "
                                   "the test server")  # fmt: skip
            result = handler(cmd, db) if name.lower() != "hello" else self._hello(connection_id)
        except CommandError as e:
            return self._error(e)
        result.setdefault("ok", 1.0)
        return self._gossip(result)

    def _fail_point(self, name: str) -> FailPoint | None:
        for fp in self.fail_points:
            if name in fp.names and (fp.remaining is None or fp.remaining > 0):
                if fp.remaining is not None:
                    fp.remaining -= 1
                return fp
        return None

    def _gossip(self, reply: dict[str, Any]) -> dict[str, Any]:
        ts = self.oplog.last_ts if self.oplog.last_ts.time else Timestamp(int(time.time()), 0)
        reply["$clusterTime"] = {"clusterTime": ts,
                                 "signature": {"hash": b"\0" * 20, "keyId": Int64(0)}}  # fmt: skip
        reply["operationTime"] = ts
        return reply

    def _error(self, e: CommandError) -> dict[str, Any]:
        reply: dict[str, Any] = {"ok": 0.0, "errmsg": str(e), "code": e.code,
                                 "codeName": e.code_name}  # fmt: skip
        if e.labels:
            reply["errorLabels"] = e.labels
        return self._gossip(reply)

    # -- handshake and housekeeping ------------------------------------------------------------

    def _hello(self, connection_id: int) -> dict[str, Any]:
        now = dt.datetime.now(dt.UTC)
        with self.lock:
            op_time = {"ts": self.oplog.last_ts, "t": Int64(1)}
        return {
            "isWritablePrimary": True, "ismaster": True, "helloOk": True,
            "setName": SET_NAME, "setVersion": 1, "hosts": [self.address],
            "primary": self.address, "me": self.address, "electionId": self.election_id,
            "lastWrite": {"opTime": op_time, "lastWriteDate": now},
            "maxBsonObjectSize": 16 * 1024 * 1024, "maxMessageSizeBytes": 48_000_000,
            "maxWriteBatchSize": 100_000, "localTime": now,
            "logicalSessionTimeoutMinutes": 30, "connectionId": connection_id,
            "minWireVersion": 0, "maxWireVersion": MAX_WIRE_VERSION, "readOnly": False,
        }  # fmt: skip

    def _cmd_ismaster(self, cmd: dict, db: str) -> dict:
        return self._hello(0)

    _cmd_hello = _cmd_ismaster

    def _cmd_ping(self, cmd: dict, db: str) -> dict:
        return {}

    def _cmd_buildinfo(self, cmd: dict, db: str) -> dict:
        return {"version": "7.0.0-test", "versionArray": [7, 0, 0, 0]}

    def _cmd_endsessions(self, cmd: dict, db: str) -> dict:
        return {}

    def _cmd_configurefailpoint(self, cmd: dict, db: str) -> dict:
        if cmd["configureFailPoint"] != "failCommand":
            raise bad_value(f"fail point {cmd['configureFailPoint']} is not supported")
        mode = cmd.get("mode")
        with self.lock:
            self.fail_points.clear()
            if mode == "off":
                return {}
            times = None if mode == "alwaysOn" else int(mode["times"])
            data = cmd.get("data", {})
            self.fail_points.append(FailPoint(set(data.get("failCommands", [])), times,
                                              data.get("errorCode"),
                                              bool(data.get("closeConnection")),
                                              list(data.get("errorLabels", []))))  # fmt: skip
        return {}

    def _cmd_testtruncateoplog(self, cmd: dict, db: str) -> dict:
        self.truncate_oplog()
        return {}

    # -- writes --------------------------------------------------------------------------------

    def _coll(self, db: str, coll: str, create: bool = False) -> dict[bytes, dict[str, Any]]:
        if create:
            return self.dbs.setdefault(db, {}).setdefault(coll, {})
        return self.dbs.get(db, {}).get(coll, {})

    def _write_done(self) -> None:
        self.lock.notify_all()

    def _cmd_insert(self, cmd: dict, db: str) -> dict:
        coll = cmd["insert"]
        n, errors = 0, []
        with self.lock:
            docs = self._coll(db, coll, create=True)
            for index, raw in enumerate(cmd.get("documents", [])):
                doc = with_id(raw)
                key = id_key(doc["_id"])
                if key in docs:
                    errors.append({"index": index, "code": 11000, "errmsg": "E11000 duplicate "
                                   f"key error collection: {db}.{coll} index: _id_ dup key: "
                                   f"{{ _id: {doc['_id']!r} }}"})  # fmt: skip
                    if cmd.get("ordered", True):
                        break
                    continue
                docs[key] = doc
                self.oplog.append(db, coll, "insert", doc_id=doc["_id"],
                                  document=copy.deepcopy(doc))  # fmt: skip
                n += 1
            self._write_done()
        return {"n": n, **({"writeErrors": errors} if errors else {})}

    def _cmd_update(self, cmd: dict, db: str) -> dict:
        coll = cmd["update"]
        n = modified = 0
        upserted, errors = [], []
        with self.lock:
            docs = self._coll(db, coll, create=True)
            for index, spec in enumerate(cmd.get("updates", [])):
                try:
                    got = self._update_one_spec(db, coll, docs, spec)
                except CommandError as e:
                    errors.append({"index": index, "code": e.code, "errmsg": str(e)})
                    if cmd.get("ordered", True):
                        break
                    continue
                n += got[0]
                modified += got[1]
                if got[2] is not None:
                    upserted.append({"index": index, "_id": got[2]})
            self._write_done()
        reply: dict[str, Any] = {"n": n + len(upserted), "nModified": modified}
        if upserted:
            reply["upserted"] = upserted
        if errors:
            reply["writeErrors"] = errors
        return reply

    def _update_one_spec(self, db: str, coll: str, docs: dict, spec: dict) -> tuple:
        query, update = spec.get("q", {}), spec["u"]
        operators = is_operator_update(update)
        if spec.get("multi") and not operators:
            raise bad_value("multi update is not supported with a replacement document")
        targets = [d for d in docs.values() if matches(d, query)]
        if not spec.get("multi"):
            targets = targets[:1]
        if not targets:
            if not spec.get("upsert"):
                return 0, 0, None
            base = {k: v for k, v in query.items() if not k.startswith("$")
                    and not isinstance(v, dict)}  # fmt: skip
            if operators:
                new, _, _ = apply_update(base, update)
            else:
                new = dict(update, **({"_id": base["_id"]} if "_id" in base else {}))
            new = with_id(new)
            docs[id_key(new["_id"])] = new
            self.oplog.append(db, coll, "insert", doc_id=new["_id"], document=copy.deepcopy(new))
            return 0, 0, new["_id"]
        changed = 0
        for old in targets:
            if operators:
                new, updated, removed = apply_update(old, update)
                if new == old:
                    continue
                docs[id_key(old["_id"])] = new
                description = {"updatedFields": updated, "removedFields": removed,
                               "truncatedArrays": []}  # fmt: skip
                self.oplog.append(db, coll, "update", doc_id=old["_id"], update=description)
            else:
                if "_id" in update and update["_id"] != old["_id"]:
                    raise CommandError(66, "ImmutableField", "the (immutable) field '_id' was "
                                       "found to have been altered")  # fmt: skip
                new = {"_id": old["_id"], **{k: v for k, v in update.items() if k != "_id"}}
                docs[id_key(old["_id"])] = new
                self.oplog.append(db, coll, "replace", doc_id=old["_id"],
                                  document=copy.deepcopy(new))  # fmt: skip
            changed += 1
        return len(targets), changed, None

    def _cmd_delete(self, cmd: dict, db: str) -> dict:
        coll = cmd["delete"]
        n = 0
        with self.lock:
            docs = self._coll(db, coll)
            for spec in cmd.get("deletes", []):
                hits = [d for d in docs.values() if matches(d, spec.get("q", {}))]
                if spec.get("limit", 0) == 1:
                    hits = hits[:1]
                for doc in hits:
                    del docs[id_key(doc["_id"])]
                    self.oplog.append(db, coll, "delete", doc_id=doc["_id"])
                    n += 1
            self._write_done()
        return {"n": n}

    def _cmd_create(self, cmd: dict, db: str) -> dict:
        with self.lock:
            if cmd["create"] in self.dbs.get(db, {}):
                raise CommandError(48, "NamespaceExists", f"Collection {db}.{cmd['create']} "
                                   "already exists.")  # fmt: skip
            self._coll(db, cmd["create"], create=True)
        return {}

    def _cmd_drop(self, cmd: dict, db: str) -> dict:
        coll = cmd["drop"]
        with self.lock:
            if coll not in self.dbs.get(db, {}):
                return {}  # 4.4+: dropping a missing collection succeeds
            del self.dbs[db][coll]
            self.oplog.append(db, coll, "drop")
            self._write_done()
        return {"ns": f"{db}.{coll}", "nIndexesWas": 1}

    def _cmd_dropdatabase(self, cmd: dict, db: str) -> dict:
        with self.lock:
            for coll in list(self.dbs.get(db, {})):
                self.oplog.append(db, coll, "drop")
            self.dbs.pop(db, None)
            self.oplog.append(db, "", "dropDatabase")
            self._write_done()
        return {"dropped": db}

    def _cmd_renamecollection(self, cmd: dict, db: str) -> dict:
        src_db, _, src = cmd["renameCollection"].partition(".")
        dst_db, _, dst = cmd["to"].partition(".")
        with self.lock:
            if src not in self.dbs.get(src_db, {}):
                raise CommandError(26, "NamespaceNotFound", "source namespace does not exist")
            if dst in self.dbs.get(dst_db, {}) and not cmd.get("dropTarget"):
                raise CommandError(48, "NamespaceExists", "target namespace exists")
            self.dbs.setdefault(dst_db, {})[dst] = self.dbs[src_db].pop(src)
            self.oplog.append(src_db, src, "rename", to=(dst_db, dst))
            self._write_done()
        return {}

    # -- reads ---------------------------------------------------------------------------------

    def _cmd_listcollections(self, cmd: dict, db: str) -> dict:
        with self.lock:
            names = sorted(self.dbs.get(db, {}))
        batch = [{"name": n, "type": "collection", "options": {}, "info": {"readOnly": False}}
                 for n in names if matches({"name": n}, cmd.get("filter") or {})]  # fmt: skip
        return {"cursor": {"id": Int64(0), "ns": f"{db}.$cmd.listCollections",
                           "firstBatch": batch}}  # fmt: skip

    def _cmd_listdatabases(self, cmd: dict, db: str) -> dict:
        with self.lock:
            names = sorted(self.dbs)
        return {"databases": [{"name": n, "sizeOnDisk": 0, "empty": False} for n in names],
                "totalSize": 0}  # fmt: skip

    def _cmd_find(self, cmd: dict, db: str) -> dict:
        coll = cmd["find"]
        with self.lock:
            docs = [d for d in self._coll(db, coll).values() if matches(d, cmd.get("filter") or {})]
            docs = copy.deepcopy(docs)
        if cmd.get("sort"):
            docs = sort_docs(docs, dict(cmd["sort"]))
        docs = docs[int(cmd.get("skip", 0)) :]
        limit = abs(int(cmd.get("limit", 0)))
        if limit:
            docs = docs[:limit]
        if cmd.get("projection"):
            docs = [_project(d, cmd["projection"]) for d in docs]
        size = int(cmd.get("batchSize", DEFAULT_BATCH)) or DEFAULT_BATCH
        first, rest = docs[:size], docs[size:]
        cursor_id = 0
        if rest and not cmd.get("singleBatch"):
            cursor_id = next(self._cursor_ids)
            with self.lock:
                self.cursors[cursor_id] = FindCursor(f"{db}.{coll}", rest)
        return {"cursor": {"id": Int64(cursor_id), "ns": f"{db}.{coll}", "firstBatch": first}}

    def _cmd_count(self, cmd: dict, db: str) -> dict:
        with self.lock:
            docs = self._coll(db, cmd["count"]).values()
            return {"n": sum(1 for d in docs if matches(d, cmd.get("query") or {}))}

    def _cmd_killcursors(self, cmd: dict, db: str) -> dict:
        killed, missing = [], []
        with self.lock:
            for cid in cmd.get("cursors", []):
                (killed if self.cursors.pop(int(cid), None) is not None else missing).append(cid)
        return {"cursorsKilled": killed, "cursorsNotFound": missing, "cursorsAlive": [],
                "cursorsUnknown": []}  # fmt: skip

    def _cmd_getmore(self, cmd: dict, db: str) -> dict:
        cursor_id = int(cmd["getMore"])
        size = int(cmd.get("batchSize", 0)) or None
        with self.lock:
            cursor = self.cursors.get(cursor_id)
            if cursor is None:
                raise CommandError(43, "CursorNotFound", f"cursor id {cursor_id} not found")
            if isinstance(cursor, FindCursor):
                n = size or len(cursor.docs)
                batch, cursor.docs = cursor.docs[:n], cursor.docs[n:]
                if not cursor.docs:
                    del self.cursors[cursor_id]
                    cursor_id = 0
                return {"cursor": {"id": Int64(cursor_id), "ns": cursor.ns, "nextBatch": batch}}
            wait = int(cmd.get("maxTimeMS", DEFAULT_AWAIT_MS)) / 1000
            return self._stream_batch(cursor_id, cursor, size or DEFAULT_BATCH, wait, "nextBatch")

    # -- change streams ------------------------------------------------------------------------

    def _cmd_aggregate(self, cmd: dict, db: str) -> dict:
        pipeline = cmd.get("pipeline", [])
        if not pipeline or "$changeStream" not in pipeline[0]:
            raise bad_value("the test server runs only $changeStream aggregations")
        spec = pipeline[0]["$changeStream"]
        match = []
        for stage in pipeline[1:]:
            if set(stage) != {"$match"}:
                raise bad_value(f"stage {next(iter(stage))} after $changeStream is not supported")
            match.append(stage["$match"])
        full = spec.get("fullDocument", "default")
        if full not in ("default", "updateLookup"):
            raise bad_value(f"fullDocument {full!r} is not supported by the test server")
        if spec.get("allChangesForCluster"):
            raise bad_value("cluster-wide change streams are not supported by the test server")
        target = cmd["aggregate"]
        coll = None if target == 1 else str(target)
        starts = [k for k in ("resumeAfter", "startAfter", "startAtOperationTime") if k in spec]
        if len(starts) > 1:
            raise CommandError(40674, "Location40674", "Only one type of resume option is allowed")
        with self.lock:
            if not starts:
                position = self.oplog.last_seq
            elif starts[0] == "startAtOperationTime":
                position = self.oplog.seq_at_time(spec["startAtOperationTime"])
            else:
                _, position, flag = ol.parse_token(spec[starts[0]])
                if flag == ol.INVALIDATE and starts[0] == "resumeAfter":
                    raise CommandError(260, "InvalidResumeToken", "Attempting to resume a change "
                                       "stream using 'resumeAfter' is not allowed from an "
                                       "invalidate notification.")  # fmt: skip
                self.oplog.after(position)  # raises ChangeStreamHistoryLost
            cursor = StreamCursor(f"{db}.{coll if coll else '$cmd.aggregate'}", db, coll,
                                  position, full == "updateLookup", match)  # fmt: skip
            cursor_id = next(self._cursor_ids)
            self.cursors[cursor_id] = cursor
            size = cmd.get("cursor", {}).get("batchSize")
            return self._stream_batch(cursor_id, cursor, DEFAULT_BATCH if size is None else
                                      int(size), 0.0, "firstBatch")  # fmt: skip

    def _stream_batch(self, cursor_id: int, cursor: StreamCursor, size: int, wait: float,
                      key: str) -> dict:  # fmt: skip
        """Called with the lock held: up to `size` events after the cursor's position, waiting
        up to `wait` seconds for the first one."""
        deadline = time.monotonic() + wait
        batch: list[dict[str, Any]] = []
        while True:
            if cursor.done:
                self.cursors.pop(cursor_id, None)
                return {"cursor": {"id": Int64(0), "ns": cursor.ns, key: []}}
            try:
                pending = self.oplog.after(cursor.position) if size else []
            except CommandError:
                self.cursors.pop(cursor_id, None)
                raise
            for entry in pending:
                cursor.position = entry.seq
                for ev in self._events_for(cursor, entry):
                    if all(matches(ev, m) for m in cursor.match) or ev["operationType"] == (
                        "invalidate"
                    ):
                        batch.append(ev)
                if len(batch) >= size or cursor.done:
                    break
            left = deadline - time.monotonic()
            if batch or left <= 0:
                break
            self.lock.wait(left)
        high = self.oplog.last_ts
        for e in self.oplog.entries:
            if e.seq == cursor.position:
                high = e.ts
        resume = batch[-1]["_id"] if cursor.done and batch else ol.token(
            high, cursor.position, ol.HIGH_WATER)  # fmt: skip
        if cursor.done:  # the batch with the invalidate closes the cursor
            self.cursors.pop(cursor_id, None)
            cursor_id = 0
        return {"cursor": {"id": Int64(cursor_id), "ns": cursor.ns, key: batch,
                           "postBatchResumeToken": resume}}  # fmt: skip

    def _events_for(self, cursor: StreamCursor, entry: ol.Entry) -> list[dict[str, Any]]:
        if entry.db != cursor.db or (cursor.coll is not None and entry.coll != cursor.coll
                                     and entry.op != "dropDatabase"):  # fmt: skip
            return []
        if entry.op == "dropDatabase" and cursor.coll is not None:
            return []
        full = None
        if entry.op == "update" and cursor.lookup:
            current = self._coll(entry.db, entry.coll).get(id_key(entry.doc_id))
            full = copy.deepcopy(current) if current is not None else None
        out = [ol.event(entry, full, cursor.lookup)]
        ends_collection = cursor.coll is not None and entry.op in ("drop", "rename")
        if ends_collection or (cursor.coll is None and entry.op == "dropDatabase"):
            out.append(ol.invalidate_event(entry))
            cursor.done = True
        return out


def _project(doc: dict[str, Any], projection: dict[str, Any]) -> dict[str, Any]:
    include = {k for k, v in projection.items() if v and k != "_id"}
    if include:
        keep = include | ({"_id"} if projection.get("_id", 1) else set())
        return {k: v for k, v in doc.items() if k in keep}
    drop = {k for k, v in projection.items() if not v}
    return {k: v for k, v in doc.items() if k not in drop}
