"""The MongoDB test server, driven by the real pymongo client (tests/mongo_server/README.md)."""

from __future__ import annotations

import socket
import struct
import threading
import time

import bson
import pymongo
import pytest
from bson import Timestamp
from pymongo.errors import (
    AutoReconnect,
    DuplicateKeyError,
    OperationFailure,
)

from tests.mongo_server import MongoTestServer
from tests.mongo_server.wire import OP_MSG, OP_REPLY


@pytest.fixture
def client(mongo: MongoTestServer) -> pymongo.MongoClient:
    c = pymongo.MongoClient(mongo.uri, serverSelectionTimeoutMS=5000, tz_aware=True)
    yield c
    c.close()


def test_handshake_makes_a_replica_set_primary(client: pymongo.MongoClient,
                                               mongo: MongoTestServer) -> None:  # fmt: skip
    assert client.admin.command("ping")["ok"] == 1.0
    description = client.topology_description
    assert description.topology_type_name == "ReplicaSetWithPrimary"
    assert client.primary == ("127.0.0.1", mongo.port)
    hello = client.admin.command("hello")
    assert hello["setName"] == "rs0" and hello["isWritablePrimary"] is True
    assert isinstance(hello["$clusterTime"]["clusterTime"], Timestamp)


def test_crud(client: pymongo.MongoClient) -> None:
    orders = client.shop.orders
    assert orders.insert_one({"_id": 1, "user": 5, "amount": 10}).inserted_id == 1
    auto = orders.insert_one({"user": 6}).inserted_id
    assert isinstance(auto, bson.ObjectId)
    with pytest.raises(DuplicateKeyError):
        orders.insert_one({"_id": 1})
    assert orders.update_one({"_id": 1}, {"$inc": {"amount": 5}, "$set": {"x.y": 1}}
                             ).modified_count == 1  # fmt: skip
    assert orders.find_one({"_id": 1}) == {"_id": 1, "user": 5, "amount": 15, "x": {"y": 1}}
    assert orders.update_one({"_id": 2}, {"$set": {"a": 1}}, upsert=True).upserted_id == 2
    assert orders.replace_one({"_id": 2}, {"b": 2}).modified_count == 1
    assert orders.find_one({"_id": 2}) == {"_id": 2, "b": 2}
    assert orders.update_many({"user": {"$in": [5, 6]}}, {"$unset": {"x": ""}}).matched_count == 2
    assert orders.delete_many({"user": {"$exists": True}}).deleted_count == 2
    assert [d["_id"] for d in orders.find()] == [2]
    with pytest.raises(OperationFailure, match="not supported by the test server"):
        orders.find_one({"a": {"$regex": "x"}})


def test_find_sort_batches_get_more_and_kill_cursors(client: pymongo.MongoClient,
                                                     mongo: MongoTestServer) -> None:  # fmt: skip
    coll = client.shop.items
    coll.insert_many([{"_id": i, "k": i % 3} for i in range(300)])
    got = [d["_id"] for d in coll.find({"k": {"$gte": 1}}).sort([("k", -1), ("_id", 1)])
           .batch_size(7)]  # fmt: skip
    assert got == [i for i in range(300) if i % 3 == 2] + [i for i in range(300) if i % 3 == 1]
    assert mongo.counts["getMore"] >= 28
    cursor = coll.find().batch_size(10)
    next(cursor)
    cursor.close()
    assert mongo.counts.get("killCursors", 0) == 1 and not mongo.cursors
    assert [d["_id"] for d in coll.find(skip=5, limit=3, projection={"k": 0})] == [5, 6, 7]
    assert list(coll.find({"_id": 3}, {"k": 1, "_id": 0})) == [{"k": 0}]


def test_change_stream_events_and_update_lookup(client: pymongo.MongoClient) -> None:
    orders = client.shop.orders
    with orders.watch(full_document="updateLookup") as stream:
        orders.insert_one({"_id": 1, "a": 1})
        orders.update_one({"_id": 1}, {"$set": {"a": 2}, "$unset": {"zz": 1}})
        orders.replace_one({"_id": 1}, {"b": 1})
        orders.delete_one({"_id": 1})
        client.shop.other.insert_one({"_id": 9})  # another collection
        got = [stream.next() for _ in range(4)]
        assert stream.try_next() is None
    assert [e["operationType"] for e in got] == ["insert", "update", "replace", "delete"]
    insert, update, replace, delete = got
    assert insert["fullDocument"] == {"_id": 1, "a": 1}
    assert insert["ns"] == {"db": "shop", "coll": "orders"} and insert["documentKey"] == {"_id": 1}
    assert update["updateDescription"] == {"updatedFields": {"a": 2}, "removedFields": [],
                                           "truncatedArrays": []}  # fmt: skip
    assert "fullDocument" in update  # looked up (None: deleted by the time it was read)
    assert replace["fullDocument"] == {"_id": 1, "b": 1} and "fullDocument" not in delete
    times = [e["clusterTime"] for e in got]
    assert times == sorted(times) and len(set(times)) == 4
    with orders.watch() as plain:
        orders.insert_one({"_id": 2})
        orders.update_one({"_id": 2}, {"$set": {"c": 1}})
        plain.next()
        assert "fullDocument" not in plain.next()


def test_resume_after_start_after_and_start_at_operation_time(client: pymongo.MongoClient) -> None:
    orders = client.shop.orders
    with orders.watch() as stream:
        start = stream.resume_token
        orders.insert_many([{"_id": i} for i in range(5)])
        first = [stream.next() for _ in range(5)]
    with orders.watch(resume_after=first[1]["_id"]) as again:
        assert [again.next()["documentKey"]["_id"] for _ in range(3)] == [2, 3, 4]
    with orders.watch(start_after=start) as again:
        assert again.next()["documentKey"]["_id"] == 0
    with orders.watch(start_at_operation_time=first[3]["clusterTime"]) as again:
        assert again.next()["documentKey"]["_id"] == 3
    with client.shop.watch([{"$match": {"ns.coll": {"$in": ["orders"]}}}]) as db_stream:
        client.shop.other.insert_one({"_id": 1})
        orders.insert_one({"_id": 99})
        assert db_stream.next()["documentKey"] == {"_id": 99}


def test_drop_invalidates_and_start_after_goes_on(client: pymongo.MongoClient) -> None:
    orders = client.shop.orders
    orders.insert_one({"_id": 1})
    with orders.watch() as stream:
        orders.drop()
        assert stream.next()["operationType"] == "drop"
        invalidate = stream.next()
        assert invalidate["operationType"] == "invalidate"
        assert not stream.alive
    with pytest.raises(OperationFailure, match="invalidate") as info:
        orders.watch(resume_after=invalidate["_id"])
    assert info.value.code == 260
    with orders.watch(start_after=invalidate["_id"]) as after:
        orders.insert_one({"_id": 2})
        assert after.next()["documentKey"] == {"_id": 2}


def test_history_lost_after_the_oplog_horizon(client: pymongo.MongoClient,
                                              mongo: MongoTestServer) -> None:  # fmt: skip
    orders = client.shop.orders
    with orders.watch() as stream:
        orders.insert_one({"_id": 1})
        old = stream.next()
    orders.insert_one({"_id": 2})
    mongo.truncate_oplog()
    with pytest.raises(OperationFailure) as info:
        orders.watch(resume_after=old["_id"])
    assert info.value.code == 286 and info.value.details["codeName"] == "ChangeStreamHistoryLost"
    with pytest.raises(OperationFailure) as info:
        orders.watch(start_at_operation_time=old["clusterTime"])
    assert info.value.code == 286
    client.admin.command("testTruncateOplog")  # the same knob over the wire


def test_stream_resumes_by_itself_after_dropped_connections_and_resumable_errors(
    client: pymongo.MongoClient, mongo: MongoTestServer
) -> None:
    orders = client.shop.orders
    with orders.watch() as stream:
        orders.insert_many([{"_id": i} for i in range(3)])
        seen = [stream.next()["documentKey"]["_id"]]
        mongo.drop_connections()
        orders.insert_one({"_id": 3})
        client.admin.command("configureFailPoint", "failCommand", mode={"times": 1},
                             data={"failCommands": ["getMore"], "errorCode": 91,
                                   "errorLabels": ["ResumableChangeStreamError"]})  # fmt: skip
        seen += [stream.next()["documentKey"]["_id"] for _ in range(3)]
        assert seen == [0, 1, 2, 3]
        assert mongo.counts["aggregate"] >= 2, "resumed with a new aggregate"


def test_fail_points_fail_or_close(client: pymongo.MongoClient, mongo: MongoTestServer) -> None:
    mongo.fail_command(["insert"], code=2, times=1)
    client_no_retry = pymongo.MongoClient(mongo.uri, retryWrites=False,
                                          serverSelectionTimeoutMS=5000)  # fmt: skip
    with pytest.raises(OperationFailure) as info:
        client_no_retry.shop.t.insert_one({"_id": 1})
    assert info.value.code == 2
    client_no_retry.shop.t.insert_one({"_id": 1})
    mongo.fail_command(["find"], close_connection=True, times=2)
    with pytest.raises(AutoReconnect):
        client_no_retry.shop.t.find_one({})  # retried once (retryReads): both closed
    assert client.shop.t.find_one({}) == {"_id": 1}
    client.admin.command("configureFailPoint", "failCommand", mode="off")
    client_no_retry.close()


def test_unknown_commands_and_pipelines_are_errors(client: pymongo.MongoClient) -> None:
    with pytest.raises(OperationFailure, match="no such command"):
        client.admin.command("replSetGetStatus")
    with pytest.raises(OperationFailure, match="only \\$changeStream"):
        list(client.shop.orders.aggregate([{"$match": {}}]))


def test_a_blocked_get_more_wakes_on_a_write(client: pymongo.MongoClient) -> None:
    orders = client.shop.orders
    with orders.watch(max_await_time_ms=5000) as stream:
        threading.Timer(0.3, lambda: orders.insert_one({"_id": 1})).start()
        t0 = time.monotonic()
        assert stream.next()["documentKey"] == {"_id": 1}
        assert time.monotonic() - t0 < 4.5


def test_raw_op_msg_and_op_query(mongo: MongoTestServer) -> None:
    """The two request forms pymongo uses, on a bare socket."""
    with socket.create_connection(("127.0.0.1", mongo.port)) as sock:
        query = bson.encode({"isMaster": 1})
        body = struct.pack("<i", 0) + b"admin.$cmd\0" + struct.pack("<ii", 0, -1) + query
        sock.sendall(struct.pack("<iiii", 16 + len(body), 7, 0, 2004) + body)
        length, _, response_to, opcode = struct.unpack("<iiii", sock.recv(16))
        rest = sock.recv(length - 16)
        assert (opcode, response_to) == (OP_REPLY, 7)
        assert bson.decode(rest[20:])["ismaster"] is True
        msg = struct.pack("<I", 0) + b"\0" + bson.encode({"ping": 1, "$db": "admin"})
        sock.sendall(struct.pack("<iiii", 16 + len(msg), 8, 0, OP_MSG) + msg)
        length, _, response_to, opcode = struct.unpack("<iiii", sock.recv(16))
        rest = sock.recv(length - 16)
        assert (opcode, response_to) == (OP_MSG, 8)
        assert bson.decode(rest[5:])["ok"] == 1.0
