"""In-memory records and single-record command execution (also used for batch rows).

Records are keyed by (namespace, digest), like the real server; each keeps its set name,
bins (as :class:`wire.Particle`), generation and, when the client sent it, the user key.
The store is guarded by a lock because tests inspect it from another thread.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import cdt, msgpack_codec, wire
from .wire import AsMsg, Op, Particle

log = logging.getLogger(__name__)

MAX_GENERATION = 0xFFFF
#: Aerospike's void times count seconds from 2010-01-01T00:00:00Z
CITRUSLEAF_EPOCH = 1262304000
#: record TTLs on the wire: 0 = the namespace's default-ttl, these two are special
TTL_NEVER_EXPIRE = 0xFFFF_FFFF
TTL_DONT_UPDATE = 0xFFFF_FFFE


@dataclass
class Record:
    set_name: str
    bins: dict[str, Particle]
    generation: int
    user_key: Any = None
    void_time: int = 0  # when it expires, in seconds since CITRUSLEAF_EPOCH; 0 = never


@dataclass
class Command:
    """One record command: a single-record as_msg, or one row of a batch."""

    info1: int
    info2: int
    info3: int
    namespace: str
    set_name: str
    digest: bytes
    ops: list[Op]
    generation: int = 0
    user_key: Any = None
    ttl: int = 0  # a write's record TTL as sent (0 = the namespace default)
    unsupported: list[str] = field(default_factory=list)


class OpError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _next_generation(gen: int) -> int:
    return 1 if gen >= MAX_GENERATION else gen + 1


def _null(op: Op) -> Op:
    return Op(op.op, wire.PT_NULL, op.name, b"")


def _result_op(op: Op, value: Any) -> Op:
    p = wire.particle_of(value)
    return Op(op.op, p.ptype, op.name, wire.encode_particle(p))


def _bin_op(op_code: int, name: str, p: Particle) -> Op:
    return Op(op_code, p.ptype, name, wire.encode_particle(p))


def _combine(
    bins: dict[str, Particle],
    op: Op,
    types: tuple[int, ...],
    wrong: str,
    combine: Callable[[Any, Any], Any],
) -> None:
    """Set the op's bin to its operand, or to `combine(current, operand)` when it is set:
    ERR_PARAMETER unless the operand is one of `types`, ERR_INCOMPATIBLE_TYPE when the bin
    holds another type."""
    arg = wire.decode_particle(op.particle_type, op.value)
    if arg.ptype not in types:
        raise OpError(wire.ERR_PARAMETER, wrong)
    cur = bins.get(op.name)
    if cur is None:
        bins[op.name] = arg
        return
    if cur.ptype != arg.ptype:
        raise OpError(wire.ERR_INCOMPATIBLE_TYPE, f"bin {op.name!r} has another type")
    bins[op.name] = Particle(cur.ptype, combine(cur.value, arg.value))


def _add(cur: int | float, delta: int | float) -> int | float:
    """Aerospike's increment: an integer bin wraps around as a signed 64-bit integer."""
    value = cur + delta
    if isinstance(value, int):
        value = struct.unpack(">q", struct.pack(">Q", value & 0xFFFF_FFFF_FFFF_FFFF))[0]
    return value


def _incr(bins: dict[str, Particle], op: Op) -> None:
    numbers = (wire.PT_INTEGER, wire.PT_DOUBLE)
    _combine(bins, op, numbers, "increment by a non-number", _add)


def _concat(bins: dict[str, Particle], op: Op) -> None:
    texts = (wire.PT_STRING, wire.PT_BLOB)
    append = op.op == wire.OP_APPEND
    _combine(
        bins,
        op,
        texts,
        "append/prepend needs a string or blob",
        lambda cur, add: cur + add if append else add + cur,
    )


def _cdt(bins: dict[str, Particle], op: Op, writable: bool) -> Any:
    try:
        request = msgpack_codec.unpackb(op.value)
    except msgpack_codec.MsgpackError as exc:
        raise OpError(wire.ERR_PARAMETER, f"bad CDT op: {exc}") from exc
    if op.op == wire.OP_CDT_READ and not cdt.is_read_only(request):
        raise OpError(wire.ERR_PARAMETER, "modify CDT op sent as CDT_READ")
    cur = bins.get(op.name)
    if cur is not None and cur.ptype != wire.PT_MAP:
        raise OpError(wire.ERR_INCOMPATIBLE_TYPE, f"bin {op.name!r} is not a map")
    try:
        new, result = cdt.apply(None if cur is None else cur.value, request)
    except cdt.CdtError as exc:
        raise OpError(exc.code, str(exc)) from exc
    if writable and op.op == wire.OP_CDT_MODIFY:
        if new is None:
            bins.pop(op.name, None)
        else:
            bins[op.name] = Particle(wire.PT_MAP, new)
    return result


def apply_ops(
    bins: dict[str, Particle], ops: list[Op], *, writable: bool, respond_all: bool, get_all: bool
) -> list[Op]:
    """Apply ops in order to bins (mutated in place when writable); return response ops."""
    out: list[Op] = []
    for op in ops:
        code = op.op
        if code == wire.OP_READ:
            if get_all or not op.name:
                out.extend(_bin_op(wire.OP_READ, n, p) for n, p in bins.items())
            elif op.name in bins:
                out.append(_bin_op(wire.OP_READ, op.name, bins[op.name]))
            elif respond_all:
                out.append(_null(op))
            continue
        if code == wire.OP_CDT_READ:
            if op.name in bins:
                out.append(_result_op(op, _cdt(bins, op, writable=False)))
            elif respond_all:
                out.append(_null(op))
            continue
        if not writable:
            raise OpError(wire.ERR_PARAMETER, f"write op {code} in a read command")
        if code == wire.OP_CDT_MODIFY:
            result = _cdt(bins, op, writable=True)
            if respond_all or result is not None:
                out.append(_result_op(op, result))
            continue
        if code == wire.OP_WRITE:
            if op.particle_type == wire.PT_NULL:
                bins.pop(op.name, None)
            else:
                try:
                    bins[op.name] = wire.decode_particle(op.particle_type, op.value)
                except (ValueError, struct.error) as exc:
                    raise OpError(wire.ERR_PARAMETER, f"bad bin value: {exc}") from exc
        elif code == wire.OP_INCR:
            _incr(bins, op)
        elif code in (wire.OP_APPEND, wire.OP_PREPEND):
            _concat(bins, op)
        elif code == wire.OP_DELETE_ALL:
            bins.clear()
        elif code != wire.OP_TOUCH:
            raise OpError(wire.ERR_UNSUPPORTED_FEATURE, f"op type {code} is not supported")
        if respond_all:
            out.append(_null(op))
    return out


class Store:
    """All records of all namespaces, plus the command semantics over them.

    Expiry follows the server: a write's TTL of 0 takes `default_ttl` (0 = never expire),
    TTL_NEVER_EXPIRE clears the void time, TTL_DONT_UPDATE keeps it; a record whose void time
    has passed (on `clock`, epoch seconds; tests move it) is gone for every command and scan.
    """

    def __init__(
        self,
        namespaces: list[str],
        *,
        default_ttl: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.namespaces = list(namespaces)
        self.default_ttl = default_ttl
        self.clock = clock
        self.lock = threading.RLock()
        self._records: dict[tuple[str, bytes], Record] = {}

    def now(self) -> int:
        """The clock in void-time units (seconds since CITRUSLEAF_EPOCH)."""
        return int(self.clock()) - CITRUSLEAF_EPOCH

    def _live(self, rec: Record | None, now: int) -> bool:
        return rec is not None and (rec.void_time == 0 or rec.void_time > now)

    def _void_time(self, ttl: int, rec: Record | None) -> int:
        if ttl == TTL_NEVER_EXPIRE:
            return 0
        if ttl == TTL_DONT_UPDATE:
            return rec.void_time if rec is not None else self._void_time(0, None)
        if ttl == 0:
            ttl = self.default_ttl
        return self.now() + ttl if ttl else 0

    # -- inspection ----------------------------------------------------------------

    def snapshot(self) -> dict[tuple[str, bytes], Record]:
        """Copies of the live (unexpired) records."""
        with self.lock:
            now = self.now()
            return {
                k: Record(r.set_name, dict(r.bins), r.generation, r.user_key, r.void_time)
                for k, r in self._records.items()
                if self._live(r, now)
            }

    def get(self, ns: str, digest: bytes) -> Record | None:
        with self.lock:
            rec = self._records.get((ns, digest))
            return rec if self._live(rec, self.now()) else None

    def put_record(self, ns: str, digest: bytes, record: Record) -> None:
        with self.lock:
            self._records[(ns, digest)] = record

    def clear(self, ns: str | None = None, set_name: str | None = None) -> int:
        with self.lock:
            doomed = [
                k
                for k, r in self._records.items()
                if (ns is None or k[0] == ns) and (set_name is None or r.set_name == set_name)
            ]
            for k in doomed:
                del self._records[k]
            return len(doomed)

    # -- execution -----------------------------------------------------------------

    def execute(self, cmd: Command) -> AsMsg:
        """Run one command; the response header's transaction_ttl is left 0."""
        if cmd.namespace not in self.namespaces:
            return AsMsg(result_code=20)  # AS_ERR_NAMESPACE
        try:
            with self.lock:
                if cmd.info2 & wire.INFO2_WRITE:
                    return self._write(cmd)
                return self._read(cmd)
        except OpError as exc:
            log.info("aerospike test server: command failed (%d): %s", exc.code, exc)
            return AsMsg(result_code=exc.code)

    def _read(self, cmd: Command) -> AsMsg:
        rec = self.get(cmd.namespace, cmd.digest)
        if rec is None:
            return AsMsg(result_code=wire.ERR_NOT_FOUND)
        if cmd.info1 & wire.INFO1_GET_NOBINDATA:
            return AsMsg(generation=rec.generation, record_ttl=rec.void_time)
        get_all = bool(cmd.info1 & wire.INFO1_GET_ALL) or not cmd.ops
        ops = cmd.ops or [Op(wire.OP_READ, wire.PT_NULL, "", b"")]
        out = apply_ops(
            rec.bins,
            ops,
            writable=False,
            get_all=get_all,
            respond_all=bool(cmd.info2 & wire.INFO2_RESPOND_ALL_OPS),
        )
        return AsMsg(generation=rec.generation, record_ttl=rec.void_time, ops=out)

    def _check_write(self, cmd: Command, rec: Record | None) -> None:
        exists = rec is not None
        if cmd.info2 & wire.INFO2_CREATE_ONLY and exists:
            raise OpError(wire.ERR_RECORD_EXISTS, "record exists")
        if cmd.info3 & (wire.INFO3_UPDATE_ONLY | wire.INFO3_REPLACE_ONLY) and not exists:
            raise OpError(wire.ERR_NOT_FOUND, "record not found")
        gen = rec.generation if rec else 0
        if cmd.info2 & wire.INFO2_GENERATION and cmd.generation != gen:
            raise OpError(wire.ERR_GENERATION, f"generation {gen} != {cmd.generation}")
        if cmd.info2 & wire.INFO2_GENERATION_GT and cmd.generation <= gen:
            raise OpError(wire.ERR_GENERATION, f"generation {cmd.generation} <= {gen}")

    def _write(self, cmd: Command) -> AsMsg:
        key = (cmd.namespace, cmd.digest)
        rec = self.get(*key)
        if rec is None:
            self._records.pop(key, None)  # expired: as if it never was
        if cmd.info2 & wire.INFO2_DELETE:
            if rec is None:
                return AsMsg(result_code=wire.ERR_NOT_FOUND)
            self._check_write(cmd, rec)
            del self._records[key]
            return AsMsg()
        self._check_write(cmd, rec)
        replace = bool(cmd.info3 & (wire.INFO3_CREATE_OR_REPLACE | wire.INFO3_REPLACE_ONLY))
        bins = {} if rec is None or replace else dict(rec.bins)
        out = apply_ops(
            bins,
            cmd.ops,
            writable=True,
            respond_all=bool(cmd.info2 & wire.INFO2_RESPOND_ALL_OPS),
            get_all=bool(cmd.info1 & wire.INFO1_GET_ALL),
        )
        if not bins:
            if rec is None:
                return AsMsg(result_code=wire.ERR_NOT_FOUND)
            del self._records[key]  # a record whose last bin went is deleted
            return AsMsg(ops=out)
        gen = _next_generation(rec.generation if rec else 0)
        user_key = cmd.user_key if cmd.user_key is not None else (rec.user_key if rec else None)
        void_time = self._void_time(cmd.ttl, rec)
        self._records[key] = Record(cmd.set_name, bins, gen, user_key, void_time)
        return AsMsg(generation=gen, record_ttl=void_time, ops=out)
