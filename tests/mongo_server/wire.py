"""MongoDB wire framing: OP_MSG (2013) both ways, OP_QUERY (2004) in and OP_REPLY (1) out.

pymongo sends its first handshake (`isMaster` / `hello` on `admin.$cmd`) as OP_QUERY unless a
server API version is declared, and everything after it as OP_MSG.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field
from typing import Any

import bson
from bson.codec_options import CodecOptions

OP_REPLY, OP_QUERY, OP_MSG, OP_COMPRESSED = 1, 2004, 2013, 2012
HEADER = struct.Struct("<iiii")
CHECKSUM_PRESENT, MORE_TO_COME = 1, 2
MAX_MESSAGE = 48 * 1024 * 1024
#: Documents keep their field order (a replacement and `$set` are order-sensitive).
CODEC = CodecOptions(tz_aware=True)


class ProtocolError(Exception):
    """A frame this server does not understand: the connection is closed."""


@dataclass
class Request:
    request_id: int
    opcode: int
    command: dict[str, Any]
    more_to_come: bool = False
    #: OP_MSG kind-1 sections (`documents`, `updates`, `deletes`) folded into `command` too
    sequences: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_request(sock: socket.socket) -> Request | None:
    """The next request on `sock`, or None when the peer closed it."""
    head = _recv_exact(sock, HEADER.size)
    if head is None:
        return None
    length, request_id, _response_to, opcode = HEADER.unpack(head)
    if not HEADER.size <= length <= MAX_MESSAGE:
        raise ProtocolError(f"bad message length {length}")
    body = _recv_exact(sock, length - HEADER.size)
    if body is None:
        return None
    if opcode == OP_MSG:
        return _parse_msg(request_id, body)
    if opcode == OP_QUERY:
        return _parse_query(request_id, body)
    raise ProtocolError(f"opcode {opcode} is not supported (compression is not)")


def _parse_msg(request_id: int, body: bytes) -> Request:
    (flags,) = struct.unpack_from("<I", body)
    end = len(body) - (4 if flags & CHECKSUM_PRESENT else 0)
    pos, command, sequences = 4, None, {}
    while pos < end:
        kind = body[pos]
        pos += 1
        if kind == 0:
            (size,) = struct.unpack_from("<i", body, pos)
            command = bson.decode(body[pos : pos + size], CODEC)
            pos += size
        elif kind == 1:
            (size,) = struct.unpack_from("<i", body, pos)
            section_end = pos + size
            name_end = body.index(b"\0", pos + 4)
            name = body[pos + 4 : name_end].decode()
            docs, p = [], name_end + 1
            while p < section_end:
                (dsize,) = struct.unpack_from("<i", body, p)
                docs.append(bson.decode(body[p : p + dsize], CODEC))
                p += dsize
            sequences[name] = docs
            pos = section_end
        else:
            raise ProtocolError(f"OP_MSG section kind {kind}")
    if command is None:
        raise ProtocolError("OP_MSG without a body section")
    for name, docs in sequences.items():
        command[name] = docs
    return Request(request_id, OP_MSG, command, bool(flags & MORE_TO_COME), sequences)


def _parse_query(request_id: int, body: bytes) -> Request:
    name_end = body.index(b"\0", 4)
    collection = body[4:name_end].decode()
    if not collection.endswith(".$cmd"):
        raise ProtocolError(f"OP_QUERY on {collection}: only commands are supported")
    pos = name_end + 1 + 8  # numberToSkip, numberToReturn
    (size,) = struct.unpack_from("<i", body, pos)
    query = bson.decode(body[pos : pos + size], CODEC)
    if "$query" in query:  # the legacy wrapped form
        query = query["$query"]
    query.setdefault("$db", collection.removesuffix(".$cmd"))
    return Request(request_id, OP_QUERY, query)


def encode_reply(request: Request, reply_id: int, doc: dict[str, Any]) -> bytes:
    payload = bson.encode(doc)
    if request.opcode == OP_QUERY:
        body = struct.pack("<iqii", 0, 0, 0, 1) + payload
        return HEADER.pack(HEADER.size + len(body), reply_id, request.request_id, OP_REPLY) + body
    body = struct.pack("<I", 0) + b"\0" + payload
    return HEADER.pack(HEADER.size + len(body), reply_id, request.request_id, OP_MSG) + body
